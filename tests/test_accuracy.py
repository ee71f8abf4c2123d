"""Numerical quality beyond "matches torch on randn": a large common offset (cancellation), long
reductions (~1e6 values; GN's long groups), NaN containment (in its channel / instance / (sample,
group)), bitwise determinism, and gradcheck in float64 (channels_last), for BatchNorm,
InstanceNorm and GroupNorm (LayerNorm2d's and RMSNorm2d's: tests/test_channel_norms.py; their
determinism here)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from helpers import kernel_path, paths, run_norm
from norms import CHANNEL_NORMS, NORMS, norm_params
from tolerances import assert_bitwise_equal, assert_close_to_reference

import tritonnorm as tn

ULP_1E4 = 2.0**-10  # spacing of float32 numbers in [8192, 16384)


def _bn_stats(x, path, **kw):
    """tn.batch_norm with momentum=1: the buffers then hold the batch mean and unbiased var."""
    C = x.shape[1]
    rm = torch.zeros(C, device=x.device, dtype=torch.float32)
    rv = torch.ones(C, device=x.device, dtype=torch.float32)
    with kernel_path(path, **kw):
        y = tn.batch_norm(x, rm, rv, training=True, momentum=1.0)
    return y, rm, rv


def _in_stats(x, path, **kw):
    C = x.shape[1]
    rm = torch.zeros(C, device=x.device, dtype=torch.float32)
    rv = torch.ones(C, device=x.device, dtype=torch.float32)
    with kernel_path(path, **kw):
        y = tn.instance_norm(x, rm, rv, momentum=1.0)
    return y, rm, rv


def _check_stats(y, rm, rv, x, reduce_dims, *, mean_atol, var_rtol, y_atol, instance=False):
    """Compare with float64 statistics of the very same (float32) values."""
    x64 = x.double()
    if instance:  # per-instance stats, buffers hold their batch average
        mean = x64.mean(reduce_dims, keepdim=True)
        var_b = x64.var(reduce_dims, unbiased=False, keepdim=True)
        ref_rm = mean.flatten(1).mean(0)
        ref_rv = x64.var(reduce_dims, unbiased=True).mean(0)
    else:
        mean = x64.mean(reduce_dims, keepdim=True)
        var_b = x64.var(reduce_dims, unbiased=False, keepdim=True)
        ref_rm = mean.flatten()
        ref_rv = x64.var(reduce_dims, unbiased=True).flatten()
    ref_y = (x64 - mean) / torch.sqrt(var_b + 1e-5)
    mean_err = (rm.double() - ref_rm).abs().max().item()
    var_err = ((rv.double() - ref_rv) / ref_rv).abs().max().item()
    y_err = (y.double() - ref_y).abs().max().item()
    assert mean_err <= mean_atol, f"mean abs error {mean_err:.3e} > {mean_atol:.3e}"
    assert var_err <= var_rtol, f"variance relative error {var_err:.3e} > {var_rtol:.3e}"
    assert y_err <= y_atol, f"output abs error {y_err:.3e} > {y_atol:.3e}"


# --------------------------------------------------------------------------------------------
# Large offset: x = 1e4 + randn in float32. E[x^2] - E[x]^2 in float32 loses everything here
# (1e8 has a float32 spacing of 8, the variance is ~1); Welford/Chan keeps it. The float32 mean
# itself can only be as good as the float32 spacing at 1e4 (~1e-3), and the output inherits that
# error divided by std (~1): so "to float32 rounding" means a few ulps of 1e4 for mean and output,
# and a variance good to ~1e-4 relative (the Chan combination of partial means, each off by
# half an ulp of 1e4, is what limits it).
OFFSET_MEAN_ATOL = 4 * ULP_1E4
OFFSET_VAR_RTOL = 1e-3
OFFSET_Y_ATOL = 8 * ULP_1E4


@pytest.mark.parametrize("path", paths("auto", "fused", "split"))
def test_large_offset_batch_norm(device, path):
    x = (1e4 + torch.randn(4, 3, 256, dtype=torch.float64, device=device)).float()
    y, rm, rv = _bn_stats(x, path)
    _check_stats(
        y,
        rm,
        rv,
        x,
        (0, 2),
        mean_atol=OFFSET_MEAN_ATOL,
        var_rtol=OFFSET_VAR_RTOL,
        y_atol=OFFSET_Y_ATOL,
    )


@pytest.mark.parametrize("path", paths("auto", "fused", "split"))
def test_large_offset_instance_norm(device, path):
    x = (1e4 + torch.randn(2, 3, 16, 32, dtype=torch.float64, device=device)).float()
    y, rm, rv = _in_stats(x, path)
    _check_stats(
        y,
        rm,
        rv,
        x,
        (2, 3),
        mean_atol=OFFSET_MEAN_ATOL,
        var_rtol=OFFSET_VAR_RTOL,
        y_atol=OFFSET_Y_ATOL,
        instance=True,
    )


@pytest.mark.parametrize("path", paths("auto", "fused", "split"))
@pytest.mark.parametrize("groups", [1, 3, 6], ids=["1group", "3groups", "6groups"])
def test_large_offset_group_norm(device, groups, path):
    # GN has no running statistics: the output, normalised with the group's mean and biased
    # variance, carries the statistics' error; same bound as BN's and IN's outputs.
    x = (1e4 + torch.randn(2, 6, 8, 16, dtype=torch.float64, device=device)).float()
    with kernel_path(path):
        y = tn.group_norm(x, groups)
    ref = F.group_norm(x.double(), groups)
    err = (y.double() - ref).abs().max().item()
    assert err <= OFFSET_Y_ATOL, f"output abs error {err:.3e} > {OFFSET_Y_ATOL:.3e}"


@pytest.mark.parametrize("path", ["fused", "split", "lanes"])
@pytest.mark.parametrize("norm", norm_params(["bn-train-nobuf", "in", "gn-half"]))
def test_large_offset_gradients(device, norm, path):
    # The backward re-centres with the saved mean: same cancellation, same bound (relative to the
    # gradient's scale), checked against float64 torch on the same values.
    # GN: 3 groups of 2 channels.
    C = 6 if norm.id == "gn-half" else 3
    x = (1e4 + torch.randn(4, C, 128, dtype=torch.float64, device=device)).float()
    g = torch.randn_like(x)
    w = torch.rand(C, device=device) + 0.5
    b = torch.randn(C, device=device)
    with kernel_path(path):
        ours = run_norm(norm.ours, x, grad_out=g, weight=w, bias=b)
    ref = run_norm(norm.torch, x, grad_out=g, weight=w, bias=b, dtype=torch.float64)
    for k in ("grad_input", "grad_weight", "grad_bias"):
        scale = max(1.0, ref[k].abs().max().item())
        err = (ours[k].double() - ref[k]).abs().max().item()
        assert err <= 8 * ULP_1E4 * scale, f"{k}: max abs error {err:.3e}"


# --------------------------------------------------------------------------------------------
# Long reductions: ~1e6 values in all, ~5e5 per channel. A sequential float32 sum would drift
# by up to n * eps * |mean| ~ 0.1 here; tile-wise Welford + Chan stays within ~1e-5.
LONG_MEAN_ATOL = 3e-5
LONG_VAR_RTOL = 3e-5
LONG_Y_ATOL = 2e-4


@pytest.mark.parametrize("path", ["auto", "split", "lanes"])
def test_long_reduction_batch_norm(device, path):
    x = (3.0 + torch.randn(4, 2, 512 * 256, dtype=torch.float64, device=device)).float()
    t0 = time.perf_counter()
    y, rm, rv = _bn_stats(x, path)
    elapsed = time.perf_counter() - t0
    print(f"batch_norm forward on {tuple(x.shape)} ({path}): {elapsed:.2f}s")
    _check_stats(
        y, rm, rv, x, (0, 2), mean_atol=LONG_MEAN_ATOL, var_rtol=LONG_VAR_RTOL, y_atol=LONG_Y_ATOL
    )


@pytest.mark.parametrize("path", ["auto", "split"])
def test_long_reduction_instance_norm(device, path):
    x = (3.0 + torch.randn(2, 2, 512, 512, dtype=torch.float64, device=device)).float()
    t0 = time.perf_counter()
    y, rm, rv = _in_stats(x, path)
    elapsed = time.perf_counter() - t0
    print(f"instance_norm forward on {tuple(x.shape)} ({path}): {elapsed:.2f}s")
    _check_stats(
        y,
        rm,
        rv,
        x,
        (2, 3),
        mean_atol=LONG_MEAN_ATOL,
        var_rtol=LONG_VAR_RTOL,
        y_atol=LONG_Y_ATOL,
        instance=True,
    )


@pytest.mark.parametrize("path", ["auto", "split"])
def test_long_reduction_group_norm(device, path):
    # 2 groups of 2 channels x 256 x 256: 131072 values per group, more than any single tile, so
    # even "auto" splits each group across programs.
    x = (3.0 + torch.randn(2, 4, 256, 256, dtype=torch.float64, device=device)).float()
    t0 = time.perf_counter()
    with kernel_path(path):
        y = tn.group_norm(x, 2)
    print(f"group_norm forward on {tuple(x.shape)} ({path}): {time.perf_counter() - t0:.2f}s")
    ref = F.group_norm(x.double(), 2)
    err = (y.double() - ref).abs().max().item()
    assert err <= LONG_Y_ATOL, f"output abs error {err:.3e} > {LONG_Y_ATOL:.3e}"


def test_long_reduction_batch_norm_backward(device):
    # The backward's two reductions (sum dy, sum dy * xhat) over ~2.6e5 values per channel.
    x = torch.randn(2, 2, 256 * 256, device=device) + 3.0
    g = torch.randn_like(x) + 0.5
    w = torch.rand(2, device=device) + 0.5
    b = torch.randn(2, device=device)
    t0 = time.perf_counter()
    ours = run_norm(tn.batch_norm, x, grad_out=g, weight=w, bias=b, training=True)
    print(f"batch_norm forward+backward on {tuple(x.shape)}: {time.perf_counter() - t0:.2f}s")
    same = run_norm(F.batch_norm, x, grad_out=g, weight=w, bias=b, training=True)
    ref = run_norm(
        F.batch_norm, x, grad_out=g, weight=w, bias=b, training=True, dtype=torch.float64
    )
    # Sums of 1.3e5 terms: allow 1e-4 of the scale (fp32 table is for short reductions).
    for k in ("out", "grad_input", "grad_weight", "grad_bias"):
        scale = max(1.0, ref[k].abs().max().item())
        err = (ours[k].double() - ref[k]).abs().max().item()
        err_torch = (same[k].double() - ref[k]).abs().max().item()
        assert err <= max(1e-4 * scale, 2 * err_torch), f"{k}: {err:.3e} (torch {err_torch:.3e})"


# --------------------------------------------------------------------------------------------
# NaN containment


def _nan_input(device):
    x = torch.randn(4, 3, 5, device=device)
    x[1, 1, 2] = float("nan")
    return x


@pytest.mark.parametrize("path", ["fused", "split", "lanes"])
def test_nan_stays_in_its_channel_batch_norm(device, path):
    x = _nan_input(device)
    g = torch.randn_like(x)
    w, b = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    common = dict(grad_out=g, weight=w, bias=b, running_mean=rm, running_var=rv, training=True)
    with kernel_path(path):
        ours = run_norm(tn.batch_norm, x, **common)
    ref = run_norm(F.batch_norm, x, dtype=torch.float64, **common)
    assert torch.isnan(ours["out"][1, 1, 2]), "the NaN itself must come out as NaN"
    assert torch.isnan(ours["running_mean"][1]), "the NaN channel's mean must be NaN"
    clean = [0, 2]
    for k in ("out", "grad_input"):
        o = ours[k][:, clean]
        assert torch.isfinite(o).all(), f"{k}: NaN leaked into other channels"
        assert_close_to_reference(o, ref[k][:, clean], name=k)
    for k in ("grad_weight", "grad_bias", "running_mean", "running_var"):
        assert torch.isfinite(ours[k][clean]).all(), f"{k}: NaN leaked into other channels"
        assert_close_to_reference(ours[k][clean], ref[k][clean], name=k)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_nan_stays_in_its_instance_instance_norm(device, path):
    x = _nan_input(device)
    g = torch.randn_like(x)
    w, b = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    common = dict(grad_out=g, weight=w, bias=b)
    with kernel_path(path):
        ours = run_norm(tn.instance_norm, x, **common)
    ref = run_norm(F.instance_norm, x, dtype=torch.float64, **common)
    assert torch.isnan(ours["out"][1, 1, 2])
    clean = torch.ones(4, 3, dtype=torch.bool, device=device)
    clean[1, 1] = False
    for k in ("out", "grad_input"):
        o = ours[k][clean]
        assert torch.isfinite(o).all(), f"{k}: NaN leaked into other instances"
        assert_close_to_reference(o, ref[k][clean], name=k)
    # Weight/bias gradients sum over the batch: channels 0 and 2 never see the NaN.
    for k in ("grad_weight", "grad_bias"):
        assert torch.isfinite(ours[k][[0, 2]]).all(), f"{k}: NaN leaked into other channels"
        assert_close_to_reference(ours[k][[0, 2]], ref[k][[0, 2]], name=k)


@pytest.mark.parametrize("path", ["fused", "split", "lanes"])
def test_nan_stays_in_its_group_group_norm(device, path):
    # 3 groups of 2 channels; the NaN at (sample 1, channel 2) is in group 1 of sample 1 only.
    x = torch.randn(4, 6, 5, device=device)
    x[1, 2, 2] = float("nan")
    g = torch.randn_like(x)
    w, b = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)

    def gn(lib):
        return lambda x, running_mean, running_var, weight, bias: lib.group_norm(x, 3, weight, bias)

    common = dict(grad_out=g, weight=w, bias=b)
    with kernel_path(path):
        ours = run_norm(gn(tn), x, **common)
    ref = run_norm(gn(F), x, dtype=torch.float64, **common)
    assert torch.isnan(ours["out"][1, 2, 2]), "the NaN itself must come out as NaN"
    assert torch.isnan(ours["out"][1, 2:4]).all(), "its group is all NaN, as in torch"
    clean = torch.ones(4, 6, dtype=torch.bool, device=device)
    clean[1, 2:4] = False
    for k in ("out", "grad_input"):
        o = ours[k][clean]
        assert torch.isfinite(o).all(), f"{k}: NaN leaked into other groups or samples"
        assert_close_to_reference(o, ref[k][clean], name=k)
    # Weight/bias gradients sum over the batch: only the NaN group's channels (2, 3) see it.
    others = [0, 1, 4, 5]
    for k in ("grad_weight", "grad_bias"):
        assert torch.isfinite(ours[k][others]).all(), f"{k}: NaN leaked into other channels"
        assert_close_to_reference(ours[k][others], ref[k][others], name=k)


# --------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("path", ["auto", "split"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])  # fmt: skip
@pytest.mark.parametrize("norm", norm_params(["bn-train", "in-running", "gn-half", *CHANNEL_NORMS]))
def test_bitwise_deterministic(device, norm, fmt, path):
    # LayerNorm2d / RMSNorm2d: dweight and dbias are the finalize's fixed-order sum of the
    # backward programs' partials.
    C = 6 if norm.id == "gn-half" else 5  # GN: 3 groups of 2
    x = torch.randn(3, C, 23, 11, device=device).contiguous(memory_format=fmt)
    g = torch.randn_like(x)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    if not norm.buffers:
        rm = rv = None
    runs = []
    for _ in range(2):
        with kernel_path(path):
            runs.append(
                run_norm(norm.ours, x, grad_out=g, weight=w, bias=b if norm.bias else None,
                         running_mean=rm, running_var=rv)
            )  # fmt: skip
    for k in runs[0]:
        assert_bitwise_equal(runs[0][k], runs[1][k], k)


# --------------------------------------------------------------------------------------------
# gradcheck (float64, tiny): the backward against finite differences of our own forward. Where
# test_norms.py's float64 comparisons (test_dtypes: BN train/eval, IN with running statistics or
# with them in place of its own, GN with 1 group and with 3-channel groups, fused and split, the
# gradients of input, weight and bias against torch's) already hold, a gradcheck adds nothing:
# it only runs on what they leave out, float64 in channels_last (test_channels_last is float32).
# The epilogue's float64 gradients: test_epilogues.py's test_float64.


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize(
    "norm,shape",
    [
        pytest.param(NORMS["bn-train-nobuf"], (3, 2, 2, 2), id="bn-train-channels_last"),
        pytest.param(NORMS["gn-half"], (1, 4, 2, 2), id="gn-channels_last"),  # 2 groups of 2
    ],
)
def test_gradcheck_channels_last(device, norm, shape, path):
    dt = torch.float64
    C = shape[1]
    x = torch.randn(shape, dtype=dt, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.rand(C, dtype=dt, device=device) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=dt, device=device).requires_grad_()

    def fn(x, w, b):
        with kernel_path(path):
            return norm.ours(x, weight=w, bias=b)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
