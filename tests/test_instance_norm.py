"""tn.instance_norm and tn.InstanceNorm1d/2d/3d against torch (float64 as the reference): forward,
input/weight/bias gradients, running statistics (track_running_stats, use_input_stats=False),
unbatched inputs, dtypes, layouts, odd shapes, and both kernel paths."""

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


def check_in(
    device,
    shape,
    *,
    path="auto",
    dtype=torch.float32,
    param_dtype=None,
    weight=True,
    bias=True,
    buffers=False,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
    memory_format=torch.contiguous_format,
    grad_format=None,
    x=None,
    view=None,
    input_grad=True,
):
    """Run tn.instance_norm, F.instance_norm (same dtypes) and F.instance_norm (float64)."""
    if x is None:
        x = rand_like_format(shape, dtype, device, memory_format, offset=0.5)
    grad_out = rand_like_format(shape, dtype, device, grad_format or memory_format)
    C = shape[1]
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
        use_input_stats=use_input_stats,
        momentum=momentum,
        eps=eps,
    )
    with kernel_path(path):
        ours = run_norm(tn.instance_norm, x, **common)
    same = run_norm(F.instance_norm, x, **common)
    ref = run_norm(F.instance_norm, x, dtype=torch.float64, **common)
    assert ours["out"].dtype == dtype, f"output dtype {ours['out'].dtype}, input {dtype}"
    assert ours["out"].shape == torch.Size(shape)
    compare_three(ours, same, ref)
    if not use_input_stats:
        assert_bitwise_equal(ours["running_mean"], rm, "running_mean changed")
        assert_bitwise_equal(ours["running_var"], rv, "running_var changed")
    return ours


# Shapes, each with the reason it is here.
SHAPES = [
    pytest.param((3, 7, 11), id="NCL-primes"),  # primes: no dim a multiple of any block size
    pytest.param((2, 3, 5, 7), id="NCHW-primes"),  # 4D, prime spatial extents
    pytest.param((2, 3, 3, 4, 5), id="NCDHW"),  # 5D
    pytest.param((4, 1, 9), id="C1"),  # one channel: instances are just the batch
    pytest.param((1, 4, 6), id="N1"),  # one sample
    pytest.param((1, 1, 13), id="N1-C1"),  # a single instance
    pytest.param((5, 3, 2), id="L2"),  # 2 values per instance: the least that is legal
    pytest.param((2, 3, 1, 2), id="1x2"),  # 4D with a size-1 spatial dim
    # 4757 values/instance: more than one 4096-element streaming tile (ragged second tile).
    pytest.param((2, 2, 67, 71), id="multi-tile"),
    pytest.param((5, 67, 3), id="many-instances"),  # 335 instances: more than one instance block
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_matches_torch(device, shape, path):
    check_in(device, shape, path=path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(3, 7, 11), (2, 3, 3, 4, 5), (1, 4, 6), (2, 2, 67, 71)])
def test_track_running_stats_functional(device, shape, path):
    # Buffers get the batch average of the instance means / unbiased instance variances.
    check_in(device, shape, buffers=True, path=path)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("buffers", [True, False], ids=["buffers", "no-buffers"])
@pytest.mark.parametrize(
    "weight,bias",
    [(False, False), (True, False), (False, True)],
    ids=["no-affine", "weight-only", "bias-only"],
)
def test_affine_and_buffer_variants(device, weight, bias, buffers, path):
    check_in(device, (4, 3, 5), weight=weight, bias=bias, buffers=buffers, path=path)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.37])
def test_momentum(device, momentum):
    check_in(device, (6, 3, 4), buffers=True, momentum=momentum, path="split")


