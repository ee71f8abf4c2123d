"""Byte budgets: the Triton kernels of each op move at most the floor's passes over the input.

Counted under Triton's interpreter by ``perf/bytecount.py`` (every element loaded or stored,
masked-off elements excluded), so these tests skip on native CUDA runs. A pass is
``numel * element_size`` of the input. Traffic on input-sized tensors must be within the
budget; traffic on smaller (per-channel) tensors may add at most ``floors.NEGLIGIBLE_PASSES``.
The backward is counted alone (forward run outside the counting region). While counting, torch's
side is audited too: no aten op outside the kernels may touch a tensor the size of the input
except allocations (``empty*``) and views.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # perf/ is a directory of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

import tritonnorm as tn  # noqa: E402
from perf import floors  # noqa: E402
from perf.bytecount import (  # noqa: E402
    UnsupportedTritonError,
    count_bytes,
    interpreter_active,
    unsupported_reason,
)

pytestmark = pytest.mark.skipif(
    not interpreter_active(), reason="the byte counter needs Triton's interpreter (CPU runs)"
)
# A Triton whose interpreter internals the counter does not know: every count is skipped, with
# the reason, rather than reported wrong (perf/bytecount.py lists the signatures it knows).
counting = pytest.mark.skipif(bool(unsupported_reason()), reason=str(unsupported_reason()))

# Budgets in passes over the input (PERF.md); the floor table in perf/floors.py must agree.
BN_TRAIN_FWD, BN_EVAL_FWD, BN_BWD = 3, 2, 5
IN_FWD, IN_BWD = 2, 3  # instances of at most floors.ON_CHIP_MAX_ELEMENTS elements

# (2, 3, 64, 128): a BN channel of 16384 elements, held on chip by the forward.
# (2, 3, 64, 64): instances of 4096 elements, held on chip by both kernels in both layouts
# (the backward holds at most 8192 fp32 values per program: kernels/config.py).
# (5, 3, 64, 128): BN channels of 40960 elements, above the on-chip limit: the split reduction.
BN_SHAPES = [(2, 3, 64, 128), (5, 3, 64, 128)]
IN_SHAPES = [(2, 3, 64, 64)]
LAYOUTS = ["contiguous", "channels_last"]
DTYPES = [torch.float32, torch.bfloat16]


def test_budgets_match_the_floor_table():
    assert floors.floor_passes("fwd", None) == BN_TRAIN_FWD
    assert floors.floor_passes("eval", None) == BN_EVAL_FWD
    assert floors.floor_passes("bwd", None) == BN_BWD
    assert floors.floor_passes("fwd", 4096) == IN_FWD
    assert floors.floor_passes("bwd", 4096) == IN_BWD
    # LayerNorm2d / RMSNorm2d: a row is one position's channels, on chip up to the kernels' limit
    assert floors.floor_passes("fwd", 8192) == IN_FWD and floors.floor_passes("bwd", 8192) == IN_BWD
    assert floors.POSITION_STATS == {"layer_norm_2d": 2, "rms_norm_2d": 1}


# --- the counter itself ------------------------------------------------------------------------


@triton.jit
def _masked_copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


@counting
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
def test_counter_is_exact_on_a_masked_copy(dtype):
    n, block = 1000, 128  # 8 programs cover 1024 slots: 24 are masked off and must not count
    src = torch.arange(n).to(dtype)
    dst = torch.zeros_like(src)
    with count_bytes() as t:
        _masked_copy_kernel[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block)
    assert torch.equal(dst, src)
    size = src.element_size()
    assert (t.loaded, t.stored, t.total) == (n * size, n * size, 2 * n * size)
    assert t.launches == ["_masked_copy_kernel"]
    assert t.by_kernel() == {"_masked_copy_kernel": (n * size, n * size)}
    assert t.split(min_numel=n) == (2 * n * size, 0)


def test_counter_refuses_internals_it_does_not_know(monkeypatch):
    from triton.runtime.interpreter import InterpreterBuilder

    monkeypatch.delattr(InterpreterBuilder, "create_masked_store")
    with pytest.raises(UnsupportedTritonError, match="cannot count bytes"), count_bytes():
        pass


def test_counter_refuses_changed_signatures(monkeypatch):
    from triton.runtime.interpreter import InterpreterBuilder

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", lambda self, ptrs, mask: None)
    with pytest.raises(UnsupportedTritonError, match="cannot count bytes"), count_bytes():
        pass
    assert "create_masked_load" in unsupported_reason()  # what the budget tests skip with


@counting
def test_audit_flags_torch_side_copies_but_not_views():
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    with count_bytes(audit_min_numel=x.numel()) as t:
        x.permute(0, 2, 3, 1).reshape(-1, 3)  # views
        torch.empty_like(x)
        x.contiguous()  # a full copy
    assert len(t.torch_ops) >= 1 and all(
        "contiguous" in s or "clone" in s or "copy" in s for s in t.torch_ops
    ), t.torch_ops


# --- the budgets -------------------------------------------------------------------------------


def _inputs(shape, layout, dtype, grad):
    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[layout]
    x = (torch.randn(shape) * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
    c = shape[1]
    w = (1 + 0.1 * torch.randn(c)).to(dtype)
    b = (0.1 * torch.randn(c)).to(dtype)
    if grad:
        for t in (x, w, b):
            t.requires_grad_(True)
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    dy = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    return x, w, b, rm, rv, dy


def _assert_within(traffic, x, budget, what):
    numel = x.numel()
    pass_bytes = numel * x.element_size()
    big, small = traffic.split(numel)
    detail = (
        f"{what}: {big / pass_bytes:.4f} passes on input-sized tensors (budget {budget}), "
        f"{small / pass_bytes:.4f} on smaller ones (allowed {floors.NEGLIGIBLE_PASSES})\n"
        + traffic.describe(numel)
    )
    assert traffic.launches, f"{what}: no Triton kernel was counted"
    assert floors.within_floor(big, small, pass_bytes, budget), detail
    assert traffic.passes(pass_bytes) <= budget + floors.NEGLIGIBLE_PASSES, detail
    assert not traffic.torch_ops, f"{what}: torch-side full-size work: {traffic.torch_ops}"


def _bn_train(x, w, b, rm, rv):
    return tn.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)


def _in(x, w, b, rm, rv):
    return tn.instance_norm(x, None, None, w, b, use_input_stats=True, eps=1e-5)


@counting
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_train_budget(shape, layout, dtype):
    x, w, b, rm, rv, dy = _inputs(shape, layout, dtype, grad=True)
    with count_bytes(audit_min_numel=x.numel()) as fwd:
        y = _bn_train(x, w, b, rm, rv)
    _assert_within(fwd, x, BN_TRAIN_FWD, "batch_norm training forward")
    with count_bytes(audit_min_numel=x.numel()) as bwd:
        y.backward(dy)
    _assert_within(bwd, x, BN_BWD, "batch_norm backward")
    assert x.grad is not None and w.grad is not None and b.grad is not None


@counting
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_eval_budget(shape, layout, dtype):
    x, w, b, rm, rv, _ = _inputs(shape, layout, dtype, grad=False)
    rv = rv + torch.rand_like(rv)
    with torch.no_grad(), count_bytes(audit_min_numel=x.numel()) as fwd:
        tn.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5)
    _assert_within(fwd, x, BN_EVAL_FWD, "batch_norm eval forward")


@counting
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", IN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_instance_norm_budget(shape, layout, dtype):
    assert math.prod(shape[2:]) == 4096 and floors.fits_on_chip(4096)
    x, w, b, rm, rv, dy = _inputs(shape, layout, dtype, grad=True)
    with count_bytes(audit_min_numel=x.numel()) as fwd:
        y = _in(x, w, b, rm, rv)
    _assert_within(fwd, x, IN_FWD, "instance_norm forward")
    with count_bytes(audit_min_numel=x.numel()) as bwd:
        y.backward(dy)
    _assert_within(bwd, x, IN_BWD, "instance_norm backward")
    assert x.grad is not None and w.grad is not None and b.grad is not None


# GroupNorm, as instance_norm: a group (C/G channels x spatial) that fits a program is read once
# forward and x, dy once backward; a larger one (few groups, as a batch-1 VAE decoder's) is split
# across programs like a BatchNorm channel (floors 3 / 5).
GN_CASES = {
    "512-element groups, 2 channels each": ((2, 64, 16, 16), 32, IN_FWD, IN_BWD),
    "4096-element groups, 4 channels each": ((2, 32, 32, 32), 8, IN_FWD, IN_BWD),
    "40960-element groups, split": ((1, 4, 128, 160), 2, BN_TRAIN_FWD, BN_BWD),
}


@counting
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(GN_CASES))
def test_group_norm_budget(case, layout, dtype):
    shape, groups, fwd_budget, bwd_budget = GN_CASES[case]
    group_numel = shape[1] // groups * math.prod(shape[2:])
    assert fwd_budget == floors.floor_passes("fwd", group_numel)
    assert bwd_budget == floors.floor_passes("bwd", group_numel)
    x, w, b, _, _, dy = _inputs(shape, layout, dtype, grad=True)
    with count_bytes(audit_min_numel=x.numel()) as fwd:
        y = tn.group_norm(x, groups, w, b, eps=1e-5)
    _assert_within(fwd, x, fwd_budget, f"group_norm forward ({case})")
    with count_bytes(audit_min_numel=x.numel()) as bwd:
        y.backward(dy)
    _assert_within(bwd, x, bwd_budget, f"group_norm backward ({case})")
    assert x.grad is not None and w.grad is not None and b.grad is not None


# LayerNorm2d / RMSNorm2d: statistics across the C channels at each position. A program holds
# whole channel vectors, so each position's row is read once: forward 2 passes (read x, write y),
# backward 3 (read x, dy, write dx), whatever C up to the kernels' limit. Besides the input-sized
# tensors: the per-position statistics (written once forward, read once backward; 1 / C of the
# elements, floors.POSITION_STATS), and within NEGLIGIBLE_PASSES the per-channel rest (weight,
# bias, the partial sums of dweight / dbias and their finalize), its re-reads by every program
# counted once per launch (floors.L2_RESIDENT_BYTES). Shapes: enough positions that the partial
# sums stay small (2 x C sums per program of the backward, written and read: 8 / positions of a
# bf16 pass per program; the interpreter aims at 4 programs, a GPU at 4 per SM, capped by
# config.POSITION_PARTIAL_PASSES).
POSITION_FWD, POSITION_BWD = IN_FWD, IN_BWD
POSITION_SHAPES = {96: (2, 96, 32, 32), 4096: (1, 4096, 16, 16)}  # 2048 and 256 positions
# C = 96: every norm, layout and dtype. C = 4096 interprets in ~6 s a case; its tiles and split
# (config.position_configs) are the same for float32 and bfloat16 (float32 statistics either
# way), and bfloat16 is the tighter budget (the same per-channel rest against half the bytes a
# pass): LayerNorm (the most partial sums: dweight and dbias) in bfloat16 in both layouts,
# RMSNorm (the same kernels, CENTRED=False) in one layout per dtype.
POSITION_CASES = [
    (norm, c, layout, dtype)
    for norm in ("layer_norm_2d", "rms_norm_2d")
    for c in POSITION_SHAPES
    for layout in LAYOUTS
    for dtype in DTYPES
    if c < 4096
    or (norm == "layer_norm_2d" and dtype == torch.bfloat16)
    or (norm == "rms_norm_2d" and (layout == "contiguous") == (dtype == torch.float32))
]
POSITION_NORMS = {
    "layer_norm_2d": lambda x, w, b: tn.layer_norm_2d(x, w, b),
    "rms_norm_2d": lambda x, w, b: tn.rms_norm_2d(x, w),
}


def _assert_position_budget(traffic, x, norm, budget, what):
    """Input-sized traffic within ``budget`` passes; statistics and the per-channel rest within
    the statistics' floor plus NEGLIGIBLE_PASSES (the per-channel loads counted once per
    launch)."""
    c = x.shape[1]
    numel, pass_bytes = x.numel(), x.numel() * x.element_size()
    acc_bytes = 8 if x.dtype == torch.float64 else 4
    stats_floor = floors.position_stats_passes(floors.POSITION_STATS[norm], c, x.element_size(),
                                               acc_bytes)  # fmt: skip
    t = traffic.tiers(numel, stats_numel=numel // c, resident_bytes=floors.L2_RESIDENT_BYTES)
    rest = t["stats"] + t["small"]
    detail = (
        f"{what}: {t['input'] / pass_bytes:.4f} passes on input-sized tensors (budget {budget}), "
        f"statistics {t['stats'] / pass_bytes:.4f} (floor {stats_floor:.4f}), per-channel "
        f"{t['small'] / pass_bytes:.4f} ({t['small_raw'] / pass_bytes:.4f} with every re-read; "
        f"allowed {floors.NEGLIGIBLE_PASSES})\n" + traffic.describe(numel)
    )
    assert traffic.launches, f"{what}: no Triton kernel was counted"
    assert all(k.startswith(("_position_norm", "_norm_grad_finalize")) for k in traffic.launches)
    small_passes = floors.NEGLIGIBLE_PASSES + stats_floor
    assert floors.within_floor(t["input"], rest, pass_bytes, budget, small_passes), detail
    assert not traffic.torch_ops, f"{what}: torch-side full-size work: {traffic.torch_ops}"


def _position_forward_backward(norm, x, w, b, dy, backward_what: str):
    """The byte counts of the norm's forward and backward, each checked against its budget."""
    with count_bytes(audit_min_numel=x.numel()) as fwd:
        y = POSITION_NORMS[norm](x, w, b)
    _assert_position_budget(fwd, x, norm, POSITION_FWD, f"{norm} forward")
    with count_bytes(audit_min_numel=x.numel()) as bwd:
        y.backward(dy)
    _assert_position_budget(bwd, x, norm, POSITION_BWD, f"{norm} {backward_what}")
    return fwd, bwd


