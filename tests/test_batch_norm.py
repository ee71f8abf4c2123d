"""tn.batch_norm and tn.BatchNorm1d/2d/3d against torch (float64 as the reference): forward,
input/weight/bias gradients, running statistics, eval mode, dtypes, layouts, odd shapes, and both
kernel paths (single tile and split reduction)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    PATHS,
    assert_same_format,
    compare_modules,
    compare_three,
    kernel_path,
    module_triplet,
    rand_like_format,
    run_norm,
    step_modules,
)
from tolerances import assert_bitwise_equal
from torch import nn

import tritonnorm as tn

CL = torch.channels_last
CL3 = torch.channels_last_3d


def check_bn(
    device,
    shape,
    *,
    path="auto",
    dtype=torch.float32,
    param_dtype=None,
    weight=True,
    bias=True,
    buffers=True,
    training=True,
    momentum=0.1,
    eps=1e-5,
    memory_format=torch.contiguous_format,
    grad_format=None,
    x=None,
    view=None,
    input_grad=True,
):
    """Run tn.batch_norm, F.batch_norm (same dtypes) and F.batch_norm (float64); compare all."""
    if x is None:
        x = rand_like_format(shape, dtype, device, memory_format, offset=0.5)
    out_shape = shape
    grad_out = rand_like_format(out_shape, dtype, device, grad_format or memory_format)
    C = out_shape[1]
    pdt = param_dtype or dtype
    w = (torch.rand(C, device=device) * 1.5 + 0.25).to(pdt) if weight else None
    b = torch.randn(C, device=device).to(pdt) if bias else None
    rm = (torch.randn(C, device=device) * 0.3).to(pdt) if buffers else None
    rv = (torch.rand(C, device=device) + 0.5).to(pdt) if buffers else None
    common = dict(
        grad_out=grad_out,
        weight=w,
        bias=b,
        running_mean=rm,
        running_var=rv,
        view=view,
        input_grad=input_grad,
        training=training,
        momentum=momentum,
        eps=eps,
    )
    with kernel_path(path):
        ours = run_norm(tn.batch_norm, x, **common)
    same = run_norm(F.batch_norm, x, **common)
    ref = run_norm(F.batch_norm, x, dtype=torch.float64, **common)
    assert ours["out"].dtype == dtype, f"output dtype {ours['out'].dtype}, input {dtype}"
    assert ours["out"].shape == torch.Size(out_shape)
    compare_three(ours, same, ref)
    if not training and buffers:
        assert_bitwise_equal(ours["running_mean"], rm, "running_mean changed in eval")
        assert_bitwise_equal(ours["running_var"], rv, "running_var changed in eval")
    return ours


# Shapes, each with the reason it is here.
SHAPES = [
    pytest.param((8, 5), id="NC"),  # (N, C): BatchNorm1d on features, no spatial dim at all
    pytest.param((3, 7, 11), id="NCL-primes"),  # primes: no dim a multiple of any block size
    pytest.param((2, 3, 5, 7), id="NCHW-primes"),  # 4D, prime spatial extents
    pytest.param((2, 3, 3, 4, 5), id="NCDHW"),  # 5D
    pytest.param((4, 1, 9), id="C1"),  # a single channel
    pytest.param((1, 4, 6), id="N1"),  # N=1 is legal in training: 6 values per channel
    pytest.param((5, 3, 1), id="L1"),  # spatial size 1: 5 values per channel
    pytest.param((2, 3, 1, 1), id="N2-1x1"),  # 2 values per channel: the least that is legal
    # 12297 values/channel: more than one 4096-element streaming tile, so split programs loop
    # over several tiles and the last one is ragged; still fits the fused path's single tile.
    pytest.param((3, 2, 4099), id="multi-tile"),
    pytest.param((3, 67, 2), id="many-channels"),  # 67 channels: more than one channel block
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_training_matches_torch(device, shape, path):
    check_bn(device, shape, path=path)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("buffers", [True, False], ids=["buffers", "no-buffers"])
@pytest.mark.parametrize(
    "weight,bias",
    [(False, False), (True, False), (False, True)],
    ids=["no-affine", "weight-only", "bias-only"],
)
def test_affine_and_buffer_variants(device, weight, bias, buffers, path):
    check_bn(device, (4, 3, 5), weight=weight, bias=bias, buffers=buffers, path=path)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.37])
def test_momentum(device, momentum):
    # momentum 0: buffers unchanged; 1: replaced by this batch's (unbiased) statistics.
    check_bn(device, (6, 3, 4), momentum=momentum, path="split")


def test_running_var_is_unbiased_and_output_uses_biased(device):
    # Direct check of the definition, independent of torch: momentum=1 puts the batch statistics
    # in the buffers: mean and the UNBIASED variance; the output is normalised with the BIASED one.
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=device)
    rm = torch.zeros(2, dtype=torch.float64, device=device)
    rv = torch.ones(2, dtype=torch.float64, device=device)
    y = tn.batch_norm(x, rm, rv, training=True, momentum=1.0, eps=0.25)
    xs = x.transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(rm, xs.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, xs.var(1, unbiased=True), rtol=1e-12, atol=1e-12)
    expected = (x - xs.mean(1)[:, None]) / torch.sqrt(xs.var(1, unbiased=False)[:, None] + 0.25)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((8, 5), id="NC"),
        pytest.param((3, 7, 11), id="NCL-primes"),
        pytest.param((2, 3, 3, 4, 5), id="NCDHW"),
        pytest.param((1, 4), id="1xC"),  # one value per channel: illegal in training, fine in eval
        pytest.param((1, 3, 1), id="1xCx1"),  # same, with a spatial dim
    ],
)
def test_eval_uses_running_stats(device, shape, path):
    check_bn(device, shape, training=False, path=path)


@pytest.mark.parametrize("path", ["fused", "split"])
def test_training_without_buffers_in_eval_call_is_batch_stats(device, path):
    # training=True with None buffers: batch statistics and no buffer to update.
    check_bn(device, (5, 4, 3), buffers=False, training=True, path=path)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "dtype,param_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),  # fp32 weight/buffers with a half input, as torch allows
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
    ids=["f32", "f64", "f16", "f16-f32params", "bf16", "bf16-f32params"],
)
def test_dtypes(device, dtype, param_dtype, training, path):
    ours = check_bn(
        device,
        (4, 6, 5, 3),
        dtype=dtype,
        param_dtype=param_dtype,
        training=training,
        path=path,
    )
    assert ours["grad_input"].dtype == dtype
    assert ours["grad_weight"].dtype == param_dtype
    assert ours["running_mean"].dtype == param_dtype


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "shape,fmt",
    [
        pytest.param((2, 5, 3, 4), CL, id="channels_last"),
        pytest.param((2, 3, 3, 2, 5), CL3, id="channels_last_3d"),
        pytest.param((3, 2, 7, 13), CL, id="channels_last-C2-primes"),  # few channels, long rows
    ],
)
def test_channels_last(device, shape, fmt, training, path):
    ours = check_bn(device, shape, memory_format=fmt, training=training, path=path)
    assert_same_format(ours, fmt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_channels_last_half(device, dtype):
    ours = check_bn(device, (2, 5, 3, 4), memory_format=CL, dtype=dtype, path="split")
    assert_same_format(ours, CL)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize(
    "x_fmt,g_fmt",
    [(CL, torch.contiguous_format), (torch.contiguous_format, CL)],
    ids=["cl-input-contig-grad", "contig-input-cl-grad"],
)
def test_grad_output_in_another_format(device, x_fmt, g_fmt, path):
    # autograd may hand the backward a grad_output whose layout differs from the input's.
    ours = check_bn(device, (2, 4, 3, 5), memory_format=x_fmt, grad_format=g_fmt, path=path)
    assert_same_format(ours, x_fmt)


# Non-standard strides: base tensor shape and the view the kernel sees.
VIEWS = {
    "transposed-NC": ((5, 3, 4), lambda t: t.transpose(0, 1)),  # (C,N,L) storage seen as (N,C,L)
    "transposed-HW": ((2, 3, 5, 4), lambda t: t.transpose(2, 3)),  # dense, but not a memory format
    "sliced-last": ((3, 4, 10), lambda t: t[..., ::2]),  # step 2 in the innermost dim
    "sliced-channels": ((3, 8, 5), lambda t: t[:, 1::2]),  # every other channel, offset 1
    "expanded-batch": ((1, 3, 6), lambda t: t.expand(4, 3, 6)),  # stride 0 along N
    "channels_last-sliced": ((2, 4, 6, 6), lambda t: t.contiguous(memory_format=CL)[..., 1:5, ::2]),
}


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(VIEWS))
def test_other_strides(device, name, training, path):
    base_shape, view = VIEWS[name]
    base = torch.randn(base_shape, device=device)
    shape = tuple(view(base).shape)
    ours = check_bn(device, shape, x=base, view=view, training=training, path=path)
    assert ours["grad_input"].shape == base.shape


@pytest.mark.parametrize("path", ["fused", "split"])
def test_weight_grad_without_input_grad(device, path):
    # Only weight/bias require grad: the backward must still produce them (and no input grad).
    ours = check_bn(device, (4, 3, 5), input_grad=False, path=path)
    assert ours["grad_input"] is None
    assert ours["grad_weight"] is not None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_and_params_not_modified(device, training):
    x = torch.randn(4, 3, 5, device=device)
    w, b = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    x0, w0, b0 = x.clone(), w.clone(), b.clone()
    tn.batch_norm(x, torch.zeros(3, device=device), torch.ones(3, device=device), w, b, training)
    assert_bitwise_equal(x, x0, "input")
    assert_bitwise_equal(w, w0, "weight")
    assert_bitwise_equal(b, b0, "bias")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 2, 3, 3)], ids=["NC", "NCL", "NCHW"])
def test_empty_batch(device, shape, training):
    # N=0: empty output of the right shape/dtype, buffers untouched, zero weight/bias gradients.
    C = shape[1]
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.rand(C, device=device, requires_grad=True)
    b = torch.randn(C, device=device, requires_grad=True)
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = tn.batch_norm(x, rm, rv, w, b, training=training)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_bitwise_equal(rm, rm0, "running_mean")
    assert_bitwise_equal(rv, rv0, "running_var")
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)), w.grad
    assert torch.equal(b.grad, torch.zeros_like(b)), b.grad


def test_empty_batch_module_counts_batch(device):
    # The module still counts the (empty) batch in num_batches_tracked, as torch's does.
    ours, ref = tn.BatchNorm1d(3).to(device), nn.BatchNorm1d(3).to(device)
    x = torch.randn(0, 3, 4, device=device)
    ours(x)
    ref(x)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1
    assert_bitwise_equal(ours.running_mean, ref.running_mean, "running_mean")
    assert_bitwise_equal(ours.running_var, ref.running_var, "running_var")


# --------------------------------------------------------------------------------------------
# Modules over several steps

MODULE_CASES = [
    pytest.param("BatchNorm1d", (6, 4), id="1d-NC"),
    pytest.param("BatchNorm1d", (3, 4, 5), id="1d-NCL"),
    pytest.param("BatchNorm2d", (2, 4, 3, 5), id="2d"),
    pytest.param("BatchNorm3d", (2, 4, 2, 3, 3), id="3d"),
]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("name,shape", MODULE_CASES)
def test_module_training_steps_then_eval(device, name, shape, momentum):
    C = shape[1]
    ours, ref, ref64 = module_triplet(
        getattr(tn, name), getattr(nn, name), device, num_features=C, momentum=momentum
    )
    assert isinstance(ours, getattr(nn, name))
    for step in range(3):
        x = torch.randn(shape, device=device) * (1 + step) + step  # stats differ per step
        g = torch.randn(shape, device=device)
        for m in (ours, ref, ref64):
            m.zero_grad()
        outs = step_modules((ours, ref, ref64), x, g)
        compare_modules(ours, ref, ref64, outs)
    assert ours.num_batches_tracked.item() == 3
    for m in (ours, ref, ref64):
        m.eval()
    x = torch.randn(shape, device=device)
    g = torch.randn(shape, device=device)
    outs = step_modules((ours, ref, ref64), x, g)
    compare_modules(ours, ref, ref64, outs)
    assert ours.num_batches_tracked.item() == 3  # eval does not count


@pytest.mark.parametrize("name,shape", MODULE_CASES)
def test_module_without_running_stats(device, name, shape):
    # track_running_stats=False: no buffers, batch statistics in eval too.
    C = shape[1]
    ours, ref, ref64 = module_triplet(
        getattr(tn, name), getattr(nn, name), device, num_features=C, track_running_stats=False
    )
    assert ours.running_mean is None and ours.running_var is None
    for m in (ours, ref, ref64):
        m.eval()
    x, g = torch.randn(shape, device=device), torch.randn(shape, device=device)
    compare_modules(ours, ref, ref64, step_modules((ours, ref, ref64), x, g))


@pytest.mark.parametrize("name,shape", MODULE_CASES[1:3])
def test_module_affine_false(device, name, shape):
    C = shape[1]
    ours, ref, ref64 = module_triplet(
        getattr(tn, name), getattr(nn, name), device, num_features=C, affine=False
    )
    assert ours.weight is None and ours.bias is None
    x, g = torch.randn(shape, device=device), torch.randn(shape, device=device)
    compare_modules(ours, ref, ref64, step_modules((ours, ref, ref64), x, g))
