"""Every bad input raises the exception type torch raises for it, with a clear message, BEFORE any
running buffer or num_batches_tracked changes.

Each case is built twice, once with torch (to learn the exception type torch raises) and once with
tritonnorm; ours must raise an instance of torch's type (or one of the case's listed alternatives),
its message must match the case's pattern, and every buffer must be bitwise unchanged. Torch's
own modules increment num_batches_tracked before some of these errors; ours must not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import compare_three, kernel_path
from norms import NORMS
from tolerances import assert_bitwise_equal
from torch import nn

import tritonnorm as tn

MODULE_NAMES = [f"{kind}Norm{d}d" for kind in ("Batch", "Instance") for d in (1, 2, 3)]
MODULE_NAMES.append("GroupNorm")
TORCH = SimpleNamespace(
    batch_norm=F.batch_norm,
    instance_norm=F.instance_norm,
    group_norm=F.group_norm,
    # timm's compositions (tests/norms.py), with tritonnorm's signatures
    layer_norm_2d=lambda x, w=None, b=None, eps=1e-6: NORMS["ln2d"].torch(
        x, weight=w, bias=b, eps=eps
    ),
    rms_norm_2d=lambda x, w=None, eps=1e-6: NORMS["rms2d"].torch(x, weight=w, eps=eps),
    **{n: getattr(nn, n) for n in MODULE_NAMES},
)
C = 3


def other_device(device: str) -> str:
    """A device the running stats can live on that is not the input's."""
    return "cpu" if device.startswith("cuda") else "meta"


@dataclass
class Case:
    id: str
    # build(lib, device) -> (call, state): call() must raise; state: tensors that must not change
    build: Callable
    match: str
    also_ok: tuple[type[BaseException], ...] = ()


def _buffers(device, dtype=torch.float32, n=C):
    return (
        torch.randn(n, device=device, dtype=dtype),
        torch.rand(n, device=device, dtype=dtype) + 0.5,
    )


def bn_call(shape, *, rm_n=C, rv_n=C, w_n=None, b_n=None, buffers=True, dtype=None, **kw):
    """A functional batch_norm call; the sizes let one tensor be the wrong size (None: absent)."""

    def build(lib, device):
        x = torch.randn(shape, device=device)
        if dtype is not None:
            x = torch.randint(0, 5, shape, device=device, dtype=dtype)
        rm = torch.randn(rm_n, device=device) if buffers and rm_n is not None else None
        rv = torch.rand(rv_n, device=device) + 0.5 if buffers and rv_n is not None else None
        w = torch.rand(w_n, device=device) if w_n else None
        b = torch.rand(b_n, device=device) if b_n else None
        state = [t for t in (rm, rv) if t is not None]
        return (lambda: lib.batch_norm(x, rm, rv, w, b, **kw)), state

    return build


def in_call(shape, *, rm_n=None, rv_n=None, w_n=None, b_n=None, dtype=None, **kw):
    def build(lib, device):
        x = torch.randn(shape, device=device)
        if dtype is not None:
            x = torch.randint(0, 5, shape, device=device, dtype=dtype)
        rm = torch.randn(rm_n, device=device) if rm_n else None
        rv = torch.rand(rv_n, device=device) + 0.5 if rv_n else None
        w = torch.rand(w_n, device=device) if w_n else None
        b = torch.rand(b_n, device=device) if b_n else None
        state = [t for t in (rm, rv) if t is not None]
        return (lambda: lib.instance_norm(x, rm, rv, w, b, **kw)), state

    return build


def gn_call(shape, num_groups, *, w_shape=None, b_shape=None, dtype=None, param_dtype=None, **kw):
    """A functional group_norm call (GN has no running statistics: nothing to keep unchanged)."""

    def build(lib, device):
        x = torch.randn(shape, device=device)
        if dtype is not None:
            x = torch.randint(0, 5, shape, device=device, dtype=dtype)
        pdt = param_dtype or torch.float32
        w = torch.rand(w_shape, device=device, dtype=pdt) if w_shape else None
        b = torch.rand(b_shape, device=device, dtype=pdt) if b_shape else None
        return (lambda: lib.group_norm(x, num_groups, w, b, **kw)), []

    return build


