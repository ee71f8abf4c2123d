"""torch.func transforms, forward-mode AD, mixed dtypes and autocast, each against torch.

* ``torch.func.grad``, ``vjp`` and ``jacrev`` (which vmaps the backward) through every op of the
  table (BN train / eval, IN plain / with running statistics / ``use_input_stats=False``, GN,
  LayerNorm2d, RMSNorm2d), plain and with every fused extra, float64;
* ``vmap`` of every per-sample norm (IN, GN, LayerNorm2d, RMSNorm2d, eval BN and IN): mapped at
  axis 0, at axis 1 with ``out_dims=1``, and as an ensemble (weight, bias and extras mapped too);
  per-sample gradients ``vmap(grad(...))``; training BN and IN under vmap exactly as torch: each
  mapped slice normalised over its own batch, mapped running statistics updated per slice,
  unmapped ones refused with torch's RuntimeError ("... were not batched");
* forward-mode AD: ``torch.func.jvp`` (tangents on the input only, and on every differentiable
  argument) and ``torch.autograd.forward_ad`` dual tensors (primals with and without
  ``requires_grad``) for every op, ``jacfwd``, and a Hessian ``jacfwd(jacrev(...))``;
* mixed dtypes: scale, shift and residual of another floating dtype than the input give torch's
  composition's result dtype, values, and each gradient in its own input's dtype;
* autocast: tritonnorm keeps the input's dtype under ``torch.autocast`` (statistics in float32
  inside), within the suite's tolerance of torch's values; torch's own dtypes on the CPU are
  recorded in TORCH_CPU_AUTOCAST.

Every test runs over ``lib`` (tests/twins.py): tritonnorm, or with ``TRITONNORM_TEST_LIBS`` the
pure-torch twin (all pass) or a broken twin (they fail). The reference is always the torch twin
under the very same transform.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from tolerances import assert_bitwise_equal, assert_close_to_reference
from twins import (
    OPS,
    PER_SAMPLE,
    TORCH,
    TORCH_AS_IS,
    as_function,
    case_params,
    fresh,
    make_args,
    over_libs,
    split,
)

pytestmark = [
    over_libs,
    # torch's forward AD loads its jvp decompositions through torch.jit.script on first use
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]


def _assert_all_close(ours, ref, names, what):
    assert len(ours) == len(ref), what
    for name, a, b in zip(names, ours, ref, strict=True):
        assert a is not None, f"{what} {name}: None"
        assert_close_to_reference(a, b, name=f"{what} {name}")


def _assert_same_running(ours: dict, ref: dict):
    for k in ("running_mean", "running_var"):
        if k in ref:
            assert_close_to_reference(ours[k], ref[k], name=k)


def _weights(args, device):
    """Fixed random weights of the output (a projection, so that every output counts)."""
    return torch.randn(args["input"].shape, dtype=torch.float64, device=device)


# --- torch.func: grad, vjp, jacrev ----------------------------------------------------------------


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev"])
@pytest.mark.parametrize(("op", "extras"), case_params())
def test_torch_func_reverse_mode(lib, device, op, extras, transform):
    args = make_args(op, extras, device=device)
    names, tensors, _ = split(args)
    weights = _weights(args, device)
    argnums = tuple(range(len(names)))

    def run(ns):
        own = fresh(args)  # the running statistics move as torch moves them under the transform
        f = as_function(ns, op, own, names)
        if transform == "grad":
            out = torch.func.grad(lambda *t: (f(*t) * weights).sum(), argnums=argnums)(*tensors)
        elif transform == "vjp":
            y, vjp = torch.func.vjp(f, *tensors)
            out = (y, *vjp(weights))
        else:  # (N, C) outputs: jacrev vmaps the backward over N * C cotangents
            g = lambda *t: (f(*t) * weights).sum(dim=(2, 3))
            out = torch.func.jacrev(g, argnums=argnums)(*tensors)
        return out, own

    (ours, own), (ref, own_ref) = run(lib), run(TORCH)
    labels = ("y", *names) if transform == "vjp" else names
    _assert_all_close(ours, ref, labels, transform)
    _assert_same_running(own, own_ref)


# --- vmap -------------------------------------------------------------------------------------------

B = 3  # the mapped axis

# layout -> (the mapped axis of each argument: input, weight, bias, scale, shift, residual; None:
# not mapped), out_dims
LAYOUTS = {
    # a batch of batches; the parameters and per-sample scale / shift shared
    "dim0": (dict(input=0, residual=0), 0),
    # mapped at axis 1 of x (N, B, C, H, W), of the residual and of scale / shift (N, B, C);
    # the output's mapped axis at 1 too
    "dim1-out1": (dict(input=1, residual=1, scale=1, shift=1), 1),
    # an ensemble: B models, each with its own weight, bias and extras, on its own input
    "ensemble": (dict(input=0, weight=0, bias=0, scale=0, shift=0, residual=0), 0),
}


def _mapped(op, extras, device, dims: dict, *, running_dim=None):
    """(args of one slice with every mapped argument stacked at its axis, in_dims by name): B
    independent draws; the unmapped arguments the first draw's. ``running_dim``: the running
    statistics mapped too (at that axis)."""
    draws = [make_args(op, extras, device=device) for _ in range(B)]
    args, in_dims = dict(draws[0]), {}
    for k, v in draws[0].items():
        dim = running_dim if k.startswith("running") else dims.get(k)
        if isinstance(v, torch.Tensor) and dim is not None:
            args[k] = torch.stack([d[k] for d in draws], dim)
            in_dims[k] = dim
    return args, in_dims


def _vmap(ns, op, args, in_dims, out_dims=0):
    """``op`` under vmap, mapped over every argument of ``in_dims`` (running statistics too)."""
    names = tuple(in_dims)
    f = as_function(ns, op, args, names)
    return torch.func.vmap(f, in_dims=tuple(in_dims.values()), out_dims=out_dims)(
        *(args[k] for k in names)
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(("op", "extras"), case_params([
    (o, e) for o in PER_SAMPLE for e in ("plain", "all-silu")
]))  # fmt: skip
def test_vmap_per_sample_norms(lib, device, op, extras, layout):
    dims, out_dims = LAYOUTS[layout]
    args, in_dims = _mapped(op, extras, device, dims)
    ours = _vmap(lib, op, fresh(args), in_dims, out_dims)
    ref = _vmap(TORCH, op, fresh(args), in_dims, out_dims)
    assert_close_to_reference(ours, ref, name="y")
    # and what vmap means: each slice alone
    x_dim = in_dims["input"]
    for i in range(B):
        one = {k: v.select(in_dims[k], i) if k in in_dims else v for k, v in args.items()}
        assert_close_to_reference(ours.select(out_dims, i), op.call(TORCH, **fresh(one)),
                                  name=f"slice {i}")  # fmt: skip
    assert ours.shape == ref.shape
    assert ours.shape[out_dims] == B and args["input"].shape[x_dim] == B


@pytest.mark.parametrize(("op", "extras"), case_params([
    (o, e) for o in PER_SAMPLE for e in ("plain", "all-silu")
]))  # fmt: skip
def test_vmap_of_grad_gives_per_sample_gradients(lib, device, op, extras):
    # One sample at a time (N=1 inside the map), the parameters' gradient per sample: the
    # classic per-sample-gradient recipe (DP-SGD), through the backward under vmap.
    args = make_args(op, extras, device=device, shape=(B, 4, 3, 3))
    params = tuple(k for k in ("weight", "bias") if k in args)
    samples = tuple(k for k in ("input", "scale", "shift", "residual") if k in args)
    fixed = {k: v for k, v in args.items() if k not in params + samples}
    weights = _weights(args, device)

    def per_sample_grads(ns):
        def loss(p, s, w):
            one = {k: v.unsqueeze(0) for k, v in s.items()}
            y = op.call(ns, **fresh(fixed), **p, **one)
            return (y * w.unsqueeze(0)).sum()

        p = {k: args[k] for k in params}
        s = {k: args[k] for k in samples}
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(p, s, weights)

    ours, ref = per_sample_grads(lib), per_sample_grads(TORCH)
    for k in params:
        assert ours[k].shape == (B, *args[k].shape)
        assert_close_to_reference(ours[k], ref[k], name=f"per-sample grad {k}")


@pytest.mark.parametrize("in_dim", [0, 1])
@pytest.mark.parametrize("extras", ["plain", "all-silu"])
def test_vmap_batch_norm_training_normalises_each_slice_over_its_batch(lib, device, extras,
                                                                      in_dim):  # fmt: skip
    # training BN without running statistics: each mapped slice is a batch of its own
    op = OPS["bn-train"]
    args, in_dims = _mapped(op, extras, device, dict(input=in_dim, residual=in_dim))
    del args["running_mean"], args["running_var"]
    ours = _vmap(lib, op, args, in_dims)
    ref = _vmap(TORCH, op, args, in_dims)
    assert_close_to_reference(ours, ref, name="y")


@pytest.mark.parametrize("op", [OPS["bn-train"], OPS["in-running"]], ids=lambda o: o.id)
def test_vmap_training_with_mapped_running_statistics(lib, device, op):
    # running statistics mapped with the input: each slice updates its own, as torch
    args, in_dims = _mapped(op, "all-silu", device, dict(input=0, residual=0), running_dim=0)
    own, own_ref = fresh(args), fresh(args)
    ours = _vmap(lib, op, own, in_dims)
    ref = _vmap(TORCH, op, own_ref, in_dims)
    assert_close_to_reference(ours, ref, name="y")
    _assert_same_running(own, own_ref)
    assert not torch.equal(own["running_mean"], args["running_mean"]), "running mean not updated"


@pytest.mark.parametrize("op", [OPS["bn-train"], OPS["in-running"]], ids=lambda o: o.id)
def test_vmap_training_with_unmapped_running_statistics_raises(lib, device, op):
    # torch refuses: the in-place update of shared buffers by every slice is undefined
    args, in_dims = _mapped(op, "plain", device, dict(input=0))
    own = fresh(args)
    with pytest.raises(RuntimeError, match="not batched") as error:
        _vmap(lib, op, own, in_dims)
    if lib.name == "tritonnorm":  # beyond torch's message: which op, under which transform
        function = {"bn-train": "batch_norm", "in-running": "instance_norm"}[op.id]
        assert function in str(error.value) and "vmap" in str(error.value), error.value
    for k in ("running_mean", "running_var"):
        assert_bitwise_equal(own[k], args[k], name=f"{k} after the error")


# --- forward-mode AD --------------------------------------------------------------------------------


def _tangents(tensors):
    return tuple(torch.randn_like(t) for t in tensors)


@pytest.mark.parametrize("tangents", ["input", "all"])
@pytest.mark.parametrize(("op", "extras"), case_params())
def test_jvp(lib, device, op, extras, tangents):
    args = make_args(op, extras, device=device)
    names, tensors, _ = split(args)
    if tangents == "input":  # the other arguments constants of the function
        names, tensors = names[:1], tensors[:1]
    directions = _tangents(tensors)

    def run(ns):
        own = fresh(args)
        return torch.func.jvp(as_function(ns, op, own, names), tensors, directions), own

    ((y, t), own), ((y_ref, t_ref), own_ref) = run(lib), run(TORCH)
    assert_close_to_reference(y, y_ref, name="y")
    assert_close_to_reference(t, t_ref, name="tangent")
    _assert_same_running(own, own_ref)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["primal", "primal-requires-grad"])
@pytest.mark.parametrize(("op", "extras"), case_params())
def test_forward_ad_dual_tensors(lib, device, op, extras, requires_grad):
    args = make_args(op, extras, device=device)
    names, tensors, _ = split(args)
    directions = _tangents(tensors)
    weights = _weights(args, device)

    def run(ns):
        leaves = tuple(t.detach().clone().requires_grad_(requires_grad) for t in tensors)
        own = fresh(args)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, d) for p, d in zip(leaves, directions, strict=True)]
            y, tangent = fwAD.unpack_dual(as_function(ns, op, own, names)(*duals))
        # reverse mode through the same call still works (after the level: inside it, torch's
        # own backward would be asked for forward derivatives of silu_backward & co.)
        grads = torch.autograd.grad((y * weights).sum(), leaves) if requires_grad else ()
        return y, tangent, grads, own

    y, t, grads, own = run(lib)
    y_ref, t_ref, grads_ref, own_ref = run(TORCH)
    assert t is not None, "no tangent: the op dropped the dual tensors"
    assert_close_to_reference(y, y_ref, name="y")
    assert_close_to_reference(t, t_ref, name="tangent")
    if requires_grad:
        _assert_all_close(grads, grads_ref, names, "grad")
    _assert_same_running(own, own_ref)


@pytest.mark.parametrize(("op", "extras"), case_params([("bn-train", "residual-relu"),
                                                        ("in-eval", "all-silu")]))  # fmt: skip
def test_jacfwd(lib, device, op, extras):
    # jacfwd vmaps the jvp over one tangent per input element: the input (1, 4, 2, 2) is small
    args = make_args(op, extras, device=device, shape=(2, 4, 2, 1))
    names, tensors, _ = split(args)
    argnums = tuple(range(len(names)))
    ours = torch.func.jacfwd(as_function(lib, op, fresh(args), names), argnums)(*tensors)
    ref = torch.func.jacfwd(as_function(TORCH, op, fresh(args), names), argnums)(*tensors)
    _assert_all_close(ours, ref, names, "jacobian")


@pytest.mark.parametrize(("op", "extras"), case_params([("gn", "all-silu")]))
def test_hessian(lib, device, op, extras):
    # forward-over-reverse: jvp of the backward, vmapped over the input's 16 elements
    args = make_args(op, extras, device=device, shape=(2, 4, 2, 1))
    names, tensors, _ = split(args)
    weights = _weights(args, device)

    def hessian(ns):
        f = as_function(ns, op, fresh(args), names[1:] + names[:1])  # input last: argnums=-1
        loss = lambda *t: (f(*t) * weights).sum()
        return torch.func.hessian(loss, argnums=len(names) - 1)(*tensors[1:], tensors[0])

    ours, ref = hessian(lib), hessian(TORCH)
    assert ours.shape == (*tensors[0].shape, *tensors[0].shape)
    assert_close_to_reference(ours, ref, name="hessian")


# --- mixed dtypes -----------------------------------------------------------------------------------

bf16, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64

# id -> (op, extras, dtypes by argument; the others float32)
MIXED = {
    # a diffusion block in bf16 with a float32 skip connection
    "gn-bf16-residual-f32-silu": ("gn", "residual-silu", dict(input=bf16, residual=f32)),
    # bf16 activations, float32 time-embedding scale / shift
    "bn-train-bf16-scale-shift-f32": ("bn-train", "scale-shift", dict(input=bf16)),
    # float32 activations, lower-precision scale / shift: still float32 out
    "in-f32-scale-shift-bf16": ("in", "scale-shift", dict(scale=bf16, shift=bf16)),
    # a float64 residual promotes the output to float64; ReLU: the op keeps its output
    "ln2d-f32-residual-f64-relu": ("ln2d", "residual-relu", dict(residual=f64)),
    "rms2d-bf16-all-f32-silu": ("rms2d", "all-silu", dict(input=bf16)),
    "bn-eval-f16-residual-f32-relu": ("bn-eval", "residual-relu", dict(input=f16)),
    "in-eval-f32-all-f64-silu": ("in-eval", "all-silu", dict(scale=f64, shift=f64, residual=f64)),
}

_BITS = {f64: 53, f32: 24, f16: 11, bf16: 8}

# torch's rms_norm (the reference) warns of a bf16 input with a float32 weight, then computes
_TORCH_RMS_NORM_WARNS = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")


def _assert_no_worse_than_torch(ours, ref, torch_same, low, name):
    """``ours`` against the float64 ``ref`` by the suite's rule for ``low``, the least precise
    dtype among the call's tensors (compared after rounding to it): for half precision, within
    twice the error of torch's composition computed in the same dtypes. A fused kernel does not
    round the normalised value to the input's dtype before the epilogue, torch's composition
    does: an absolute rule of the output's wider dtype would fail torch itself."""
    assert ours is not None, f"{name}: None"
    same = torch_same.to(low) if low in (f16, bf16) else None
    assert_close_to_reference(ours.to(low), ref, torch_same_dtype=same, name=name)


