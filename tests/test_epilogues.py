"""Fused epilogues: y = act((x_hat * w + b) * scale + shift + residual) on batch_norm,
instance_norm, group_norm, layer_norm_2d and rms_norm_2d (no b), against the same composition in
torch (float64 reference).

One table of norms x one table of extras; every gradient (input, weight, bias, scale, shift,
residual); running statistics those of the plain op; float64; both layouts; half precision by
the suite's rule; the bytes autograd saves; modules and convert(fuse_activations=True);
torch.compile; bad inputs."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import kernel_path
from norms import CHANNEL_NORMS, NORMS, Norm, norm_params
from tolerances import assert_bitwise_equal, assert_close_to_reference
from torch import nn

import tritonnorm as tn
from tritonnorm.functional import apply_activation

# The rows of tests/norms.py the epilogue runs on (momentum 0.1, eps 1e-5): BN train and eval, IN
# with running statistics (updated, or used in place of the instance statistics), GN with C/2
# groups (2 groups of 2 on SHAPE's 4 channels), LayerNorm2d and RMSNorm2d (statistics across the
# 4 channels at each position; RMS without a bias).
ROWS = ("bn-train", "bn-eval", "in-running", "in-running-eval", "gn-half", *CHANNEL_NORMS)


def rows(*ids):
    return norm_params(ids or ROWS)


# name -> (which of scale / shift / residual are given, activation)
EXTRAS = {
    "scale_shift": ("scale shift", None),
    "scale_only": ("scale", None),
    "shift_only": ("shift", None),
    "residual": ("residual", None),
    "relu": ("", "relu"),
    "leaky_relu": ("", "leaky_relu"),
    "leaky_relu_0.2": ("", ("leaky_relu", 0.2)),
    "silu": ("", "silu"),
    "gelu": ("", "gelu"),
    "gelu_tanh": ("", "gelu_tanh"),
    "scale_shift+silu": ("scale shift", "silu"),  # diffusion ResBlock
    "residual+relu": ("residual", "relu"),  # ResNet block
    "all+gelu_tanh": ("scale shift residual", "gelu_tanh"),
    "all+leaky_relu": ("scale shift residual", ("leaky_relu", 0.3)),
}

SHAPE = (3, 4, 3, 2)  # N=3 (odd: per-sample indexing), C=4 in 2 groups, S=6


def torch_activation(activation):
    if activation is None:
        return lambda y: y
    if isinstance(activation, tuple):
        return functools.partial(F.leaky_relu, negative_slope=activation[1])
    return {
        "relu": F.relu,
        "leaky_relu": F.leaky_relu,
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    }[activation]


def compose(y, scale=None, shift=None, residual=None, activation=None):
    """torch's composition of the epilogue (the reference)."""
    per_sample = lambda t: t.reshape(*t.shape, *([1] * (y.dim() - 2)))
    if scale is not None:
        y = y * per_sample(scale)
    if shift is not None:
        y = y + per_sample(shift)
    if residual is not None:
        y = y + residual
    return torch_activation(activation)(y)


def make_inputs(shape, device, parts, memory_format=torch.contiguous_format, res_format=None):
    """float64 masters: x, w, b, running stats, the extras named in ``parts`` and dy."""
    N, C = shape[:2]
    d = dict(
        x=(torch.randn(shape, dtype=torch.float64, device=device) * 1.5 + 0.5),
        w=torch.rand(C, dtype=torch.float64, device=device) + 0.5,
        b=torch.randn(C, dtype=torch.float64, device=device),
        rm=torch.randn(C, dtype=torch.float64, device=device) * 0.3,
        rv=torch.rand(C, dtype=torch.float64, device=device) + 0.5,
        dy=torch.randn(shape, dtype=torch.float64, device=device),
    )
    d["x"] = d["x"].contiguous(memory_format=memory_format)
    if "scale" in parts:
        d["scale"] = 1.0 + 0.5 * torch.randn(N, C, dtype=torch.float64, device=device)
    if "shift" in parts:
        d["shift"] = torch.randn(N, C, dtype=torch.float64, device=device)
    if "residual" in parts:
        r = torch.randn(shape, dtype=torch.float64, device=device)
        d["residual"] = r.contiguous(memory_format=res_format or memory_format)
    return d