def channel_norm_call(op, shape, *, w_shape=None, b_shape=None, dtype=None, param_dtype=None):
    """A functional layer_norm_2d (weight, bias) or rms_norm_2d (weight) call; no running
    statistics, and the input must come back unchanged."""

    def build(lib, device):
        x = torch.randn(shape, device=device)
        if dtype is not None:
            x = torch.randint(0, 5, shape, device=device, dtype=dtype)
        pdt = param_dtype or torch.float32
        w = torch.rand(w_shape, device=device, dtype=pdt) if w_shape else None
        b = torch.rand(b_shape, device=device, dtype=pdt) if b_shape else None
        args = (x, w, b) if op == "layer_norm_2d" else (x, w)
        return (lambda: getattr(lib, op)(*args)), [x]

    return build


def custom(fn):
    """fn(lib, device) -> (call, state), for the cases that do not fit bn_call/in_call."""
    return fn


def module_call(name, shape, *, training=True, dtype=None, **kwargs):
    def build(lib, device):
        # GroupNorm(num_groups=C, num_channels=...) for GN; (num_features=C, ...) otherwise.
        m = getattr(lib, name)(C, **kwargs).to(device)
        m.train(training)
        x = torch.randn(shape, device=device)
        if dtype is not None:
            x = torch.randint(0, 5, shape, device=device, dtype=dtype)
        state = [t for t in m.buffers()] + [p.detach() for p in m.parameters()]
        return (lambda: m(x)), state

    return build


def _bn_buffers_dtype(lib, device):
    x = torch.randn(4, C, device=device)
    rm, rv = _buffers(device, torch.float64)
    return (lambda: lib.batch_norm(x, rm, rv, training=True)), [rm, rv]


def _bn_buffers_device(lib, device):
    x = torch.randn(4, C, device=device)
    rm = torch.zeros(C, device=other_device(device))
    rv = torch.rand(C, device=device) + 0.5
    return (lambda: lib.batch_norm(x, rm, rv, training=True)), [rv]


def _gn_weight_device(lib, device):
    x = torch.randn(2, 6, 4, device=device)
    w = torch.ones(6, device=other_device(device))
    return (lambda: lib.group_norm(x, 2, w)), []


def _ln2d_weight_device(lib, device):
    x = torch.randn(2, C, 4, device=device)
    w = torch.ones(C, device=other_device(device))
    return (lambda: lib.layer_norm_2d(x, w)), [x]


def _in_buffers_device(lib, device):
    x = torch.randn(2, C, 4, device=device)
    rm = torch.zeros(C, device=other_device(device))
    rv = torch.rand(C, device=device) + 0.5
    return (lambda: lib.instance_norm(x, rm, rv)), [rv]


ONE_VALUE = r"(?i)more than (1|one) value"
SPATIAL = r"(?i)spatial"
DTYPE = r"(?i)dtype|long|\bint|integer|floating"
NDIM = r"(?i)\bdim|\b\dD\b|ndim|at least 2"
RUNNING = r"(?i)running[_ ](mean|var|stat)"