@_TORCH_RMS_NORM_WARNS
@pytest.mark.parametrize(("op", "extras", "dtypes"), [
    pytest.param(OPS[o], e, d, id=i) for i, (o, e, d) in MIXED.items()
])  # fmt: skip
def test_mixed_dtypes(lib, device, op, extras, dtypes):
    args = make_args(op, extras, device=device, dtype=f32, dtypes=dtypes)
    names, tensors, _ = split(args)
    low = min((t.dtype for t in tensors), key=_BITS.get)

    def run(ns, dtype=None):
        leaves = tuple((t if dtype is None else t.to(dtype)).detach().clone().requires_grad_()
                       for t in tensors)  # fmt: skip
        own = {k: v.to(dtype) if dtype and isinstance(v, torch.Tensor) else v
               for k, v in fresh(args).items()}  # fmt: skip
        y = as_function(ns, op, own, names)(*leaves)
        torch.manual_seed(1)
        y.backward(torch.randn(y.shape, dtype=f64, device=device).to(y.dtype))
        return y.detach(), [t.grad for t in leaves], own

    y, grads, own = run(lib)
    y_torch, grads_torch, own_torch = run(TORCH)
    y_ref, grads_ref, own_ref = run(TORCH, f64)
    assert y.dtype == y_torch.dtype, f"output {y.dtype}, torch's composition {y_torch.dtype}"
    _assert_no_worse_than_torch(y, y_ref, y_torch, low, "y")
    for name, t, g, g_torch, g_ref in zip(names, tensors, grads, grads_torch, grads_ref,
                                          strict=True):  # fmt: skip
        assert g is not None, f"grad {name}: None"
        assert g.dtype == t.dtype == g_torch.dtype, f"grad {name}: {g.dtype}, input {t.dtype}"
        _assert_no_worse_than_torch(g, g_ref, g_torch, low, f"grad {name}")
    for k in ("running_mean", "running_var"):
        if k in args and op.running == "update":
            _assert_no_worse_than_torch(own[k], own_ref[k], own_torch[k], low, k)