GRADS = ("x", "w", "b", "scale", "shift", "residual")


def run(norm: Norm, activation, inputs, dtype, ours: bool):
    """Forward + backward of ours or of torch's composition, on copies cast to ``dtype``.
    Returns the output, the gradients of every differentiable input (no bias for a row that
    takes none), and the running stats."""
    t = {
        k: v.detach().clone().to(dtype).requires_grad_(k in GRADS)
        for k, v in inputs.items()
        if k != "dy" and (k != "b" or norm.bias)
    }
    rm, rv = (t["rm"].detach(), t["rv"].detach()) if norm.buffers else (None, None)
    common = dict(running_mean=rm, running_var=rv, weight=t["w"], bias=t.get("b"))
    extras = {k: t[k] for k in ("scale", "shift", "residual") if k in t}
    if ours:
        y = norm.ours(t["x"], **common, **extras, activation=activation)
    else:
        y = compose(norm.torch(t["x"], **common), **extras, activation=activation)
    y.backward(inputs["dy"].to(dtype))
    out = {"out": y.detach()}
    if norm.buffers:
        out.update(running_mean=rm, running_var=rv)
    out.update({f"grad_{k}": t[k].grad for k in GRADS if k in t})
    return out


def check(norm, extras, device, dtype=torch.float32, shape=SHAPE, **formats):
    parts, activation = EXTRAS[extras]
    inputs = make_inputs(shape, device, parts, **formats)
    ours = run(norm, activation, inputs, dtype, ours=True)
    ref = run(norm, activation, inputs, torch.float64, ours=False)
    same = run(norm, activation, inputs, dtype, ours=False) if dtype.itemsize == 2 else {}
    for k, r in ref.items():
        assert ours[k] is not None, f"{k}: no gradient"
        assert_close_to_reference(ours[k], r, torch_same_dtype=same.get(k), name=k)
    if formats.get("memory_format") is not None:
        fmt = formats["memory_format"]
        assert ours["out"].is_contiguous(memory_format=fmt), ours["out"].stride()
        assert ours["grad_x"].is_contiguous(memory_format=fmt), ours["grad_x"].stride()
    return ours


@pytest.mark.parametrize("extras", list(EXTRAS))
@pytest.mark.parametrize("norm", rows())
def test_matches_torch_composition(device, norm, extras):
    check(norm, extras, device)


@pytest.mark.parametrize("extras", ["residual+relu", "all+gelu_tanh"])
@pytest.mark.parametrize(
    "norm", rows("bn-train", "bn-eval", "in-running", "gn-half", *CHANNEL_NORMS)
)
def test_channels_last(device, norm, extras):
    # x channels last, the residual contiguous: read through its own strides
    check(
        norm, extras, device, memory_format=torch.channels_last, res_format=torch.contiguous_format
    )


@pytest.mark.parametrize(
    ("norm", "shape"),
    [
        pytest.param(NORMS["bn-train"], (5, 3), id="bn-train-NC"),  # (N, C) input: S = 1
        pytest.param(NORMS["bn-eval"], (5, 3), id="bn-eval-NC"),
        pytest.param(NORMS["in-running"], (2, 3, 7), id="in-running-NCL"),  # 1-D, prime length
        pytest.param(NORMS["gn-3per"], (1, 6, 5), id="gn-3per-N1"),  # N = 1, 3 channels a group
        pytest.param(NORMS["ln2d"], (5, 3), id="ln2d-NC"),  # one position per sample
        pytest.param(NORMS["ln2d"], (3, 7, 2, 1, 3), id="ln2d-NCDHW"),  # 3-D, 7 channels
        pytest.param(NORMS["rms2d"], (1, 5, 1, 1), id="rms2d-1x1"),  # one sample, one position
        pytest.param(NORMS["rms2d"], (2, 67, 3), id="rms2d-C67"),  # C beyond a power of two
    ],
)
def test_odd_shapes(device, norm, shape):
    check(norm, "all+leaky_relu", device, shape=shape)