CASES = [
    # -- batch_norm, functional --
    Case("bn-train-1xC", bn_call((1, C), training=True), ONE_VALUE),
    Case("bn-train-1xCx1", bn_call((1, C, 1), training=True), ONE_VALUE),
    Case(
        "bn-train-1xCx1x1-no-buffers",
        bn_call((1, C, 1, 1), buffers=False, training=True),
        ONE_VALUE,
    ),
    Case("bn-running_mean-size", bn_call((4, C), rm_n=C + 1, training=True), "running_mean"),
    Case("bn-running_var-size", bn_call((4, C), rv_n=C + 1, training=True), "running_var"),
    Case("bn-weight-size", bn_call((4, C), w_n=C + 1, training=True), "weight"),
    Case("bn-bias-size", bn_call((4, C), b_n=C + 1, training=True), "bias"),
    Case("bn-eval-running_mean-size", bn_call((4, C, 2), rm_n=C - 1), "running_mean"),
    Case("bn-eval-weight-size", bn_call((4, C, 2), w_n=1), "weight"),
    Case("bn-int64-input", bn_call((4, C), dtype=torch.int64, training=True), DTYPE, (TypeError,)),
    Case("bn-int32-input-eval", bn_call((4, C), dtype=torch.int32), DTYPE, (TypeError,)),
    Case("bn-eval-without-buffers", bn_call((4, C), buffers=False, training=False), RUNNING),
    Case(
        "bn-only-running_mean", bn_call((4, C), rv_n=None, training=True), r"(?i)both|running_var"
    ),
    Case("bn-1d-input", bn_call((C,), training=True), NDIM, (ValueError, IndexError)),
    Case(
        "bn-1d-input-no-buffers", bn_call((C,), buffers=False, training=True), NDIM, (ValueError,)
    ),
    Case("bn-0d-input", bn_call((), buffers=False, training=True), NDIM, (ValueError,)),
    Case("bn-negative-eps-train", bn_call((4, C), training=True, eps=-1e-3), "eps"),
    Case("bn-zero-eps-train", bn_call((4, C), training=True, eps=0.0), "eps"),
    Case("bn-negative-eps-eval", bn_call((4, C), training=False, eps=-1e-3), "eps"),
    Case(
        "bn-nobuffers-zero-eps-train", bn_call((4, C), buffers=False, training=True, eps=0.0), "eps"
    ),
    Case("bn-running-stats-dtype", custom(_bn_buffers_dtype), r"(?i)dtype|type|float|double"),
    Case("bn-running-stats-device", custom(_bn_buffers_device), r"(?i)device"),
    # -- instance_norm, functional --
    Case("in-one-spatial", in_call((2, C, 1)), SPATIAL),
    Case("in-one-spatial-buffers", in_call((2, C, 1, 1), rm_n=C, rv_n=C), SPATIAL),
    Case("in-running_mean-size", in_call((2, C, 4), rm_n=C + 1, rv_n=C), "running_mean"),
    Case("in-running_var-size", in_call((2, C, 4), rm_n=C, rv_n=C - 1), "running_var"),
    Case("in-weight-size", in_call((2, C, 4), w_n=C + 1), "weight"),
    Case("in-bias-size", in_call((2, C, 4), b_n=C - 1), "bias"),
    Case("in-int64-input", in_call((2, C, 4), dtype=torch.int64), DTYPE, (TypeError,)),
    Case("in-no-input-stats-without-buffers", in_call((2, C, 4), use_input_stats=False), RUNNING),
    Case("in-only-running_mean", in_call((2, C, 4), rm_n=C), r"(?i)both|running_var"),
    Case("in-1d-input", in_call((C,)), r"(?i)\bdim|\b\dD\b|ndim|spatial"),
    Case("in-running-stats-device", custom(_in_buffers_device), r"(?i)device"),
    # -- group_norm, functional (6 channels) --
    Case("gn-C-not-divisible", gn_call((2, 6, 4), 4), r"(?i)divisible"),
    Case("gn-zero-groups", gn_call((2, 6, 4), 0), r"(?i)num_groups|groups"),
    Case("gn-negative-groups", gn_call((2, 6, 4), -2), r"(?i)num_groups|groups"),
    Case("gn-float-num_groups", gn_call((2, 6, 4), 2.0), r"(?i)num_groups"),
    Case("gn-weight-size", gn_call((2, 6, 4), 2, w_shape=7), "weight"),
    Case("gn-bias-size", gn_call((2, 6, 4), 2, b_shape=5), "bias"),
    Case("gn-2d-weight", gn_call((2, 6, 4), 2, w_shape=(2, 3)), "weight"),
    Case("gn-int64-input", gn_call((2, 6, 4), 2, dtype=torch.int64), DTYPE, (TypeError,)),
    Case("gn-1d-input", gn_call((6,), 2), NDIM, (ValueError,)),
    # torch counts N x C/G x spatial values (found by tests/test_properties.py)
    Case("gn-1xC-C-groups", gn_call((1, 6), 6), ONE_VALUE, (ValueError,)),
    Case("gn-1xCx1-C-groups", gn_call((1, 6, 1), 6), ONE_VALUE, (ValueError,)),
    Case(
        "gn-mixed-param-dtype",
        gn_call((2, 6, 4), 2, w_shape=6, b_shape=6, param_dtype=torch.float64),
        r"(?i)dtype|type",
    ),
    Case("gn-weight-device", custom(_gn_weight_device), r"(?i)device"),
    # -- layer_norm_2d / rms_norm_2d, functional (timm's LayerNorm2d / RmsNorm2d composition) --
    Case(
        "ln2d-weight-size", channel_norm_call("layer_norm_2d", (2, C, 4), w_shape=C + 1), "weight"
    ),
    Case("ln2d-bias-size", channel_norm_call("layer_norm_2d", (2, C, 4), b_shape=C - 1), "bias"),
    Case("ln2d-2d-weight", channel_norm_call("layer_norm_2d", (2, C, 4), w_shape=(1, C)), "weight"),
    Case("ln2d-2d-bias", channel_norm_call("layer_norm_2d", (2, C, 4), b_shape=(C, 1)), "bias"),
    Case(
        "ln2d-weight-dtype",
        channel_norm_call("layer_norm_2d", (2, C, 4), w_shape=C, param_dtype=torch.float64),
        r"(?i)dtype|type",
    ),
    Case(
        "ln2d-int64-input",
        channel_norm_call("layer_norm_2d", (2, C, 4), dtype=torch.int64),
        DTYPE,
        (TypeError,),
    ),
    Case("ln2d-1d-input", channel_norm_call("layer_norm_2d", (C,)), NDIM, (ValueError,)),
    Case("ln2d-0d-input", channel_norm_call("layer_norm_2d", ()), NDIM, (ValueError,)),
    Case("ln2d-weight-device", custom(_ln2d_weight_device), r"(?i)device"),
    Case(
        "rms2d-weight-size", channel_norm_call("rms_norm_2d", (2, C, 3, 3), w_shape=C - 1), "weight"
    ),
    Case("rms2d-2d-weight", channel_norm_call("rms_norm_2d", (2, C, 4), w_shape=(C, 1)), "weight"),
    Case(
        "rms2d-int32-input",
        channel_norm_call("rms_norm_2d", (2, C, 4), dtype=torch.int32),
        DTYPE,
        (TypeError,),
    ),
    Case("rms2d-1d-input", channel_norm_call("rms_norm_2d", (C,)), NDIM, (ValueError,)),
    # -- modules --
    Case("BatchNorm1d-train-1xC", module_call("BatchNorm1d", (1, C)), ONE_VALUE),
    Case("BatchNorm1d-train-1xCx1", module_call("BatchNorm1d", (1, C, 1)), ONE_VALUE),
    Case("BatchNorm2d-train-1xCx1x1", module_call("BatchNorm2d", (1, C, 1, 1)), ONE_VALUE),
    Case(
        "BatchNorm1d-cumulative-1xC", module_call("BatchNorm1d", (1, C), momentum=None), ONE_VALUE
    ),
    Case("BatchNorm1d-given-4d", module_call("BatchNorm1d", (2, C, 2, 2)), r"(?i)2D or 3D|dim"),
    Case("BatchNorm1d-given-1d", module_call("BatchNorm1d", (C,)), r"(?i)2D or 3D|dim"),
    Case("BatchNorm2d-given-3d", module_call("BatchNorm2d", (2, C, 2)), r"(?i)4D|dim"),
    Case(
        "BatchNorm2d-given-5d-eval",
        module_call("BatchNorm2d", (2, C, 2, 2, 2), training=False),
        r"(?i)4D|dim",
    ),
    Case("BatchNorm3d-given-4d", module_call("BatchNorm3d", (2, C, 2, 2)), r"(?i)5D|dim"),
    Case("BatchNorm2d-wrong-C", module_call("BatchNorm2d", (2, C + 1, 2, 2)), RUNNING),
    Case(
        "BatchNorm2d-int-input",
        module_call("BatchNorm2d", (2, C, 2, 2), dtype=torch.int64),
        DTYPE,
        (TypeError,),
    ),
    Case(
        "InstanceNorm1d-given-4d", module_call("InstanceNorm1d", (2, C, 2, 2)), r"(?i)2D or 3D|dim"
    ),
    Case("InstanceNorm1d-given-1d", module_call("InstanceNorm1d", (C,)), r"(?i)2D or 3D|dim"),
    Case("InstanceNorm2d-given-2d", module_call("InstanceNorm2d", (C, 4)), r"(?i)3D or 4D|dim"),
    Case("InstanceNorm3d-given-3d", module_call("InstanceNorm3d", (C, 2, 2)), r"(?i)4D or 5D|dim"),
    Case(
        "InstanceNorm1d-affine-wrong-C",
        module_call("InstanceNorm1d", (2, C + 1, 4), affine=True),
        "num_features",
    ),
    Case(
        "InstanceNorm1d-tracked-wrong-C",
        module_call("InstanceNorm1d", (2, C + 1, 4), track_running_stats=True),
        RUNNING,
    ),
    Case(
        "InstanceNorm2d-tracked-one-spatial",
        module_call("InstanceNorm2d", (2, C, 1, 1), affine=True, track_running_stats=True),
        SPATIAL,
    ),
    Case("BatchNorm2d-zero-eps-train", module_call("BatchNorm2d", (2, C, 2, 2), eps=0.0), "eps"),
    Case(
        "BatchNorm1d-negative-eps-eval",
        module_call("BatchNorm1d", (2, C), training=False, eps=-1e-3),
        "eps",
    ),
    Case(
        "GroupNorm-wrong-C",
        module_call("GroupNorm", (2, C + 1, 4), num_channels=C),
        r"(?i)weight|channels",
    ),
    Case(
        "InstanceNorm1d-unbatched-one-spatial",
        module_call("InstanceNorm1d", (C, 1), track_running_stats=True),
        SPATIAL,
    ),
]


