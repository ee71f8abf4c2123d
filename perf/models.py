"""``python -m perf.models``: what a user feels, a training step of real models with and without
tritonnorm.

Models (:data:`MODELS`; random init, no downloads): torchvision ``resnet50`` (BatchNorm, ReLU and
residual blocks), timm ``convnext_tiny`` (LayerNorm2d), timm ``efficientnet_b0`` (BatchNormAct2d +
SiLU), a diffusers ``UNet2DModel`` (GroupNorm + SiLU, time-embedding scale/shift: DDPM's layout at
64x64) and MONAI's 3-D ``UNet`` (InstanceNorm) where each package imports; a model whose package
does not import gets one row saying why. On a GPU: classifiers at batch 128 x 224², the UNet at
batch 32 x 64², MONAI at batch 4 x 64³; channels_last (3-D: channels_last_3d), bf16 autocast, SGD
with momentum 0.9. Synthetic data made once on the device with a fixed seed (no loader timed).

Variants (:data:`VARIANTS`), each a deep copy of the same initial model driven by the same step
function (zero_grad, forward, loss, backward, ``optimizer.step()``): torch eager; ``tn.convert``;
``tn.convert(fuse_activations=True)``; ``torch.compile(model)``; ``torch.compile`` of the fused
conversion; and the whole step captured in one CUDA graph (``torch.cuda.graph``, as in torch's
"whole network capture" recipe: warm-up on a side stream, grads set to None before capture,
autocast's cache off) for torch eager and the fused conversion. ``--budget-s``: phases in
priority order (the three eager variants of every model, then the graph captures, then the
compiled variants); what the budget does not reach gets a row "skipped: out of budget".

Checked first, per variant, on the first forward + backward from the initial weights: the loss
and every parameter's gradient against torch. On a GPU the reference is torch eager in float32
(TF32 off) and the error allowed is max(3 x torch bf16-autocast's own error, 1e-2), as relative
L2 error per gradient (``||g - g_ref|| / ||g_ref||``) and relative error of the loss; on the CPU
(dry run) the models run in float64 and the error allowed is 1e-6 relative.

Measured per model x variant on a GPU (one row each, :class:`Row`): ``first_step_s`` (wall clock
from the deep copy to the end of the first forward + backward: convert, torch.compile, Triton's
JIT and capture included); ``step_ms`` (median over ``--steps`` steps after ``--warmup``, CUDA
events around each step: a host-bound step shows as its gaps); ``images_per_s``; ``peak_mib``
(``torch.cuda.max_memory_allocated`` over the timed steps minus what was allocated before the
variant was built: its weights, gradients, optimizer state and activations); from torch.profiler
over ``--profile-steps`` steps, ``kernel_ms`` (GPU kernel, memcpy and memset time per step),
``norm_ms`` (kernels whose name matches :data:`NORM_KERNEL`: tritonnorm's ``_norm_*`` /
``_position_norm_*``, torch's and cuDNN's batch/group/layer norm kernels, inductor's fused
``*norm*`` kernels), ``norm_frac`` = norm_ms / kernel_ms and ``busy_frac`` = kernel_ms /
step_ms (below ~0.9 the GPU waits on the host).

``--dry-run`` (CPU, CI): every model at a tiny configuration of its architecture (:class:`Shape`
``tiny``) through Triton's interpreter in float64, the eager variants stepped once beside torch
with the check above; the compiled and captured variants are skipped with the reason. Then,
in a separate process with the interpreter off, perf.hostcost's emulation of the native launch
path (stub CUDA driver, compilation stubbed, no kernel runs; :func:`host_emulation`) measures per
model and converted variant, over a training step at the tiny shape in bf16 autocast (convs and
the rest run in torch on the CPU; the norms' outputs are ``torch.empty``): ``norm_calls`` (forward
calls of converted norm modules + backward nodes of their outputs), ``launches`` (cuLaunchKernelEx
calls, counted by the stub: every Triton launch of the step) and ``host_us`` (CPU time inside
tritonnorm: from a forward pre-hook to a forward hook of each converted norm module, plus from
a pre-hook to a hook of its output's autograd node; the median step of ``--host-steps``).

Output under ``--out``: ``models.csv`` (rows as they are measured), ``models.png`` (step time
and peak memory per model x variant; GPU only), and with ``--dry-run`` ``models_cpu.json`` and
``host.csv``. Run on a lent GPU: ``PYTHONPATH=. python3 -m perf.models --out perf/results/<gpu>``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import functools
import importlib
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

SEED = 0
LR, MOMENTUM = 0.01, 0.9
NORM_KERNEL = re.compile(r"norm|(^|[^a-z])bn_(fw|bw)|welford", re.IGNORECASE)
CPU_TOLERANCE = 1e-6  # float64 on both sides: differences are summation order alone
GPU_TOLERANCE_FLOOR = 1e-2  # bf16 has 8 bits of mantissa: 4e-3 per rounding
GPU_TOLERANCE_FACTOR = 3.0
GRAD_FLOOR = 1e-3  # of the largest gradient's norm: below it, errors are judged against it
DRY_BANNER = "CPU MODE (Triton interpreter, float64, tiny shapes): NOT A GPU MEASUREMENT"


# --------------------------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------------------------

_LIBRARIES = []  # keeps the torchvision operator declarations alive


@functools.cache
def torchvision_note() -> str | None:
    """Import torchvision where installed. When its C++ operators cannot load beside this torch
    (a CUDA torchvision wheel beside a CPU torch: "operator torchvision::nms does not exist"),
    declare the two operators its import registers against and import it again: its Python
    models import, its C++ operators stay unusable and nothing here calls them (tests/test_zoo.py
    uses it too). Returns what was done."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        importlib.import_module("torchvision")
        return None
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(library)
    importlib.import_module("torchvision")
    return "torchvision's C++ operators cannot load beside this torch: declared nms/qnms"


