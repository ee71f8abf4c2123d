"""Byte budgets of the fused epilogues (perf/bytecount.py, under Triton's interpreter): scale,
shift and the activation add no pass; a residual adds its read (and, in the backward, its
gradient's write and re-reads where the activation's derivative needs it). The backward is counted
alone; no torch op outside the kernels may touch an input-sized tensor.

Forward passes are at the floor. The backward of GroupNorm/InstanceNorm is on chip when a group
fits a tile (3 passes: read x, dy; write dx), else streamed (partial sums, then the apply pass: 5).
BatchNorm's backward with an epilogue is always streamed (5, or 8 with residual + ReLU)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # perf/ is a directory of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

import tritonnorm as tn  # noqa: E402
from perf.bytecount import count_bytes, interpreter_active  # noqa: E402
from perf.floors import NEGLIGIBLE_PASSES  # noqa: E402
from tritonnorm.kernels.config import forced  # noqa: E402

pytestmark = pytest.mark.skipif(
    not interpreter_active(), reason="the byte counter needs Triton's interpreter (CPU runs)"
)

SHAPE = (2, 8, 32, 32)  # groups of 2 x 1024 and BN channels of 2048 elements: on chip
N, C = SHAPE[:2]

# name -> (call(x, w, b, scale, shift, residual), on-chip forward, (on-chip, split) backward)
CASES = {
    # x read, y written: scale/shift and SiLU are free
    "gn_scale_shift_silu": (
        lambda x, w, b, sc, sh, r: tn.group_norm(x, 4, w, b, scale=sc, shift=sh, activation="silu"),
        2,
        (3, 5),  # split: sums read x, dy; apply reads x, dy, writes dx
    ),
    "adain": (
        lambda x, w, b, sc, sh, r: tn.instance_norm(x, scale=sc, shift=sh),
        2,
        (3, 5),
    ),
    # + the residual's read; backward: + its reads (z for relu') and its gradient's write
    "bn_residual_relu": (
        lambda x, w, b, sc, sh, r: tn.batch_norm(
            x, torch.zeros(C), torch.ones(C), w, b, True, residual=r, activation="relu"
        ),
        3,
        (8, 8),  # sums read x, dy, r; apply reads x, dy, r, writes dx, dr
    ),
    "bn_eval_scale_shift_gelu": (
        lambda x, w, b, sc, sh, r: tn.batch_norm(
            x, torch.zeros(C), torch.ones(C), w, b, False, scale=sc, shift=sh, activation="gelu"
        ),
        2,
        (5, 5),
    ),
}


def _inputs():
    x = torch.randn(SHAPE, requires_grad=True)
    w, b = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
    sc, sh = torch.randn(N, C, requires_grad=True), torch.randn(N, C, requires_grad=True)
    r = torch.randn(SHAPE, requires_grad=True)
    return x, w, b, sc, sh, r


def _check(traffic, budget, what):
    pass_bytes = torch.Size(SHAPE).numel() * 4
    big, small = traffic.split(torch.Size(SHAPE).numel())
    detail = traffic.describe(torch.Size(SHAPE).numel())
    assert not traffic.torch_ops, f"{what}: torch-side full-size ops\n{detail}"
    assert big / pass_bytes <= budget, f"{what}: {big / pass_bytes:.2f} > {budget}\n{detail}"
    assert small / pass_bytes <= NEGLIGIBLE_PASSES, f"{what}: per-channel traffic\n{detail}"


@pytest.mark.parametrize("split", [False, True], ids=["on_chip", "split"])
@pytest.mark.parametrize("case", list(CASES))
def test_epilogue_byte_budget(case, split):
    call, fwd_passes, bwd_passes = CASES[case]
    # The split forward reads x once more (statistics, then the apply pass); eval has no
    # statistics pass.
    fwd_budget = fwd_passes + (1 if split and "eval" not in case else 0)
    inputs = _inputs()
    with forced(fused=False, split=3) if split else forced():
        with count_bytes(audit_min_numel=torch.Size(SHAPE).numel()) as traffic:
            y = call(*inputs)
        _check(traffic, fwd_budget, "forward")
        dy = torch.randn_like(y)
        with count_bytes(audit_min_numel=torch.Size(SHAPE).numel()) as traffic:
            y.backward(dy)
        _check(traffic, bwd_passes[split], "backward")


# LayerNorm2d / RMSNorm2d with an epilogue: the per-position kernels hold whole channel vectors,
# so every stage is on chip. Scale, shift and the activation add nothing; a residual adds its
# read (forward) and, where the activation's derivative needs the pre-activation, its read and
# its gradient's write (backward; without an activation dresidual is dy itself: no kernel
# output). Besides: the per-position statistics (floors.POSITION_STATS, 1 / C of the elements)
# and, within NEGLIGIBLE_PASSES, the per-channel and per-sample rest (scale and shift re-read by
# every program counted once per launch; dscale / dshift partials one row per sample).
POSITION_SHAPE = (2, 128, 32, 16)
POSITION_CASES = {
    # name -> (call, norm, forward passes, backward passes)
    "ln2d_scale_shift_gelu": (
        lambda x, w, b, sc, sh, r: tn.layer_norm_2d(x, w, b, scale=sc, shift=sh, activation="gelu"),
        "layer_norm_2d", 2, 3,
    ),
    "rms2d_scale_shift_silu": (
        lambda x, w, b, sc, sh, r: tn.rms_norm_2d(x, w, scale=sc, shift=sh, activation="silu"),
        "rms_norm_2d", 2, 3,
    ),
    # ReLU's derivative read off the output y (written anyway): reads x, dy, y; writes dx, dr
    "ln2d_residual_relu": (
        lambda x, w, b, sc, sh, r: tn.layer_norm_2d(x, w, b, residual=r, activation="relu"),
        "layer_norm_2d", 3, 5,
    ),
    "ln2d_scale_shift_residual_gelu": (
        lambda x, w, b, sc, sh, r: tn.layer_norm_2d(
            x, w, b, scale=sc, shift=sh, residual=r, activation="gelu"
        ),
        "layer_norm_2d", 3, 5,
    ),
    "rms2d_residual": (  # no activation: dresidual = dy
        lambda x, w, b, sc, sh, r: tn.rms_norm_2d(x, w, residual=r),
        "rms_norm_2d", 3, 3,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(POSITION_CASES))
def test_position_norm_epilogue_byte_budget(case):
    from perf import floors

    call, norm, fwd_passes, bwd_passes = POSITION_CASES[case]
    n, c = POSITION_SHAPE[:2]
    numel = torch.Size(POSITION_SHAPE).numel()
    x = torch.randn(POSITION_SHAPE, requires_grad=True)
    w, b = torch.randn(c, requires_grad=True), torch.randn(c, requires_grad=True)
    sc, sh = torch.randn(n, c, requires_grad=True), torch.randn(n, c, requires_grad=True)
    r = torch.randn(POSITION_SHAPE, requires_grad=True)
    stats = floors.position_stats_passes(floors.POSITION_STATS[norm], c, 4)
    pass_bytes = numel * 4

    def check(traffic, budget, what):
        t = traffic.tiers(numel, stats_numel=numel // c, resident_bytes=floors.L2_RESIDENT_BYTES)
        detail = f"{case} {what}: {t}\n{traffic.describe(numel)}"
        assert not traffic.torch_ops, f"torch-side full-size ops\n{detail}"
        assert t["input"] / pass_bytes <= budget, detail
        assert (t["stats"] + t["small"]) / pass_bytes <= stats + NEGLIGIBLE_PASSES, detail

    with count_bytes(audit_min_numel=numel) as traffic:
        y = call(x, w, b, sc, sh, r)
    check(traffic, fwd_passes, "forward")
    assert traffic.launches == ["_position_norm_forward_kernel"]
    dy = torch.randn_like(y)
    used = [t for t in (x, w, b, sc, sh, r) if t is not None and _reaches(y, t)]
    # autograd.grad: no accumulation into .grad (which copies dy where dresidual is dy itself)
    with count_bytes(audit_min_numel=numel) as traffic:
        grads = torch.autograd.grad(y, used, dy)
    check(traffic, bwd_passes, "backward")
    assert traffic.launches == ["_position_norm_backward_kernel", "_norm_grad_finalize_kernel"]
    assert len(grads) == len(used) and all(g is not None for g in grads)


def _reaches(y, t) -> bool:
    """Whether ``t`` is among the leaves ``y`` was computed from."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if getattr(fn, "variable", None) is t:
            return True
        todo += [f for f, _ in fn.next_functions]
    return False