def _torch_exception(case: Case, device: str) -> BaseException:
    call, _ = case.build(TORCH, device)
    try:
        call()
    except Exception as e:
        return e
    pytest.fail(f"test bug: torch does not raise for {case.id}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error(device, case):
    expected = type(_torch_exception(case, device))
    call, state = case.build(tn, device)
    before = [t.clone() for t in state]
    with pytest.raises(Exception, match=case.match) as info:
        call()
    assert isinstance(info.value, (expected, *case.also_ok)), (
        f"raised {type(info.value).__name__}: {info.value}; torch raises {expected.__name__}"
    )
    for i, (t, t0) in enumerate(zip(state, before, strict=True)):
        assert_bitwise_equal(t, t0, f"state tensor {i} changed by a failing call")


def test_module_error_does_not_count_batch(device):
    # Explicit form of the guarantee for the case where torch's module DOES count the batch.
    ref = nn.BatchNorm1d(C).to(device)
    with pytest.raises(ValueError):
        ref(torch.randn(1, C, device=device))
    assert ref.num_batches_tracked.item() == 1  # torch counts it before failing
    ours = tn.BatchNorm1d(C).to(device)
    with pytest.raises(ValueError, match=ONE_VALUE):
        ours(torch.randn(1, C, device=device))
    assert ours.num_batches_tracked.item() == 0
    # ...and the module still works afterwards, counting from 0.
    ours(torch.randn(2, C, device=device))
    assert ours.num_batches_tracked.item() == 1


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_one_value_per_channel_is_fine_in_eval_only(device, training):
    # (1, C) is an error only when batch statistics are needed.
    x = torch.randn(1, C, device=device)
    rm, rv = _buffers(device)
    if training:
        with pytest.raises(ValueError, match=ONE_VALUE):
            tn.batch_norm(x, rm, rv, training=True)
    else:
        y = tn.batch_norm(x, rm, rv, training=False)
        torch.testing.assert_close(y, F.batch_norm(x, rm, rv, training=False))


def test_half_input_with_fp32_params_is_not_an_error(device):
    # Mixed precision the way torch accepts it: half input, fp32 weight/bias/buffers.
    x = torch.randn(4, C, 5, device=device, dtype=torch.float16)
    rm, rv = _buffers(device)
    w, b = torch.rand(C, device=device), torch.randn(C, device=device)
    y = tn.batch_norm(x, rm, rv, w, b, training=True)
    assert y.dtype == torch.float16
    y = tn.instance_norm(x, rm, rv, w, b)
    assert y.dtype == torch.float16
    y = tn.group_norm(x, 1, w, b)
    assert y.dtype == torch.float16


# -- eps: where torch computes, we compute the same -----------------------------------------------
# torch.nn.functional.batch_norm raises for eps <= 0 in training and eps < 0 in eval (the CASES
# above); everything else torch computes: batch_norm in eval with eps = 0, and instance_norm and
# group_norm with any eps, giving NaN wherever variance + eps < 0. So do we, on every kernel path.

# The exact (biased) variance of each statistic of the eps input, and the running variances of the
# eval rows: with eps = -0.5 the first and last give var + eps < 0 (NaN), the middle one does not.
# Margins of 0.1 or more: far beyond what rounding the input to bfloat16 moves a variance.
VARIANCES = (0.1, 2.0, 0.4)
EPS_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _eps_input(device) -> torch.Tensor:
    """(2, 3, 16) float64, each (sample, channel) row with mean 0.3 and variance VARIANCES[c];
    reshaped to (2, 6, 8) the 3 groups of 2 channels hold those same rows."""
    x = torch.randn(2, C, 16, dtype=torch.float64, device=device)
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True)
    var = torch.tensor(VARIANCES, dtype=torch.float64, device=device)
    return x * var.sqrt()[None, :, None] + 0.3