def package(name: str):
    """The module, or raise ImportError saying why it cannot be used."""
    try:
        torchvision_note()
        return importlib.import_module(name)
    except Exception as error:  # not installed, or installed and broken: say which
        raise ImportError(f"cannot import {name} ({type(error).__name__}: {error})") from error


class Shape(NamedTuple):
    batch: int
    size: int  # height = width (= depth for 3-D)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model: how to build it (``tiny``: the smallest configuration of its architecture, for
    the interpreter), what its step feeds it, and its shapes."""

    name: str
    package: str
    build: Callable[[bool], torch.nn.Module]
    gpu: Shape
    tiny: Shape
    kind: str = "classifier"  # or "unet2d" (x, t) -> .sample, "unet3d" x -> y
    dims: int = 2


def _resnet50(tiny: bool):
    tv = package("torchvision")
    if tiny:  # resnet50's stem and Bottleneck blocks, one per stage, a quarter of the width
        from torchvision.models.resnet import Bottleneck, ResNet

        # expansion 1 instead of 4 while building: the same class (tn.convert fuses blocks by
        # exact class), a quarter of the channels (the interpreter's cost is per channel)
        expansion, Bottleneck.expansion = Bottleneck.expansion, 1
        try:
            return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16)
        finally:
            Bottleneck.expansion = expansion
    return tv.models.resnet50(num_classes=1000)


def _convnext(tiny: bool):
    return package("timm").create_model("convnext_atto" if tiny else "convnext_tiny",
                                        num_classes=10 if tiny else 1000)  # fmt: skip


def _efficientnet(tiny: bool):
    timm = package("timm")
    if tiny:  # b0's blocks, a quarter of the width, one block per stage (timm's own builder:
        # create_model fixes b0's multipliers)
        from timm.models.efficientnet import _gen_efficientnet

        return _gen_efficientnet("efficientnet_b0", channel_multiplier=0.25,
                                 depth_multiplier=0.1, num_classes=10)  # fmt: skip
    return timm.create_model("efficientnet_b0", num_classes=1000)


def _unet2d(tiny: bool):
    diffusers = package("diffusers")
    if tiny:
        return diffusers.UNet2DModel(
            sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
            resnet_time_scale_shift="scale_shift",
        )  # fmt: skip
    return diffusers.UNet2DModel(  # DDPM's 64x64 layout, attention at 16x16
        sample_size=64, block_out_channels=(128, 256, 256, 512), layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        resnet_time_scale_shift="scale_shift",
    )  # fmt: skip


def _monai_unet(tiny: bool):
    nets = package("monai.networks.nets")
    channels = (8, 16, 32) if tiny else (32, 64, 128, 256)
    return nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=channels,
                     strides=(2,) * (len(channels) - 1), num_res_units=2, norm="instance")  # fmt: skip


MODELS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec("resnet50", "torchvision", _resnet50, Shape(128, 224), Shape(2, 32)),
    "convnext_tiny": ModelSpec("convnext_tiny", "timm", _convnext, Shape(128, 224), Shape(2, 32)),
    "efficientnet_b0": ModelSpec(
        "efficientnet_b0", "timm", _efficientnet, Shape(128, 224), Shape(2, 16)
    ),
    "unet2d": ModelSpec("unet2d", "diffusers", _unet2d, Shape(32, 64), Shape(2, 8), "unet2d"),
    "monai_unet3d": ModelSpec(
        "monai_unet3d", "monai", _monai_unet, Shape(4, 64), Shape(1, 16), "unet3d", dims=3
    ),
}


class Batch(NamedTuple):
    x: torch.Tensor
    target: torch.Tensor  # labels, or the noise / segmentation the model predicts
    timesteps: torch.Tensor | None = None


def make_batch(spec: ModelSpec, shape: Shape, device: str, dtype: torch.dtype) -> Batch:
    """Synthetic data from a fixed seed, made on the device once."""
    g = torch.Generator(device="cpu").manual_seed(SEED)
    channels = 1 if spec.kind == "unet3d" else 3
    x = torch.randn(shape.batch, channels, *[shape.size] * spec.dims, generator=g, dtype=dtype)
    x = x.to(device, memory_format=memory_format(spec))
    if spec.kind == "classifier":
        classes = 10 if shape.size < 64 else 1000
        target = torch.randint(0, classes, (shape.batch,), generator=g).to(device)
        return Batch(x, target)
    if spec.kind == "unet2d":
        t = torch.randint(0, 1000, (shape.batch,), generator=g).to(device)
        return Batch(x, torch.randn(x.shape, generator=g, dtype=dtype).to(device), t)
    labels = torch.randint(0, 2, (shape.batch, *x.shape[2:]), generator=g).to(device)
    return Batch(x, labels)


def memory_format(spec: ModelSpec) -> torch.memory_format:
    return torch.channels_last_3d if spec.dims == 3 else torch.channels_last


def loss_of(spec: ModelSpec, model, batch: Batch) -> torch.Tensor:
    if spec.kind == "unet2d":
        return F.mse_loss(model(batch.x, batch.timesteps).sample.float(), batch.target.float())
    return F.cross_entropy(model(batch.x).float(), batch.target)


# --------------------------------------------------------------------------------------------
# Variants.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    convert: bool = False
    fuse: bool = False
    compile: bool = False
    graph: bool = False  # the whole step captured in one CUDA graph
    phase: int = 0  # budget priority: 0 eager, 1 captured, 2 compiled


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("torch"),
        Variant("tn", convert=True),
        Variant("tn_fused", convert=True, fuse=True),
        Variant("graph_torch", graph=True, phase=1),
        Variant("graph_tn_fused", convert=True, fuse=True, graph=True, phase=1),
        Variant("compile", compile=True, phase=2),
        Variant("compile_tn_fused", convert=True, fuse=True, compile=True, phase=2),
    )
}


def prepare(model: torch.nn.Module, variant: Variant) -> torch.nn.Module:
    import tritonnorm as tn

    if variant.convert:
        model = tn.convert(model, fuse_activations=variant.fuse)
    if variant.compile:
        model = torch.compile(model)
    return model


# --------------------------------------------------------------------------------------------
# Checks.
# --------------------------------------------------------------------------------------------


class Grads(NamedTuple):
    loss: float
    grads: dict[str, torch.Tensor]  # by parameter name, in float32/64 on the device


def forward_backward(spec, model, batch, autocast: torch.dtype | None) -> Grads:
    """One forward + backward from the model's current weights (no optimizer step)."""
    for p in model.parameters():
        p.grad = None
    device = batch.x.device.type
    with torch.autocast(device, autocast or torch.float32, enabled=autocast is not None):
        loss = loss_of(spec, model, batch)
    loss.backward()
    return Grads(loss.item(), named_grads(model))


