"""Shape classes (PERF.md "Shapes that matter"), as (N, C, *spatial) tuples.

Each class has a full list and a quick subset (``--quick``). The CPU mode runs the Triton
interpreter: ``CPU`` holds shapes on both sides of the on-chip limits (what the byte count is
about), ``DRY_RUN`` tiny stand-ins that keep ``python -m perf.gpu --dry-run`` short.
"""

from __future__ import annotations

Shape = tuple[int, ...]

# ResNet-50's BatchNorm2d inputs (C, H=W) at two batch sizes.
_RESNET50 = [
    (64, 112),
    (64, 56),
    (256, 56),
    (128, 28),
    (512, 28),
    (256, 14),
    (1024, 14),
    (512, 7),
    (2048, 7),
]

FULL: dict[str, list[Shape]] = {
    "resnet50_bn": [(32, c, hw, hw) for c, hw in _RESNET50]
    + [(256, 64, 112, 112), (256, 256, 56, 56), (256, 2048, 7, 7)],
    # small C, huge spatial: eager launches one block per channel here
    "small_c_bn": [(16, 3, 512, 512), (8, 4, 512, 512), (32, 6, 512, 512), (16, 8, 512, 512)],
    "style_in": [
        (1, 32, 1024, 1024),
        (4, 64, 512, 512),
        (8, 128, 256, 256),
        (16, 256, 256, 256),
        (1, 128, 1024, 1024),
    ],
    "medical3d_in": [(2, 32, 128, 128, 128), (2, 128, 128, 128, 128), (2, 320, 128, 128, 128)],
    # GAN / diffusion GroupNorm, 32 groups: UNet blocks at batch 1..32, then a batch-1 VAE
    # decoder at 512x512 (few, huge groups: the split reduction)
    "diffusion_gn": [
        (1, 320, 64, 64),
        (8, 128, 128, 128),
        (16, 320, 64, 64),
        (32, 640, 32, 32),
        (32, 1280, 8, 8),
        (1, 128, 512, 512),
        (1, 512, 512, 512),
    ],
    # ConvNeXt's LayerNorm2d (statistics across the channels at each position): ConvNeXt-T's
    # four stages at batch 32 (the downsampling layers' norms; the blocks' run channels-last),
    # ConvNeXt-L's last stage, and stage 1 at batch 128 (77 MB in bf16: bandwidth, not launches)
    "convnext_ln": [
        (32, 96, 56, 56),
        (32, 192, 28, 28),
        (32, 384, 14, 14),
        (32, 768, 7, 7),
        (32, 1536, 7, 7),
        (128, 96, 56, 56),
    ],
}

QUICK: dict[str, list[Shape]] = {
    "resnet50_bn": [(32, 256, 56, 56)],
    "small_c_bn": [(32, 6, 512, 512)],
    "style_in": [(4, 64, 512, 512)],
    "medical3d_in": [(2, 32, 128, 128, 128)],
    "diffusion_gn": [(16, 320, 64, 64), (1, 128, 512, 512)],
    "convnext_ln": [(32, 96, 56, 56), (32, 768, 7, 7)],
}

# BN: channels of 16384 elements (can be normalised on chip), then 40960 (above the on-chip
# limit: the split reduction). IN: instances of 4096 elements (on chip in both kernels and
# layouts), then 40960 (streamed, floors 3/5).
CPU: dict[str, list[Shape]] = {
    "resnet50_bn": [(2, 3, 64, 128), (5, 3, 64, 128)],
    "style_in": [(2, 3, 64, 64), (2, 3, 160, 256)],
    "diffusion_gn": [(2, 64, 32, 32), (2, 8, 160, 256)],  # groups of 2 x 1024, 1 x 40960
    # 96 channels over 2048 positions; 1536 channels (BLOCK_C 2048, 8 positions a program)
    "convnext_ln": [(2, 96, 32, 32), (1, 1536, 16, 16)],
}

# Tiny stand-ins: they exercise the plumbing on a CPU, they measure nothing.
DRY_RUN: dict[str, list[Shape]] = {
    "resnet50_bn": [(2, 16, 8, 8)],
    "style_in": [(1, 4, 16, 16)],
    "diffusion_gn": [(2, 64, 4, 4)],
    "convnext_ln": [(2, 64, 16, 16)],  # enough positions and channels for the byte count
}

SETS = {"full": FULL, "quick": QUICK, "cpu": CPU, "dry-run": DRY_RUN}


def shapes_for(shape_set: str, classes: tuple[str, ...]) -> list[tuple[str, Shape]]:
    """(class, shape) pairs of ``shape_set`` for the given classes, in table order."""
    table = SETS[shape_set]
    return [(cls, s) for cls in classes for s in table.get(cls, [])]


def shape_str(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)