@dataclass
class EpsCase:
    id: str
    # call(lib, x, weight, bias, running_mean, running_var, eps); x is (2, 3, 16)
    call: Callable
    buffers: bool = False
    eps_values: tuple[float, ...] = (-0.5, 0.0)


EPS_CASES = [
    EpsCase(
        "group_norm",
        lambda lib, x, w, b, rm, rv, eps: lib.group_norm(
            x.reshape(2, 2 * C, 8), C, w.repeat_interleave(2), b.repeat_interleave(2), eps=eps
        ),
    ),
    EpsCase(
        "instance_norm",
        lambda lib, x, w, b, rm, rv, eps: lib.instance_norm(x, None, None, w, b, eps=eps),
    ),
    EpsCase(
        "instance_norm-running",
        lambda lib, x, w, b, rm, rv, eps: lib.instance_norm(
            x, rm, rv, w, b, use_input_stats=True, momentum=0.3, eps=eps
        ),
        buffers=True,
    ),
    EpsCase(
        "instance_norm-eval",
        lambda lib, x, w, b, rm, rv, eps: lib.instance_norm(
            x, rm, rv, w, b, use_input_stats=False, eps=eps
        ),
        buffers=True,
    ),
    EpsCase(
        "batch_norm-eval",
        lambda lib, x, w, b, rm, rv, eps: lib.batch_norm(x, rm, rv, w, b, training=False, eps=eps),
        buffers=True,
        eps_values=(0.0,),
    ),
]
EPS_PARAMS = [
    pytest.param(case, eps, id=f"{case.id}-eps{eps}")
    for case in EPS_CASES
    for eps in case.eps_values
]