@counting
@pytest.mark.parametrize("norm, channels, layout, dtype", POSITION_CASES, ids=str)
def test_position_norm_budget(norm, channels, layout, dtype):
    shape = POSITION_SHAPES[channels]
    assert floors.floor_passes("fwd", channels) == POSITION_FWD
    assert floors.floor_passes("bwd", channels) == POSITION_BWD
    x, w, b, _, _, dy = _inputs(shape, layout, dtype, grad=True)
    fwd, bwd = _position_forward_backward(norm, x, w, b, dy, "backward")
    assert x.grad is not None and w.grad is not None
    assert fwd.launches == ["_position_norm_forward_kernel"]
    # dx and the partial sums of dweight (and dbias) in one pass, then their finalize
    assert bwd.launches == ["_position_norm_backward_kernel", "_norm_grad_finalize_kernel"]


@counting
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("norm", list(POSITION_NORMS))
def test_position_norm_budget_without_affine_parameters(norm, layout):
    # dx alone: one launch, one program per tile, no partial sums
    x, _, _, _, _, dy = _inputs(POSITION_SHAPES[96], layout, torch.bfloat16, grad=True)
    _, bwd = _position_forward_backward(norm, x, None, None, dy, "backward, dx only")
    assert bwd.launches == ["_position_norm_backward_kernel"]
