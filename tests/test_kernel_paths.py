"""The test hook ``forced`` really selects the kernel path: without this, the "fused"/"split"
parametrisations of the other files could silently test one path twice.

Relies on ``tritonnorm.kernels.config.chosen_configs()`` (the config of each kernel's most recent
launch); skipped where the library does not provide it.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import INTERPRET, kernel_path
from norms import CHANNEL_NORMS, NORMS, Norm, norm_params

import tritonnorm as tn

config = pytest.importorskip("tritonnorm.kernels.config")
if not hasattr(config, "chosen_configs"):
    pytest.skip("no chosen_configs() to observe launches", allow_module_level=True)


def _splits() -> dict[str, int]:
    """SPLIT of every reduction kernel launched since the last reset."""
    out = {}
    for name, desc in config.chosen_configs().items():
        m = re.search(r"\bSPLIT=(\d+)", desc)
        if m:
            out[name] = int(m.group(1))
    return out


def _run(norm: Norm, x, path, split=3):
    config.reset_chosen_configs()
    x = x.clone().requires_grad_()
    with kernel_path(path, split=split):
        y = norm.ours(x)
        y.backward(torch.ones_like(y))
    return y, x.grad


def _shape(norm: Norm, shape):
    """GN with C/2 groups: the same shape with 4 channels (2 groups of 2)."""
    return (shape[0], 4, *shape[2:]) if norm.id == "gn-half" else shape


# The rows of tests/norms.py whose paths are forced here: BN in training and IN (batch and
# instance statistics, no running statistics: the reductions alone), GN with C/2 groups.
ROWS = norm_params(["bn-train-nobuf", "in", "gn-half"])


@pytest.mark.parametrize("norm", ROWS)
@pytest.mark.parametrize("split", [2, 3, 7])
def test_forced_split_launches_split_reductions(device, norm, split):
    # (2, 3, 5): 10 values per channel, 5 per instance: split=7 leaves some programs empty.
    # GN (2, 4, 5): 10 values per group.
    _run(norm, torch.randn(_shape(norm, (2, 3, 5)), device=device), "split", split)
    splits = _splits()
    assert len(splits) >= 2, f"expected statistics and gradient reductions: {splits}"
    assert set(splits.values()) == {split}, splits


@pytest.mark.parametrize("norm", ROWS)
def test_forced_fused_launches_single_program_reductions(device, norm):
    _run(norm, torch.randn(_shape(norm, (2, 3, 5)), device=device), "fused")
    splits = _splits()
    assert splits and set(splits.values()) == {1}, splits


@pytest.mark.parametrize("norm", ROWS)
def test_forced_lanes_launch_per_element_accumulation(device, norm):
    _run(norm, torch.randn(_shape(norm, (2, 3, 5)), device=device), "lanes", 2)
    partial = {k: v for k, v in config.chosen_configs().items() if "partial" in k}
    assert len(partial) == 2 and all("LANES=True" in v for v in partial.values()), partial
    _run(norm, torch.randn(_shape(norm, (2, 3, 5)), device=device), "split", 2)
    partial = {k: v for k, v in config.chosen_configs().items() if "partial" in k}
    assert all("LANES=False" in v for v in partial.values()), partial


@pytest.mark.parametrize("path", ["split", "lanes"])
@pytest.mark.parametrize("split", [2, 7])
@pytest.mark.parametrize("norm", norm_params(["bn-train-nobuf", "in", "gn-C"]))
def test_empty_split_programs_are_harmless(device, norm, split, path):
    # More split programs than values in a reduction: the empty partials (count 0) must not
    # disturb Chan's combination (no 0/0 NaN, no bias). GN (3, 2, 2): 2 groups of 1 channel.
    # With lanes, most lanes of a tile stay empty too.
    x = torch.randn(3, 2, 2, device=device, dtype=torch.float64)
    y, gx = _run(norm, x, path, split)
    xr = x.clone().requires_grad_()
    yr = norm.torch(xr)
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-9, atol=1e-9)


def test_fused_request_too_long_falls_back_to_split(device):
    # 27000 values per channel do not fit one tile: forced(fused=True) silently splits, and the
    # result is still right.
    x = torch.randn(3, 2, 9000, device=device) + 1.0
    y, _ = _run(NORMS["bn-train-nobuf"], x, "fused")
    ref = F.batch_norm(x.double(), None, None, training=True)
    torch.testing.assert_close(y.double(), ref, rtol=2e-5, atol=2e-5)


def test_offsets_switch_to_int64_only_for_tensors_spanning_2_to_the_30_elements():
    from tritonnorm.kernels.launch import View, _index_64

    small = View(N=8, C=64, S=56 * 56, stride_n=64 * 56 * 56, stride_c=56 * 56, stride_s=1)
    assert small.span == 8 * 64 * 56 * 56
    assert not _index_64(small)
    huge = View(N=2, C=1, S=2**30, stride_n=2**30, stride_c=2**30, stride_s=1)
    assert _index_64(huge)
    # dy may be the larger tensor (broadcast or strided): the widest view decides.
    assert _index_64(small, huge)
    # channels_last: the channel stride is 1, the spatial one C.
    last = View(N=1, C=512, S=2**21, stride_n=2**30, stride_c=1, stride_s=512)
    assert last.span == 511 + (2**21 - 1) * 512 + 1
    assert _index_64(last)


@pytest.mark.parametrize("norm", [*ROWS, *norm_params(CHANNEL_NORMS)])
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_int64_offsets_address_the_same_elements(device, norm, path, layout):
    # The int64 path (tensors of 2**30+ elements) cannot be allocated in a test: forced on a
    # small tensor, it must give bit-identical results to the int32 path.
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    shape = _shape(norm, (2, 5, 6, 7))
    x = (torch.randn(shape, device=device, dtype=torch.float64) * 3 + 1).to(memory_format=fmt)
    results = []
    for index_64 in (False, True):
        with config.forced(fused=path == "fused", split=None if path == "fused" else 3,
                           index_64=index_64):  # fmt: skip
            xi = x.clone().requires_grad_()
            y = norm.ours(xi)
            y.backward(torch.linspace(-1, 1, y.numel(), device=device, dtype=y.dtype).view_as(y))
        results.append((y.detach(), xi.grad))
    (y32, g32), (y64, g64) = results
    assert torch.equal(y32, y64)
    assert torch.equal(g32, g64)
    ref = x.clone().requires_grad_()
    yr = norm.torch(ref)
    torch.testing.assert_close(y64, yr, rtol=1e-10, atol=1e-10)


def test_fused_request_too_long_falls_back_to_split_group_norm(device):
    # GN, one group of 2 x 9000 values per sample: too long for one tile, so forced fused falls
    # back to the streamed path: y is written by a separate apply pass, and the result is right.
    x = torch.randn(3, 2, 9000, device=device) + 1.0
    config.reset_chosen_configs()
    with kernel_path("fused"):
        y = tn.group_norm(x, 1)
    assert "_norm_apply_kernel" in config.chosen_configs(), config.chosen_configs()
    ref = F.group_norm(x.double(), 1)
    torch.testing.assert_close(y.double(), ref, rtol=2e-5, atol=2e-5)


def test_instance_fused_forward_with_split_backward(device):
    # float32 instances of 16384 elements: the forward holds them in registers, the backward
    # (which holds x_hat and dy) splits them. The split backward must use the fused forward's
    # statistics.
    x = torch.randn(2, 3, 128, 128, device=device) * 2 + 5
    dy = torch.randn_like(x)
    config.reset_chosen_configs()
    xi = x.clone().requires_grad_()
    y = tn.instance_norm(xi)
    forward = config.chosen_configs()
    y.backward(dy)
    both = config.chosen_configs()
    assert "_norm_apply_kernel" not in forward, forward  # y written by the fused kernel
    assert "SPLIT=1" in forward["_norm_stats_partial_kernel"]
    assert "BLOCK_S=16384" in forward["_norm_stats_partial_kernel"]
    assert "_norm_apply_kernel" in both, both  # dx written by the apply pass: split backward
    assert "BLOCK_S=16384" not in both["_norm_grad_partial_kernel"]
    xr = x.double().requires_grad_()
    yr = F.instance_norm(xr)
    yr.backward(dy.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xi.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not INTERPRET, reason="natively, auto may take a table's or a tuned config")
@pytest.mark.parametrize(
    "norm,shape,fmt,extras",
    [
        pytest.param(NORMS["bn-train"], (2, 3, 5), None, {}, id="bn-train"),
        pytest.param(NORMS["bn-eval"], (4, 3), None, {}, id="bn-eval-NC"),
        pytest.param(NORMS["in-running"], (2, 5, 3, 4), torch.channels_last, {}, id="in-cl"),
        pytest.param(NORMS["gn-3per"], (2, 6, 3, 5), None, {"activation": "silu"}, id="gn-silu"),
        pytest.param(NORMS["ln2d"], (2, 5, 3, 4), torch.channels_last, {}, id="ln2d-cl"),
        pytest.param(NORMS["rms2d"], (2, 6, 3, 5), None, {"activation": "gelu"}, id="rms2d-gelu"),
    ],
)
def test_auto_launches_what_fused_launches_under_the_interpreter(norm, shape, fmt, extras):
    # Why tests/helpers.paths() drops "auto" where "fused" is run too: the same configs, forward
    # and backward, and bitwise the same results. Should this fail, "auto" has become a path
    # of its own under the interpreter: put it back in paths().
    x = torch.randn(shape)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1]) if norm.bias else None
    dy = torch.randn(shape)
    runs = []
    for path in ("auto", "fused"):
        rm, rv = (torch.zeros(shape[1]), torch.ones(shape[1])) if norm.buffers else (None, None)
        xi, wi, bi = (t.clone().requires_grad_() if t is not None else None for t in (x, w, b))
        config.reset_chosen_configs()
        with kernel_path(path):
            y = norm.ours(xi, running_mean=rm, running_var=rv, weight=wi, bias=bi, **extras)
            forward = config.chosen_configs()
            y.backward(dy)
        grads = [t.grad for t in (xi, wi, bi) if t is not None]
        tensors = [t for t in (y, *grads, rm, rv) if t is not None]
        runs.append((forward, config.chosen_configs(), tensors))
    (fwd_a, both_a, auto), (fwd_f, both_f, fused) = runs
    assert fwd_a == fwd_f and both_a == both_f, (both_a, both_f)
    for a, f in zip(auto, fused, strict=True):
        assert torch.equal(a, f)


@pytest.mark.parametrize("norm", norm_params(CHANNEL_NORMS))
def test_forced_split_reaches_the_kernels_across_channels(device, norm):
    # LayerNorm2d / RMSNorm2d: forced(split=k) sets the backward's programs per row of dweight
    # partials (the forward kernel has no split: its config names none), also for a shape
    # launched before without forcing (cached configs must not hide the override).
    x = torch.randn(2, 4, 3, 5, device=device, requires_grad=True)
    w = torch.rand(4, device=device, requires_grad=True)
    for split in (None, 5, 2):
        config.reset_chosen_configs()
        with config.forced(split=split):
            norm.ours(x, weight=w).sum().backward()
        splits = _splits()
        assert "_position_norm_forward_kernel" in config.chosen_configs()
        assert "_position_norm_forward_kernel" not in splits, splits
        if split is not None:
            assert splits["_position_norm_backward_kernel"] == split, (split, splits)