def _run_eps_case(lib, case: EpsCase, x, eps, dtype) -> dict:
    """Forward and backward of ``case`` on copies cast to ``dtype``; output, gradients, buffers."""
    device = x.device
    grad = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.linspace(0.5, 1.5, C, dtype=torch.float64)
    b = torch.linspace(-0.2, 0.4, C, dtype=torch.float64)
    leaves = [t.to(device, dtype).requires_grad_() for t in (x, w, b)]
    rm = rv = None
    if case.buffers:
        rm = torch.full((C,), 0.3, dtype=dtype, device=device)
        rv = torch.tensor(VARIANCES, dtype=dtype, device=device)
    y = case.call(lib, *leaves, rm, rv, eps)
    y.backward(grad.to(device, y.dtype).reshape(y.shape))
    out = {"out": y.detach().reshape(x.shape)}
    out.update(
        {f"grad_{n}": t.grad for n, t in zip(("input", "weight", "bias"), leaves, strict=True)}
    )
    if case.buffers:
        out.update(running_mean=rm, running_var=rv)
    return out


@pytest.mark.parametrize("dtype", EPS_DTYPES, ids=str)
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize(("case", "eps"), EPS_PARAMS)
def test_eps_torch_computes(device, case, eps, path, dtype):
    x = _eps_input(device)
    with kernel_path(path):
        ours = _run_eps_case(tn, case, x, eps, dtype)
    torch_same = _run_eps_case(TORCH, case, x, eps, dtype)
    ref = _run_eps_case(TORCH, case, x, eps, torch.float64)
    # The data does what it is for: NaN exactly where var + eps < 0 (for eps = -0.5).
    assert bool(ref["out"].isnan().any()) == (eps < -0.1), "test bug: eps data"
    compare_three(ours, torch_same, ref)