# --- autocast ---------------------------------------------------------------------------------------

# What torch returns under torch.autocast("cpu", dtype=torch.bfloat16) (torch 2.13, measured by
# this test on the CPU), for the input's dtype: every op keeps it; none of batch_norm,
# instance_norm, group_norm, layer_norm, rms_norm is on CPU autocast's float32 list. (CUDA's
# autocast runs group_norm and layer_norm in float32 and returns float32; batch_norm keeps the
# input's dtype.) tritonnorm keeps the input's dtype on every device: statistics are float32
# inside anyway, and a float32 output would double the bytes written and read next.
TORCH_CPU_AUTOCAST = {
    #           bf16 input  float32 input
    "bn-train": (bf16, f32),
    "bn-eval": (bf16, f32),
    "in": (bf16, f32),
    "in-running": (bf16, f32),
    "in-eval": (bf16, f32),
    "gn": (bf16, f32),
    "ln2d": (bf16, f32),
    "rms2d": (bf16, f32),
}


@_TORCH_RMS_NORM_WARNS
@pytest.mark.parametrize("dtype", [bf16, f32], ids=["bf16", "f32"])
@pytest.mark.parametrize(("op", "extras"), case_params([
    (o, e) for o in OPS for e in ("plain", "all-silu")
]))  # fmt: skip
def test_autocast_keeps_the_input_dtype(lib, device, op, extras, dtype):
    # as under autocast in a model: float32 parameters and running statistics, activations
    # (input, residual, a Linear's scale / shift) in the autocast dtype or float32
    extras_dtype = {k: dtype for k in ("input", "scale", "shift", "residual")}
    args = make_args(op, extras, device=device, dtype=f32, dtypes=extras_dtype)
    names, tensors, _ = split(args)

    def run(ns, cast=None, autocast=True):
        leaves = tuple((t if cast is None else t.to(cast)).detach().clone().requires_grad_()
                       for t in tensors)  # fmt: skip
        own = {k: v.to(cast) if cast and isinstance(v, torch.Tensor) else v
               for k, v in fresh(args).items()}  # fmt: skip
        with torch.autocast(device, dtype=bf16, enabled=autocast):
            y = as_function(ns, op, own, names)(*leaves)
        torch.manual_seed(1)
        y.backward(torch.randn(y.shape, dtype=f64, device=device).to(y.dtype))
        return y.detach(), [t.grad for t in leaves]

    y, grads = run(lib)
    y_torch, grads_torch = run(TORCH_AS_IS)
    y_ref, grads_ref = run(TORCH, cast=f64, autocast=False)
    assert y.dtype == dtype, f"{y.dtype} under autocast for a {dtype} input"
    if device == "cpu":
        assert y_torch.dtype == TORCH_CPU_AUTOCAST[op.id][dtype != bf16], y_torch.dtype
    _assert_no_worse_than_torch(y, y_ref, y_torch, dtype, "y")
    for name, t, g, g_torch, g_ref in zip(names, tensors, grads, grads_torch, grads_ref,
                                          strict=True):  # fmt: skip
        assert g is not None and g.dtype == t.dtype, f"grad {name}: {g and g.dtype}"
        _assert_no_worse_than_torch(g, g_ref, g_torch, dtype, f"grad {name}")