def test_running_stats_definition(device):
    # Independent of torch: momentum=1 puts the batch average of the instance means and of the
    # UNBIASED instance variances in the buffers; outputs use each instance's BIASED variance.
    x = torch.randn(3, 2, 5, dtype=torch.float64, device=device)
    rm = torch.zeros(2, dtype=torch.float64, device=device)
    rv = torch.ones(2, dtype=torch.float64, device=device)
    y = tn.instance_norm(x, rm, rv, momentum=1.0, eps=0.25)
    torch.testing.assert_close(rm, x.mean(2).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, x.var(2, unbiased=True).mean(0), rtol=1e-12, atol=1e-12)
    expected = (x - x.mean(2, keepdim=True)) / torch.sqrt(
        x.var(2, unbiased=False, keepdim=True) + 0.25
    )
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((3, 7, 11), id="NCL-primes"),
        pytest.param((2, 3, 3, 4, 5), id="NCDHW"),
        pytest.param((2, 3, 1), id="L1"),  # one spatial element: legal with running statistics
    ],
)
def test_use_input_stats_false(device, shape, path):
    check_in(device, shape, buffers=True, use_input_stats=False, path=path)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "dtype,param_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),  # fp32 weight/buffers with a half input
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
    ids=["f32", "f64", "f16", "f16-f32params", "bf16", "bf16-f32params"],
)
def test_dtypes(device, dtype, param_dtype, training, path):
    # "train": instance statistics + buffer update; "eval": use_input_stats=False.
    ours = check_in(
        device,
        (3, 4, 5, 3),
        dtype=dtype,
        param_dtype=param_dtype,
        buffers=True,
        use_input_stats=training,
        path=path,
    )
    assert ours["grad_input"].dtype == dtype
    assert ours["grad_weight"].dtype == param_dtype
    assert ours["running_mean"].dtype == param_dtype


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("use_input_stats", [True, False], ids=["input-stats", "running-stats"])
@pytest.mark.parametrize(
    "shape,fmt",
    [
        pytest.param((2, 5, 3, 4), CL, id="channels_last"),
        pytest.param((2, 3, 3, 2, 5), CL3, id="channels_last_3d"),
        pytest.param((3, 2, 7, 13), CL, id="channels_last-C2-primes"),
    ],
)
def test_channels_last(device, shape, fmt, use_input_stats, path):
    # Note torch itself returns a contiguous tensor for channels_last_3d; we keep the format.
    ours = check_in(
        device, shape, memory_format=fmt, buffers=True, use_input_stats=use_input_stats, path=path
    )
    assert_same_format(ours, fmt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_channels_last_half(device, dtype):
    ours = check_in(device, (2, 5, 3, 4), memory_format=CL, dtype=dtype, path="split")
    assert_same_format(ours, CL)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize(
    "x_fmt,g_fmt",
    [(CL, torch.contiguous_format), (torch.contiguous_format, CL)],
    ids=["cl-input-contig-grad", "contig-input-cl-grad"],
)
def test_grad_output_in_another_format(device, x_fmt, g_fmt, path):
    ours = check_in(device, (2, 4, 3, 5), memory_format=x_fmt, grad_format=g_fmt, path=path)
    assert_same_format(ours, x_fmt)


VIEWS = {
    "transposed-NC": ((5, 3, 4), lambda t: t.transpose(0, 1)),  # (C,N,L) storage seen as (N,C,L)
    "transposed-HW": ((2, 3, 5, 4), lambda t: t.transpose(2, 3)),  # dense, not a memory format
    "sliced-last": ((3, 4, 10), lambda t: t[..., ::2]),  # step 2 in the innermost dim
    "sliced-channels": ((3, 8, 5), lambda t: t[:, 1::2]),  # every other channel, offset 1
    "expanded-batch": ((1, 3, 6), lambda t: t.expand(4, 3, 6)),  # stride 0 along N
    "channels_last-sliced": ((2, 4, 6, 6), lambda t: t.contiguous(memory_format=CL)[..., 1:5, ::2]),
}


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("name", list(VIEWS))
def test_other_strides(device, name, path):
    base_shape, view = VIEWS[name]
    base = torch.randn(base_shape, device=device)
    shape = tuple(view(base).shape)
    ours = check_in(device, shape, x=base, view=view, buffers=True, path=path)
    assert ours["grad_input"].shape == base.shape


@pytest.mark.parametrize("path", ["fused", "split"])
def test_weight_grad_without_input_grad(device, path):
    ours = check_in(device, (4, 3, 5), input_grad=False, path=path)
    assert ours["grad_input"] is None
    assert ours["grad_weight"] is not None


def test_input_and_params_not_modified(device):
    x = torch.randn(4, 3, 5, device=device)
    w, b = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    x0, w0, b0 = x.clone(), w.clone(), b.clone()
    tn.instance_norm(x, torch.zeros(3, device=device), torch.ones(3, device=device), w, b)
    assert_bitwise_equal(x, x0, "input")
    assert_bitwise_equal(w, w0, "weight")
    assert_bitwise_equal(b, b0, "bias")


@pytest.mark.parametrize("use_input_stats", [True, False], ids=["input-stats", "running-stats"])
@pytest.mark.parametrize("shape", [(0, 3, 4), (0, 2, 3, 3)], ids=["NCL", "NCHW"])
def test_empty_batch_leaves_buffers_unchanged(device, shape, use_input_stats):
    # Deliberate deviation from torch: its CPU instance_norm writes NaN into the running buffers
    # on an empty batch (and fails with affine parameters); we return an empty output and leave
    # the buffers exactly as they were.
    C = shape[1]
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.rand(C, device=device, requires_grad=True)
    b = torch.randn(C, device=device, requires_grad=True)
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = tn.instance_norm(x, rm, rv, w, b, use_input_stats=use_input_stats)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_bitwise_equal(rm, rm0, "running_mean")
    assert_bitwise_equal(rv, rv0, "running_var")
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)), w.grad
    assert torch.equal(b.grad, torch.zeros_like(b)), b.grad