def test_eps_torch_computes_modules(device):
    # The modules pass eps through: GroupNorm and InstanceNorm with a negative eps, BatchNorm in
    # eval with eps = 0, each as torch's module computes it (float64: NaN positions and values).
    x = _eps_input(device)
    pairs = [
        (lambda lib: lib.GroupNorm(C, 2 * C, eps=-0.5), x.reshape(2, 2 * C, 8)),
        (lambda lib: lib.InstanceNorm1d(C, eps=-0.5, affine=True), x),
        (lambda lib: lib.BatchNorm1d(C, eps=0.0).eval(), x),
    ]
    for make, xi in pairs:
        outs = []
        for lib in (tn, TORCH):
            m = make(lib).to(device).double()
            leaf = xi.clone().requires_grad_()
            y = m(leaf)
            y.backward(torch.ones_like(y))
            outs.append((y.detach(), leaf.grad))
        (y, g), (y_ref, g_ref) = outs
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9, equal_nan=True)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, equal_nan=True)


def test_eps_torch_computes_on_the_torch_fallback(device, monkeypatch):
    # Where the kernels do not run (a CPU tensor without the interpreter) the functions call
    # torch's own op: the eps checks must let through exactly what torch computes.
    import tritonnorm.functional as tnf

    monkeypatch.setattr(tnf, "runs_triton", lambda input: False)
    x = _eps_input(device)
    for case in EPS_CASES:
        for eps in case.eps_values:
            ours = _run_eps_case(tn, case, x, eps, torch.float32)
            expected = _run_eps_case(TORCH, case, x, eps, torch.float32)
            for key, t in expected.items():
                assert_bitwise_equal(ours[key], t, f"{case.id} eps={eps} {key}")


def test_group_norm_zero_eps_is_fine(device):
    # eps=0 is legal for GroupNorm, as in torch (unlike batch_norm in training).
    x = torch.randn(2, 6, 4, device=device, dtype=torch.float64)
    torch.testing.assert_close(
        tn.group_norm(x, 2, eps=0.0), F.group_norm(x, 2, eps=0.0), rtol=1e-9, atol=1e-9
    )