def named_grads(model) -> dict[str, torch.Tensor]:
    # torch.compile's wrapper prefixes names with "_orig_mod.": compare by the original's names
    return {n.removeprefix("_orig_mod."): p.grad.detach().clone()
            for n, p in model.named_parameters() if p.grad is not None}  # fmt: skip


def relative_errors(got: Grads, ref: Grads) -> dict[str, float]:
    """Relative error of the loss and relative L2 error of each gradient. A gradient smaller
    than GRAD_FLOOR of the largest one is measured against that floor instead of its own norm:
    some are zero in exact arithmetic and rounding alone in practice (an attention key's bias:
    softmax ignores what it adds)."""
    errors = {"loss": abs(got.loss - ref.loss) / max(abs(ref.loss), 1e-30)}
    norms = {name: r.double().norm().item() for name, r in ref.grads.items()}
    floor = GRAD_FLOOR * max(norms.values(), default=0.0)
    for name, r in ref.grads.items():
        g = got.grads.get(name)
        if g is None:
            errors[name] = math.inf
            continue
        diff = (g.double() - r.double()).norm().item()
        errors[name] = diff / max(norms[name], floor, 1e-30)
    return errors


class Verdict(NamedTuple):
    ok: bool
    worst: str  # the loss or the parameter with the largest error against its allowance
    error: float
    allowed: float