def test_empty_batch_module(device):
    ours = tn.InstanceNorm1d(3, track_running_stats=True).to(device)
    ref = nn.InstanceNorm1d(3, track_running_stats=True).to(device)
    x = torch.randn(0, 3, 4, device=device)
    assert ours(x).shape == (0, 3, 4)
    ref(x)
    assert torch.equal(ours.running_mean, torch.zeros(3, device=device))
    assert torch.equal(ours.running_var, torch.ones(3, device=device))
    # InstanceNorm never counts batches (torch's neither); ours must agree.
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 0


# --------------------------------------------------------------------------------------------
# Modules

MODULE_CASES = [
    pytest.param("InstanceNorm1d", (3, 4, 5), id="1d"),
    pytest.param("InstanceNorm1d", (4, 5), id="1d-unbatched"),  # (C, L)
    pytest.param("InstanceNorm2d", (2, 4, 3, 5), id="2d"),
    pytest.param("InstanceNorm2d", (4, 3, 5), id="2d-unbatched"),  # (C, H, W)
    pytest.param("InstanceNorm3d", (2, 4, 2, 3, 3), id="3d"),
    pytest.param("InstanceNorm3d", (4, 2, 3, 3), id="3d-unbatched"),  # (C, D, H, W)
]


def _C(name, shape):
    unbatched = len(shape) == int(name[-2]) + 1
    return shape[0] if unbatched else shape[1]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize("name,shape", MODULE_CASES)
def test_module_track_running_stats_steps_then_eval(device, name, shape, momentum):
    # momentum=None: torch's InstanceNorm passes 0.0 (buffers never move); ours must agree.
    kw = dict(num_features=_C(name, shape), affine=True, track_running_stats=True)
    ours, ref, ref64 = module_triplet(
        getattr(tn, name), getattr(nn, name), device, momentum=momentum, **kw
    )
    assert isinstance(ours, getattr(nn, name))
    for step in range(3):
        x = torch.randn(shape, device=device) * (1 + step) + step
        g = torch.randn(shape, device=device)
        for m in (ours, ref, ref64):
            m.zero_grad()
        compare_modules(ours, ref, ref64, step_modules((ours, ref, ref64), x, g))
    for m in (ours, ref, ref64):
        m.eval()
    x, g = torch.randn(shape, device=device), torch.randn(shape, device=device)
    compare_modules(ours, ref, ref64, step_modules((ours, ref, ref64), x, g))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("name,shape", MODULE_CASES)
def test_module_default_instance_stats_in_eval_too(device, name, shape, affine):
    # Without track_running_stats the module uses instance statistics in train and eval alike.
    ours, ref, ref64 = module_triplet(
        getattr(tn, name), getattr(nn, name), device, num_features=_C(name, shape), affine=affine
    )
    x, g = torch.randn(shape, device=device), torch.randn(shape, device=device)
    compare_modules(ours, ref, ref64, step_modules((ours, ref, ref64), x, g))
    for m in (ours, ref, ref64):
        m.eval()
    compare_modules(ours, ref, ref64, step_modules((ours, ref, ref64), x, g))