@pytest.mark.parametrize("norm", rows("bn-train", "in-running", "gn-half", *CHANNEL_NORMS))
def test_empty_batch(device, norm):
    parts, activation = EXTRAS["all+gelu_tanh"]
    inputs = make_inputs((0, 4, 3, 2), device, parts)
    out = run(norm, activation, inputs, torch.float32, ours=True)
    assert out["out"].shape == (0, 4, 3, 2)
    assert out["grad_scale"].shape == (0, 4) and out["grad_residual"].shape == (0, 4, 3, 2)
    assert torch.equal(out["grad_w"], torch.zeros_like(out["grad_w"]))
    if norm.buffers:  # an empty batch changes nothing
        assert torch.equal(out["running_mean"], inputs["rm"].float())


def test_deterministic(device):
    parts, activation = EXTRAS["all+gelu_tanh"]
    inputs = make_inputs(SHAPE, device, parts)
    with kernel_path("split"):
        first = run(NORMS["bn-train"], activation, inputs, torch.float32, ours=True)
        second = run(NORMS["bn-train"], activation, inputs, torch.float32, ours=True)
    for k in first:
        assert_bitwise_equal(first[k], second[k], k)


@pytest.mark.parametrize("norm", rows("bn-train", "in-running", "gn-half", *CHANNEL_NORMS))
def test_split_path(device, norm):
    # statistics split over 3 programs: y written by the apply pass, not the fused statistics one
    # (LayerNorm2d / RMSNorm2d: the backward's per-sample dscale / dshift partials over 3 programs)
    with kernel_path("split"):
        check(norm, "all+gelu_tanh", device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize(
    "norm", rows("bn-train", "bn-eval", "in-running", "gn-half", *CHANNEL_NORMS)
)
def test_half_precision(device, norm, dtype):
    check(norm, "all+leaky_relu", device, dtype=dtype)


@pytest.mark.parametrize("norm", rows("bn-train", "in-running"))
def test_running_statistics_are_the_plain_ops(device, norm):
    parts, activation = EXTRAS["all+gelu_tanh"]
    inputs = make_inputs(SHAPE, device, parts)
    with_extras = run(norm, activation, inputs, torch.float32, ours=True)
    plain = run(norm, None, {k: inputs[k] for k in ("x", "w", "b", "rm", "rv", "dy")},
                torch.float32, ours=True)  # fmt: skip
    assert_bitwise_equal(with_extras["running_mean"], plain["running_mean"], "running_mean")
    assert_bitwise_equal(with_extras["running_var"], plain["running_var"], "running_var")


@pytest.mark.parametrize("extras", ["all+gelu_tanh", "scale_shift+silu"])
@pytest.mark.parametrize(
    "norm", rows("bn-train", "bn-eval", "in-running", "gn-half", *CHANNEL_NORMS)
)
def test_float64(device, norm, extras):
    # The float64 check of the epilogue's gradients (the comparisons above are in float32 and
    # half precision): every gradient, scale, shift and residual included, against torch's
    # float64 composition to 1e-9 (tolerances.py). It replaces a gradcheck (finite differences
    # of our own forward, whose match with torch's the forward comparison checks) at a tenth of
    # its cost under the interpreter.
    check(norm, extras, device, dtype=torch.float64, shape=(2, 4, 3))


# --------------------------------------------------------------------------------------------
# Memory: backward recomputes; the op saves the input and (N, C)-sized tensors only


def saved_tensors(fn):
    """Distinct tensors autograd saves while ``fn()`` runs, as (storage pointer, numel,
    bytes)."""
    seen = {}

    def pack(t):
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
            seen[key] = (key[0], t.numel(), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, list(seen.values())


def test_group_norm_scale_shift_silu_saves_only_the_input(device):
    N, C, H, W = 2, 8, 4, 4
    x = torch.randn(N, C, H, W, device=device, requires_grad=True)
    w = torch.randn(C, device=device, requires_grad=True)
    b = torch.randn(C, device=device, requires_grad=True)
    scale = torch.randn(N, C, device=device, requires_grad=True)
    shift = torch.randn(N, C, device=device, requires_grad=True)

    _, ours = saved_tensors(
        lambda: tn.group_norm(x, 4, w, b, scale=scale, shift=shift, activation="silu")
    )
    _, theirs = saved_tensors(
        lambda: F.silu(F.group_norm(x, 4, w, b) * scale[:, :, None, None] + shift[:, :, None, None])
    )
    full = [n for _, n, _ in ours if n > N * C]
    assert full == [x.numel()], f"full-size tensors saved: {full} (only x allowed)"
    ours_bytes, theirs_bytes = sum(b for *_, b in ours), sum(b for *_, b in theirs)
    assert ours_bytes <= x.numel() * 4 + 6 * N * C * 4, ours
    theirs_full = sum(1 for _, n, _ in theirs if n >= x.numel())
    assert theirs_full >= 3, theirs
    print(
        f"saved bytes, GN+scale/shift+SiLU {tuple(x.shape)} fp32: tritonnorm {ours_bytes} "
        f"(input {x.numel() * 4}), torch composition {theirs_bytes} ({theirs_full} full-size)"
    )


@pytest.mark.parametrize(
    "activation, kept",
    [("relu", "output"), (("leaky_relu", 0.2), "output"), (("leaky_relu", -0.2), "residual"),
     ("silu", "residual")],
)  # fmt: skip
def test_relu_with_a_residual_keeps_the_output_not_the_residual(device, activation, kept):
    # ReLU (and a leaky ReLU of slope >= 0) has act'(z) = act'(y): the op keeps its output, which
    # its consumer keeps anyway (torch's relu saves its result too), and the residual is freed.
    # A negative slope or a smooth activation needs z itself: the residual stays.
    x = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
    residual = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
    w, b = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    y, saved = saved_tensors(
        lambda: tn.batch_norm(x, None, None, w, b, True, residual=residual, activation=activation)
    )
    storages = {s for s, *_ in saved}
    expected = {"output": y, "residual": residual}[kept]
    assert x.untyped_storage().data_ptr() in storages
    assert expected.untyped_storage().data_ptr() in storages
    other = residual if kept == "output" else y
    assert other.untyped_storage().data_ptr() not in storages
    full = [n for _, n, _ in saved if n == x.numel()]
    assert len(full) == 2, saved  # the input and one of (output, residual)
    # Kept beyond the op's input, parameters and output: the residual only where z is needed
    # (and the (1, C) statistics).
    own = {t.untyped_storage().data_ptr() for t in (x, w, b, y)}
    beyond = sum(nbytes for s, _, nbytes in saved if s not in own)
    assert beyond == (residual.numel() * 4 if kept == "residual" else 0) + 2 * 3 * 4, saved
    dy = torch.randn_like(y)
    name, slope = (activation, 0.01) if isinstance(activation, str) else activation
    z = F.batch_norm(x, None, None, w, b, True) + residual
    ref = apply_activation(z, name, slope)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(y, (x, residual), dy)
    want = torch.autograd.grad(ref, (x, residual), dy)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Modules and convert(fuse_activations=True)


@pytest.mark.parametrize("cls", tn.modules.MODULES, ids=lambda c: c.__name__)
def test_modules_take_an_activation(cls):
    lazy = cls.__name__.startswith("Lazy")
    args = () if lazy else ((2, 4) if cls is tn.GroupNorm else (4,))
    m = cls(*args, activation=("leaky_relu", 0.2))
    torch_cls = next(b for b in cls.__bases__ if b is not tn.modules.TritonNormMixin)
    assert list(m.state_dict()) == list(torch_cls(*args).state_dict())
    assert "activation=('leaky_relu', 0.2)" in repr(m)
    assert "activation" not in repr(cls(*args))
    with pytest.raises(ValueError, match="relu"):
        cls(*args, activation="tanh")


def test_sync_batch_norm_takes_an_activation(device):
    m = tn.SyncBatchNorm(4, activation="silu").to(device)
    assert "activation='silu'" in repr(m)
    x = torch.randn(3, 4, 2, 2, device=device)
    ref = nn.BatchNorm2d(4).to(device)
    torch.testing.assert_close(m(x), F.silu(ref(x)), rtol=1e-5, atol=1e-5)


def make_model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.SiLU(),
        nn.Conv2d(4, 4, 1),
        nn.InstanceNorm2d(4, affine=True),
        nn.LeakyReLU(0.2),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        nn.GELU(approximate="tanh"),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(1, 4), nn.GELU()),
    )