def judge(errors: dict[str, float], allowed: dict[str, float]) -> Verdict:
    worst = max(errors, key=lambda k: errors[k] / allowed[k])
    return Verdict(errors[worst] <= allowed[worst], worst, errors[worst], allowed[worst])


# --------------------------------------------------------------------------------------------
# Rows.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    model: str
    variant: str
    device: str
    batch: int
    size: int
    dtype: str
    status: str = ""  # ok / FAIL (check) / ERROR / skipped: why
    check: str = ""  # worst error against its allowance
    first_step_s: float | None = None
    step_ms: float | None = None
    images_per_s: float | None = None
    peak_mib: float | None = None
    kernel_ms: float | None = None
    norm_ms: float | None = None
    norm_frac: float | None = None
    busy_frac: float | None = None
    vs_eager: float | None = None  # torch eager's step_ms / this one's
    vs_compile: float | None = None  # torch.compile's step_ms / this one's


def fill_speedups(rows: list[Row]) -> None:
    base = {(r.model, r.variant): r.step_ms for r in rows if r.step_ms}
    for r in rows:
        if r.step_ms:
            eager, compiled = base.get((r.model, "torch")), base.get((r.model, "compile"))
            r.vs_eager = round(eager / r.step_ms, 3) if eager else None
            r.vs_compile = round(compiled / r.step_ms, 3) if compiled else None


