"""What autograd keeps for the backward of real models, unconverted and after
``tn.convert(model, fuse_activations=True)``: diffusers' UNet2DModel (DDPM's CIFAR-10 layout,
with either time-embedding mode) and timm's efficientnet_b0.

Counted with ``torch.autograd.graph.saved_tensors_hooks`` during one training-mode forward:
every tensor saved for the backward, by distinct storage, less the parameters and buffers (which
are kept anyway). On the CPU with the Triton kernels run by the interpreter, so it counts what
the kernels' autograd saves (without ``TRITON_INTERPRET`` CPU tensors take torch's own ops).
Random weights, no downloads. About 13 minutes on 2 cores (the interpreter runs the kernels' programs
one after another); prints a markdown table.

    .venv/bin/python docs/zoo_memory.py
"""

from __future__ import annotations

import copy
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before tritonnorm is imported

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_zoo import _torchvision_note  # torchvision on a CPU torch, see there

import tritonnorm as tn

MiB = 2**20


def saved_bytes(model: torch.nn.Module, *inputs) -> int:
    kept = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in kept:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(storages.values())


def ddpm_unet(scale_shift: bool):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
    )  # fmt: skip


def main() -> None:
    _torchvision_note()
    import timm

    torch.manual_seed(0)
    unet_in = (torch.randn(8, 3, 32, 32), torch.randint(0, 1000, (8,)))
    image = (torch.randn(8, 3, 224, 224),)
    models = {
        "diffusers UNet2DModel (DDPM CIFAR-10 layout), 8x3x32x32": (ddpm_unet(False), unet_in),
        "the same, resnet_time_scale_shift='scale_shift'": (ddpm_unet(True), unet_in),
        "timm efficientnet_b0, 8x3x224x224": (timm.create_model("efficientnet_b0"), image),
    }
    print("| model | unconverted | converted | converted / unconverted | what fused |")
    print("|---|---|---|---|---|")
    for name, (model, inputs) in models.items():
        start = time.time()
        ours, report = tn.convert(copy.deepcopy(model), fuse_activations=True, report=True)
        before, after = saved_bytes(model, *inputs), saved_bytes(ours, *inputs)
        fused = "; ".join(f"{n} x {what}" for what, n in sorted(report.fused.items()))
        print(
            f"| {name} | {before / MiB:.1f} MiB | {after / MiB:.1f} MiB | "
            f"{after / before:.2f} | {fused} |",
            flush=True,
        )
        print(f"<!-- {time.time() - start:.0f} s -->", file=sys.stderr)


if __name__ == "__main__":
    main()