def test_convert_fuse_activations_trains_like_torch(device):
    ref = make_model().to(device)
    ours = make_model().to(device)
    ours.load_state_dict(ref.state_dict())
    tn.convert(ours, fuse_activations=True)
    folded = [m.activation for m in ours.modules() if isinstance(m, tn.modules.TritonNormMixin)]
    assert folded == ["relu", "silu", ("leaky_relu", 0.2), "gelu_tanh", "gelu"]
    assert sum(isinstance(m, nn.Identity) for m in ours.modules()) == 5
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict())  # loads both ways
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(2, 3, 5, 5, device=device)
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 5, 5, device=device)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# torch.compile


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    N, C = 2, 4

    def block(h, t_scale, t_shift, identity, w, b):
        h = tn.group_norm(h, 2, w, b, scale=1 + t_scale, shift=t_shift, activation="silu")
        return tn.batch_norm(h, None, None, w, b, True, residual=identity, activation="relu")

    args = [torch.randn(N, C, 3, 3, device=device), torch.randn(N, C, device=device),
            torch.randn(N, C, device=device), torch.randn(N, C, 3, 3, device=device),
            torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)]  # fmt: skip
    eager = [a.clone().requires_grad_() for a in args]
    traced = [a.clone().requires_grad_() for a in args]
    y_eager = block(*eager)
    y_eager.sum().backward()
    y_comp = torch.compile(block, backend="aot_eager", fullgraph=True)(*traced)
    y_comp.sum().backward()
    torch.testing.assert_close(y_comp, y_eager)
    for a, b in zip(traced, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# --------------------------------------------------------------------------------------------
# Bad inputs raise before any running statistic changes

BAD = {
    "scale_not_NC": (dict(scale=torch.ones(4)), ValueError, "scale of shape"),
    "scale_transposed": (dict(scale=torch.ones(4, 3)), ValueError, "scale of shape"),
    "shift_wrong_C": (dict(shift=torch.ones(3, 5)), ValueError, "shift of shape"),
    "scale_dtype": (dict(scale=torch.ones(3, 4, dtype=torch.int64)), TypeError, "floating dtype"),
    "residual_shape": (dict(residual=torch.ones(3, 4, 3, 3)), ValueError, "residual"),
    "residual_dtype": (
        dict(residual=torch.ones(*SHAPE, dtype=torch.int32)),
        TypeError,
        "floating dtype",
    ),
    "unknown_activation": (dict(activation="tanh"), ValueError, "'relu', 'leaky_relu', 'silu'"),
    "relu_with_slope": (dict(activation=("relu", 0.1)), ValueError, "unknown activation"),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("norm", rows("bn-train", "in-running", "gn-half", *CHANNEL_NORMS))
def test_bad_inputs_raise_before_running_statistics_change(device, norm, bad):
    kwargs, error, match = BAD[bad]
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    x = torch.randn(SHAPE, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    buffers = dict(running_mean=rm, running_var=rv) if norm.buffers else {}
    with pytest.raises(error, match=match):
        norm.ours(x, **buffers, **kwargs)
    assert torch.equal(rm, torch.zeros(4, device=device))
    assert torch.equal(rv, torch.ones(4, device=device))


def test_module_with_bad_activation_changes_nothing(device):
    m = tn.BatchNorm2d(4).to(device)
    m.activation = "swish"
    with pytest.raises(ValueError, match="unknown activation"):
        m(torch.randn(SHAPE, device=device))
    assert m.num_batches_tracked.item() == 0
    assert torch.equal(m.running_mean, torch.zeros(4, device=device))