def write_csv(rows: list, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f.name for f in dataclasses.fields(rows[0])] if rows else ["model"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(dataclasses.asdict(r) for r in rows)


def write_plot(rows: list[Row], path: Path, banner: str = "") -> bool:
    """Step time and peak memory per model x variant, as bars; False without matplotlib."""
    timed = [r for r in rows if r.step_ms]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(dict.fromkeys(r.model for r in timed))
    variants = [v for v in VARIANTS if any(r.variant == v for r in timed)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(len(variants), 1)
    for ax, field, label in ((axes[0], "step_ms", "step time (ms)"),
                             (axes[1], "peak_mib", "peak memory (MiB)")):  # fmt: skip
        for i, v in enumerate(variants):
            got = {r.model: getattr(r, field) for r in timed if r.variant == v}
            xs = [m + (i - len(variants) / 2 + 0.5) * width for m in range(len(models))]
            ax.bar(xs, [got.get(m) or 0 for m in models], width, label=v)
        ax.set_xticks(range(len(models)), models)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(banner or "training step: forward, loss, backward, SGD step", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown_table(rows: list[Row]) -> list[str]:
    lines = ["| model | variant | status | step ms | x eager | x compile | peak MiB | "
             "first step s | norm % | busy % |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    pct = lambda v: f"{100 * v:.0f}" if v is not None else ""
    num = lambda v, f=".3g": format(v, f) if v is not None else ""
    for r in rows:
        lines.append(f"| {r.model} | {r.variant} | {r.status[:60]} | {num(r.step_ms)} | "
                     f"{num(r.vs_eager)} | {num(r.vs_compile)} | {num(r.peak_mib, '.0f')} | "
                     f"{num(r.first_step_s)} | {pct(r.norm_frac)} | {pct(r.busy_frac)} |")  # fmt: skip
    return lines


# --------------------------------------------------------------------------------------------
# One model x variant.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    device: str = "cuda"
    tiny: bool = False
    warmup: int = 5
    steps: int = 20
    profile_steps: int = 3
    compiled_warmup: int = 3  # extra warm-up steps of compiled variants (recompiles settle)

    @property
    def dtype(self) -> torch.dtype:  # the weights' dtype
        return torch.float64 if self.device == "cpu" else torch.float32

    @property
    def autocast(self) -> torch.dtype | None:
        return None if self.device == "cpu" else torch.bfloat16


class Prepared(NamedTuple):
    """A model's initial state (weights on the device), batch and reference gradients."""

    spec: ModelSpec
    initial: torch.nn.Module
    batch: Batch
    reference: Grads  # torch eager, float32 on the GPU (float64 on the CPU)
    allowed: dict[str, float]  # per loss / parameter


def prepare_model(spec: ModelSpec, settings: Settings) -> Prepared:
    torch.manual_seed(SEED)
    shape = spec.tiny if settings.tiny else spec.gpu
    model = spec.build(settings.tiny).to(settings.device, settings.dtype)
    model = model.to(memory_format=memory_format(spec)).train()
    batch = make_batch(spec, shape, settings.device, settings.dtype)
    if settings.device == "cpu":
        ref = forward_backward(spec, copy.deepcopy(model), batch, None)
        allowed = dict.fromkeys(["loss", *ref.grads], CPU_TOLERANCE)
        return Prepared(spec, model, batch, ref, allowed)
    with _exact_float32():
        ref = forward_backward(spec, copy.deepcopy(model), batch, None)
    own = relative_errors(forward_backward(spec, copy.deepcopy(model), batch, settings.autocast),
                          ref)  # fmt: skip
    allowed = {k: max(GPU_TOLERANCE_FACTOR * e, GPU_TOLERANCE_FLOOR) for k, e in own.items()}
    return Prepared(spec, model, batch, ref, allowed)


@contextlib.contextmanager
def _exact_float32():
    """No TF32 in convolutions and matmuls: the reference is float32 proper."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def step_function(spec, model, optimizer, batch, autocast, cache: bool = True) -> Callable:
    device = batch.x.device.type

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, autocast or torch.float32, enabled=autocast is not None,
                            cache_enabled=cache):  # fmt: skip
            loss = loss_of(spec, model, batch)
        loss.backward()
        optimizer.step()
        return loss

    return step


def sgd(model) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def captured_step(spec, model, optimizer, batch, autocast, warmup: int) -> tuple[Callable, object]:
    """The whole step in one CUDA graph (torch's whole-network capture recipe): warm-up steps on
    a side stream, grads set to None so that the captured backward allocates them from the
    graph's pool, autocast's cache off (cached casts would outlive the capture). Returns the
    replay and the static loss."""
    step = step_function(spec, model, optimizer, batch, autocast, cache=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    device = batch.x.device.type
    with torch.cuda.graph(graph):
        with torch.autocast(device, autocast, enabled=autocast is not None, cache_enabled=False):
            static_loss = loss_of(spec, model, batch)
        static_loss.backward()
        optimizer.step()
    return graph.replay, static_loss


def measure(prep: Prepared, variant: Variant, settings: Settings) -> Row:
    spec, device = prep.spec, settings.device
    shape = spec.tiny if settings.tiny else spec.gpu
    dtype = str(settings.autocast or settings.dtype).removeprefix("torch.")
    row = Row(spec.name, variant.name, device, shape.batch, shape.size, dtype)
    if device == "cpu" and (variant.compile or variant.graph):
        row.status = ("skipped: CUDA graphs need a GPU" if variant.graph else
                      "skipped: inductor on the CPU takes minutes per model")  # fmt: skip
        return row
    if device == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    model = prepare(copy.deepcopy(prep.initial), variant)
    optimizer = sgd(model)
    if variant.graph:
        replay, static_loss = captured_step(spec, model, optimizer, prep.batch, settings.autocast,
                                            settings.warmup)  # fmt: skip
        _sync(device)
        row.first_step_s = time.perf_counter() - t0
        # the check: the initial weights copied in place, one replay, its loss and grads
        with torch.no_grad():
            for p, q in zip(model.parameters(), prep.initial.parameters(), strict=True):
                p.copy_(q)
        replay()
        _sync(device)
        got = Grads(static_loss.item(), named_grads(model))
        step = replay
    else:
        got = forward_backward(spec, model, prep.batch, settings.autocast)
        _sync(device)
        row.first_step_s = time.perf_counter() - t0
        step = step_function(spec, model, optimizer, prep.batch, settings.autocast)
    verdict = judge(relative_errors(got, prep.reference), prep.allowed)
    row.check = f"{verdict.worst}: {verdict.error:.2e} (allowed {verdict.allowed:.1e})"
    if not verdict.ok:
        row.status = "FAIL"
        return row
    if device == "cpu":  # the optimizer's step on the checked gradients
        optimizer.step()
        row.status = "ok"
        return row
    warmup = settings.warmup + settings.compiled_warmup * variant.compile
    for _ in range(warmup * (not variant.graph)):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(settings.steps)]  # fmt: skip
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    row.step_ms = statistics.median(s.elapsed_time(e) for s, e in events)
    row.images_per_s = shape.batch / row.step_ms * 1e3
    row.peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    kernel_us, norm_us = profile_kernels(step, settings.profile_steps)
    row.kernel_ms, row.norm_ms = kernel_us / 1e3, norm_us / 1e3
    row.norm_frac = norm_us / kernel_us if kernel_us else None
    row.busy_frac = row.kernel_ms / row.step_ms
    row.status = "ok"
    return row


def profile_kernels(step: Callable, steps: int) -> tuple[float, float]:
    """GPU time per step (µs) of all kernels (memcpy and memset included) and of the norm
    kernels (:data:`NORM_KERNEL`), from torch.profiler's device-side events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total = norm = 0.0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            us = e.time_range.elapsed_us()
            total += us
            norm += us * bool(NORM_KERNEL.search(e.name))
    return total / steps, norm / steps


# --------------------------------------------------------------------------------------------
# The run: phases in priority order inside the budget.
# --------------------------------------------------------------------------------------------


def run(
    model_names: list[str],
    variant_names: list[str],
    settings: Settings,
    deadline: float,
    on_rows: Callable[[list[Row]], None] = lambda rows: None,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Every model x variant, phase by phase (eager variants of every model first); rows in
    model order, ``on_rows`` called with all rows so far after each model's rows of a phase."""
    rows: dict[tuple[str, str], Row] = {}
    prepared: dict[str, Prepared | str] = {}
    variants = [VARIANTS[v] for v in variant_names]

    def ordered() -> list[Row]:
        return [rows[m, v.name] for m in model_names for v in variants if (m, v.name) in rows]

    for phase in sorted({v.phase for v in variants}):
        for name in model_names:
            spec = MODELS[name]
            shape = spec.tiny if settings.tiny else spec.gpu
            dtype = str(settings.autocast or settings.dtype).removeprefix("torch.")
            blank = functools.partial(Row, name, device=settings.device, batch=shape.batch,
                                      size=shape.size, dtype=dtype)  # fmt: skip
            if name not in prepared and time.monotonic() < deadline:
                try:
                    prepared[name] = prepare_model(spec, settings)
                except ImportError as e:
                    prepared[name] = f"skipped: {e}"[:300]
                except Exception as e:
                    prepared[name] = f"ERROR preparing: {type(e).__name__}: {e}"[:300]
            for v in (v for v in variants if v.phase == phase):
                prep = prepared.get(name)
                if prep is None or time.monotonic() > deadline:
                    rows[name, v.name] = blank(variant=v.name, status="skipped: out of budget")
                    continue
                if isinstance(prep, str):
                    rows[name, v.name] = blank(variant=v.name, status=prep)
                    continue
                t0 = time.monotonic()
                try:
                    row = measure(prep, v, settings)
                except Exception as e:
                    row = blank(variant=v.name, status=f"ERROR: {type(e).__name__}: {e}"[:300])
                finally:
                    if settings.device == "cuda":
                        torch.cuda.empty_cache()
                rows[name, v.name] = row
                log(f"{name:16s} {v.name:17s} {row.status[:70]:70s} {time.monotonic() - t0:6.1f} s")
            current = ordered()
            fill_speedups(current)
            on_rows(current)
    return ordered()


# --------------------------------------------------------------------------------------------
# Host cost of tritonnorm in a step, through perf.hostcost's emulation (interpreter off).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HostRow:
    model: str
    variant: str
    batch: int
    size: int
    norm_modules: int  # converted norm modules in the model
    norm_calls: int  # per step: forward calls + backward nodes
    launches: int  # per step: cuLaunchKernelEx calls counted by the stub driver
    host_us: float  # per step, CPU time inside tritonnorm (forward + backward), median step
    forward_us: float
    backward_us: float
    us_per_call: float
    recompiles: int  # compile-stub calls after the warm-up steps (0: every plan reused)
    status: str = "ok"


class _NormTimer:
    """CPU time inside each converted norm module's forward (pre-hook to hook) and inside the
    backward node of its output (node pre-hook to hook), counted per call."""

    def __init__(self, model):
        self.modules = [m for m in model.modules() if _is_norm(m)]
        self.forward_us: list[float] = []
        self.backward_us: list[float] = []
        self._handles = []
        for m in self.modules:
            self._handles.append(m.register_forward_pre_hook(self._enter))
            self._handles.append(m.register_forward_hook(self._leave))

    def _enter(self, module, args):
        module._tn_t0 = time.process_time()

    def _leave(self, module, args, output):
        self.forward_us.append((time.process_time() - module._tn_t0) * 1e6)
        node = getattr(output, "grad_fn", None)
        if node is not None:
            start = []
            node.register_prehook(lambda grads: start.append(time.process_time()))
            node.register_hook(
                lambda gi, go: self.backward_us.append((time.process_time() - start[-1]) * 1e6)
            )

    def reset(self):
        self.forward_us.clear()
        self.backward_us.clear()


def _is_norm(module) -> bool:
    """A module that runs tritonnorm's norm (not a block that only calls one)."""
    from tritonnorm.modules import NORM_MIXINS

    return isinstance(module, NORM_MIXINS)


def host_emulation(model_names: list[str], steps: int = 7, warmup: int = 2) -> list[HostRow]:
    """Per model and converted variant: tritonnorm's norm calls, launches and CPU time per
    training step, on perf.hostcost's emulated launch path (this process: interpreter off)."""
    from perf import hostcost

    emu = hostcost.install()
    hostcost.route_cpu_tensors_to_triton()
    torch.set_num_threads(1)  # process_time counts every thread; the convs' too otherwise
    found = []
    for name in model_names:
        spec = MODELS[name]
        for vname in ("tn", "tn_fused"):
            variant = VARIANTS[vname]
            row_of = functools.partial(HostRow, name, vname, spec.tiny.batch, spec.tiny.size)
            try:
                torch.manual_seed(SEED)
                model = prepare(spec.build(True).to(memory_format=memory_format(spec)), variant)
            except ImportError as e:
                found.append(row_of(0, 0, 0, 0, 0, 0, 0, 0, status=f"skipped: {e}"[:300]))
                break
            # torch.empty input: the norms' kernels never run, their outputs are never written
            batch = make_batch(spec, spec.tiny, "cpu", torch.float32)
            batch = batch._replace(x=torch.empty_like(batch.x))
            timer = _NormTimer(model)
            step = step_function(spec, model, sgd(model), batch, torch.bfloat16)
            for _ in range(warmup):
                step()
            compiles = emu.compiles
            per_step = []
            for _ in range(steps):
                timer.reset()
                launched = emu.driver_launches()
                step()
                per_step.append((sum(timer.forward_us) + sum(timer.backward_us),
                                 sum(timer.forward_us), sum(timer.backward_us),
                                 len(timer.forward_us) + len(timer.backward_us),
                                 emu.driver_launches() - launched))  # fmt: skip
            median = sorted(per_step)[len(per_step) // 2]
            total, fwd, bwd, calls, launches = median
            found.append(row_of(len(timer.modules), calls, launches, round(total, 1),
                                round(fwd, 1), round(bwd, 1), round(total / max(calls, 1), 1),
                                emu.compiles - compiles))  # fmt: skip
    return found


def host_emulation_subprocess(model_names: list[str], json_path: Path, steps: int = 7) -> list:
    """:func:`host_emulation` in a fresh process with the interpreter off (as
    perf.hostcost.run_subprocess); its rows, or raise with the process's error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "perf.models", "--host-emulation", "--json", str(json_path),
           "--models", ",".join(model_names), "--host-steps", str(steps)]  # fmt: skip
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return [HostRow(**r) for r in json.loads(json_path.read_text())["host"]]


def host_table(rows: list[HostRow]) -> list[str]:
    lines = ["| model | variant | norm modules | norm calls / step | Triton launches / step | "
             "host µs / step | fwd µs | bwd µs | µs / call |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.model} | {r.variant} | {r.status[:80]} |||||||")
            continue
        lines.append(f"| {r.model} | {r.variant} | {r.norm_modules} | {r.norm_calls} | "
                     f"{r.launches} | {r.host_us:.0f} | {r.forward_us:.0f} | {r.backward_us:.0f} | "
                     f"{r.us_per_call:.1f} |")  # fmt: skip
    return lines


# --------------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------------


def dry_run(model_names: list[str], out: Path, host: bool = True, host_steps: int = 7) -> dict:
    """The CPU part: the eager variants of every model at its tiny shape through the
    interpreter, checked in float64; then the host emulation in its own process. Writes
    models.csv, host.csv and models_cpu.json under ``out``; returns the JSON's content."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the dry run needs TRITON_INTERPRET=1 before tritonnorm is imported")
    out.mkdir(parents=True, exist_ok=True)
    # One thread: beside other jobs on a small CI machine, torch's thread pool spinning at its
    # barriers made each convolution up to 100x slower (measured on the 2-core machine)
    torch.set_num_threads(1)
    settings = Settings(device="cpu", tiny=True)
    t0 = time.perf_counter()
    rows = run(model_names, list(VARIANTS), settings, math.inf,
               on_rows=lambda rs: write_csv(rs, out / "models.csv"))  # fmt: skip
    result = {"mode": DRY_BANNER, "torch": torch.__version__,
              "interpreter_s": round(time.perf_counter() - t0, 1),
              "rows": [dataclasses.asdict(r) for r in rows], "host": []}  # fmt: skip
    if host:
        t1 = time.perf_counter()
        host_rows = host_emulation_subprocess(model_names, out / "host.json", host_steps)
        result["host"] = [dataclasses.asdict(r) for r in host_rows]
        result["host_s"] = round(time.perf_counter() - t1, 1)
        write_csv(host_rows, out / "host.csv")
    (out / "models_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("perf/results/models"))
    p.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated, of " + ",".join(MODELS)
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    p.add_argument("--budget-s", type=float, default=math.inf, help="seconds (GPU run)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dry-run", action="store_true", help="CPU: interpreter + host emulation")
    p.add_argument("--no-host", action="store_true", help="dry run without the emulation")
    p.add_argument("--host-steps", type=int, default=7)
    p.add_argument("--host-emulation", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    models = args.models.split(",")
    if unknown := [m for m in models if m not in MODELS]:
        p.error(f"unknown models {unknown}")
    if args.host_emulation:  # the dry run's subprocess (interpreter off)
        rows = host_emulation(models, args.host_steps)
        print("\n".join(host_table(rows)))
        args.json.write_text(json.dumps({"host": [dataclasses.asdict(r) for r in rows]}) + "\n")
        return 0
    if args.dry_run:  # before tritonnorm is imported: kernels bind to the interpreter then
        if "tritonnorm" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("tritonnorm was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
        print(DRY_BANNER)
        result = dry_run(models, args.out, host=not args.no_host, host_steps=args.host_steps)
        rows = [Row(**r) for r in result["rows"]]
        print("\n".join(markdown_table(rows)))
        print("\n".join(host_table([HostRow(**r) for r in result["host"]])))
        print(f"interpreter {result['interpreter_s']} s, emulation {result.get('host_s')} s; "
              f"out: {args.out}")  # fmt: skip
        return 1 if any(r.status.startswith(("FAIL", "ERROR")) for r in rows) else 0
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --dry-run (CPU, not a measurement)")
    settings = Settings(warmup=args.warmup, steps=args.steps)
    out = args.out

    def write(rows):
        write_csv(rows, out / "models.csv")

    rows = run(models, args.variants.split(","), settings, time.monotonic() + args.budget_s, write)
    write_plot(rows, out / "models.png", torch.cuda.get_device_name())
    print("\n".join(markdown_table(rows)))
    return 1 if any(r.status.startswith(("FAIL", "ERROR")) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
