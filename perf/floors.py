"""Byte floors, in passes over the input tensor (PERF.md), in one table and one rule.

A pass is ``numel * element_size`` bytes of the input. Per-channel vectors (statistics, weight,
bias, running stats, partial sums) are not part of the floor: they are negligible next to a pass
and must not grow with the number of elements.
"""

from __future__ import annotations

# A reduction group (an instance for instance_norm, a row for layer/group norm) "fits on chip"
# when one SM can hold it: 32768 fp32 values are 128 KB, within an H100 SM's registers (256 KB)
# or shared memory (228 KB). Then the forward reads x once and the backward reads x and dy once.
# This is the physical floor, not what tritonnorm's kernels reach: they hold at most 16384 fp32
# values per program in the forward and 8192 in the backward without spilling
# (tritonnorm/kernels/config.py), and are measured against this floor all the same.
ON_CHIP_MAX_ELEMENTS = 32768

# Traffic on tensors smaller than the input (statistics, weight, bias, running stats, partial
# sums, and each program's reload of its channels' coefficients: cache hits on a GPU) may add at
# most this many passes on the small shapes the budgets are checked on: "negligible next to E*s"
# (PERF.md). Traffic on input-sized tensors gets no allowance: it must be within the floor, and
# one extra read of x is a whole pass, far above this.
NEGLIGIBLE_PASSES = 0.05

# stage -> (passes when the reduction group stays on chip, passes when it is streamed twice)
#   fwd : read x for the statistics [, read x again], write y
#   bwd : read x, dy for the per-group sums [, read x, dy again], write dx
#   eval: read x, write y (statistics are given)
# The rule: every input-sized tensor a pass needs is read in that pass; each input-sized output
# is written once. The fused epilogue y = act((x_hat * w + b) * scale + shift + residual) adds
# nothing with per-sample scale and shift ((N, C): per-channel traffic) and an elementwise
# activation (its derivative is recomputed from x where dy is read). An input-sized residual r,
# with an activation, is a tensor of its own ("+residual" stages):
#   fwd+residual: read x for the statistics [, read x again], read r, write y
#   bwd+residual: read x, dy, r for the sums (r: the pre-activation z = x_hat*w + b + r, whose
#                 sign / derivative gates dy) [, read x, dy, r again], write dx, dr
FLOOR_PASSES: dict[str, tuple[int, int]] = {
    "fwd": (2, 3),
    "bwd": (3, 5),
    "eval": (2, 2),
    "fwd+residual": (3, 4),
    "bwd+residual": (5, 8),
}


def fits_on_chip(group_numel: int | None) -> bool:
    """Whether one reduction group of ``group_numel`` elements can stay on chip.

    ``None`` means the op reduces over a group that is never held on chip by design (batch_norm
    reduces each channel over N*HW elements across many programs), so it is streamed.
    """
    return group_numel is not None and group_numel <= ON_CHIP_MAX_ELEMENTS


def floor_passes(stage: str, group_numel: int | None) -> int:
    """Passes over the input at the floor for one stage (a ``FLOOR_PASSES`` key)."""
    on_chip, streamed = FLOOR_PASSES[stage]
    return on_chip if fits_on_chip(group_numel) else streamed


def within_floor(big_bytes: int, small_bytes: int, pass_bytes: int, floor: int,
                 small_passes: float = NEGLIGIBLE_PASSES) -> bool:  # fmt: skip
    """Whether counted traffic meets a floor: input-sized traffic at most ``floor`` passes, the
    rest at most ``small_passes`` (NEGLIGIBLE_PASSES, plus what a per-position norm's statistics
    need: ``position_stats_passes``)."""
    return big_bytes <= floor * pass_bytes and small_bytes <= small_passes * pass_bytes


# LayerNorm2d / RMSNorm2d: statistics across the C channels at each (sample, position). A row of
# the floor table is a position's C channels (on chip: C <= ON_CHIP_MAX_ELEMENTS), so the floors
# are "fwd" 2 (read x, write y) and "bwd" 3 (read x, dy, write dx). Unlike per-channel vectors the
# statistics grow with the input: one value per position, 1 / C of the elements, in the
# statistics' dtype (float32; float64 for float64 input). The forward writes them for the
# backward, which reads them: LayerNorm's mean and rstd (2), RMSNorm's rstd (1). With bf16 and
# C = 96 two statistics are 4.2% of a pass each way: part of the floor, not of the allowance.
POSITION_STATS = {"layer_norm_2d": 2, "rms_norm_2d": 1}
# Weight and bias (and a sample's scale and shift) are re-read by every program of the per-
# position kernels, which hold whole channel vectors for a few positions: 2 / BLOCK_S passes of
# loads (0.5 at C = 4096, 4 positions per program), L1/L2 hits on a GPU. For the DRAM floor a
# tensor of at most this many bytes is read at most once per launch (``Traffic.tiers``).
L2_RESIDENT_BYTES = 1 << 20


def position_stats_passes(stats: int, channels: int, elem_size: int, acc_bytes: int = 4) -> float:
    """Passes over the input of ``stats`` per-position statistics of ``acc_bytes`` each, written
    once (forward) or read once (backward), for ``channels`` channels of ``elem_size`` bytes."""
    return stats * acc_bytes / (channels * elem_size)
