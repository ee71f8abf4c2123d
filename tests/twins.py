"""The libraries the autograd-transform tests run over, and the table of ops they call.

tests/test_higher_order.py and tests/test_transforms.py take a ``lib``: a namespace with
tritonnorm's five functions (``batch_norm``, ``instance_norm``, ``group_norm``, ``layer_norm_2d``,
``rms_norm_2d``, each with the keyword-only extras ``scale``, ``shift``, ``residual``,
``activation``), the custom op ``norm_forward`` and ``convert``. Besides tritonnorm there is a
pure-torch twin with the same signatures, computed by torch's own functions and composition, which
is how the tests themselves are proven right: against the twin every test passes. Two
deliberately broken twins show that the tests can fail.

``TRITONNORM_TEST_LIBS`` (comma-separated) picks the libraries; the default runs tritonnorm only:

* ``tritonnorm`` - the library under test;
* ``torch`` - the twin: every test must pass;
* ``torch-first-order`` - the twin behind an ``autograd.Function`` whose backward is computed
  without a graph and that defines neither ``jvp`` nor ``vmap`` (what a first-order-only custom
  op is): double backward, forward AD and vmap tests must fail;
* ``torch-off`` - the twin with outputs 3% off and cast to the input's dtype: value and dtype
  comparisons must fail.

The tests always compare against :data:`TORCH` (the correct twin), so with ``torch`` they compare
torch with itself; what they prove there is that the checks and the reference computation run
under every transform and pass for torch's own behaviour.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonnorm as tn
from tritonnorm.activations import CODES

# --- the torch twin -----------------------------------------------------------------------------


def activate(y, activation):
    """torch's activation for tritonnorm's ``activation`` argument (name or (name, slope))."""
    if activation is None:
        return y
    name, slope = activation if isinstance(activation, tuple) else (activation, 0.01)
    return {
        "relu": lambda: F.relu(y),
        "leaky_relu": lambda: F.leaky_relu(y, slope),
        "silu": lambda: F.silu(y),
        "gelu": lambda: F.gelu(y),
        "gelu_tanh": lambda: F.gelu(y, approximate="tanh"),
    }[name]()


def compose(y, input, scale=None, shift=None, residual=None, activation=None, *,
            keep_dtype=True):  # fmt: skip
    """act((y * scale + shift) + residual) with scale, shift of shape (N, C), broadcast over the
    spatial axes. Under autocast ``y``, the plain norm's output, is taken in the input's dtype,
    as tritonnorm keeps it (CUDA's torch returns float32 for group_norm / layer_norm there)."""
    if keep_dtype and y.dtype != input.dtype and torch.is_autocast_enabled(input.device.type):
        y = y.to(input.dtype)
    extra = (1,) * (y.dim() - 2)
    if scale is not None:
        y = y * scale.reshape(*scale.shape, *extra)
    if shift is not None:
        y = y + shift.reshape(*shift.shape, *extra)
    if residual is not None:
        y = y + residual
    return activate(y, activation)


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5, **extras):  # fmt: skip
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return compose(y, input, **extras)


def _instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                   use_input_stats=True, momentum=0.1, eps=1e-5, **extras):  # fmt: skip
    y = F.instance_norm(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
    )
    return compose(y, input, **extras)


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, **extras):
    return compose(F.group_norm(input, num_groups, weight, bias, eps), input, **extras)


def _layer_norm_2d(input, weight=None, bias=None, eps=1e-6, **extras):
    C = input.shape[1]
    y = F.layer_norm(input.movedim(1, -1), (C,), weight, bias, eps).movedim(-1, 1)
    return compose(y, input, **extras)


def _rms_norm_2d(input, weight=None, eps=1e-6, **extras):
    C = input.shape[1]
    y = F.rms_norm(input.movedim(1, -1), (C,), weight, eps).movedim(-1, 1)
    return compose(y, input, **extras)


_NAMES_OF_CODES = {code: name for name, code in CODES.items()}


def _norm_forward(ns):
    """``torch.ops.tritonnorm.norm_forward``'s signature on ``ns``'s functions; only the output
    y is computed (the statistics returned are empty: the tests differentiate y)."""

    def norm_forward(input, weight, bias, running_mean, running_var, use_input_stats,
                     reduce_batch, num_groups, momentum, eps, scale=None, shift=None,
                     residual=None, activation=0, slope=0.01, per_position=False,
                     centred=True):  # fmt: skip
        name = _NAMES_OF_CODES.get(activation)
        extras = dict(scale=scale, shift=shift, residual=residual,
                      activation=(name, slope) if name else None)  # fmt: skip
        if per_position:
            if centred:
                y = ns.layer_norm_2d(input, weight, bias, eps, **extras)
            else:
                y = ns.rms_norm_2d(input, weight, eps, **extras)
        elif num_groups:
            y = ns.group_norm(input, num_groups, weight, bias, eps, **extras)
        elif reduce_batch:
            rm, rv = _clone(running_mean), _clone(running_var)  # functional, as the op
            y = ns.batch_norm(input, rm, rv, weight, bias, use_input_stats, momentum, eps, **extras)
        else:
            rm, rv = _clone(running_mean), _clone(running_var)
            y = ns.instance_norm(input, rm, rv, weight, bias, use_input_stats, momentum, eps,
                                 **extras)  # fmt: skip
        empty = input.new_empty(0)
        return y, empty, empty, empty, empty

    return norm_forward


def _clone(t):
    return None if t is None else t.clone()


def _convert(ns):
    """``tn.convert`` for a twin: every torch BatchNorm / InstanceNorm / GroupNorm module computes
    with ``ns``'s function (torch's module semantics otherwise: momentum, buffers, train/eval);
    ``fuse_activations`` changes nothing a twin computes and is accepted for the signature."""

    def forward_bn(m, x):
        momentum = 0.0 if m.momentum is None else m.momentum
        if m.training and m.track_running_stats and m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
            if m.momentum is None:
                momentum = 1.0 / float(m.num_batches_tracked)
        training = m.training or (m.running_mean is None and m.running_var is None)
        keep = not m.training or m.track_running_stats
        rm, rv = (m.running_mean, m.running_var) if keep else (None, None)
        return ns.batch_norm(x, rm, rv, m.weight, m.bias, training, momentum, m.eps)

    def forward_in(m, x):
        use_input_stats = m.training or not m.track_running_stats
        return ns.instance_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                                use_input_stats, m.momentum or 0.0, m.eps)  # fmt: skip

    def forward_gn(m, x):
        return ns.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)

    def convert(model, sync=False, fuse_activations=False, report=False):
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.forward = functools.partial(forward_bn, m)
            elif isinstance(m, nn.modules.instancenorm._InstanceNorm):
                m.forward = functools.partial(forward_in, m)
            elif isinstance(m, nn.GroupNorm):
                m.forward = functools.partial(forward_gn, m)
        return model

    return convert


def _namespace(name, fns):
    ns = SimpleNamespace(name=name, **fns)
    ns.norm_forward = _norm_forward(ns)
    ns.convert = _convert(ns)
    return ns


_FUNCTIONS = ("batch_norm", "instance_norm", "group_norm", "layer_norm_2d", "rms_norm_2d")
_TWIN_FUNCTIONS = dict(zip(_FUNCTIONS, (_batch_norm, _instance_norm, _group_norm,
                                        _layer_norm_2d, _rms_norm_2d), strict=True))  # fmt: skip

# The reference every test compares with.
TORCH = _namespace("torch", _TWIN_FUNCTIONS)
# torch's composition exactly as torch computes it under autocast too (tests of autocast only)
TORCH_AS_IS = _namespace(
    "torch-as-is", {k: functools.partial(f, keep_dtype=False) for k, f in _TWIN_FUNCTIONS.items()}
)

TRITONNORM = SimpleNamespace(
    name="tritonnorm",
    **{f: getattr(tn, f) for f in _FUNCTIONS},
    norm_forward=torch.ops.tritonnorm.norm_forward,
    convert=tn.convert,
)


# --- the broken twins ---------------------------------------------------------------------------


class _FirstOrderOnly(torch.autograd.Function):
    """Runs ``call`` on detached copies and differentiates it once, without a graph: first-order
    gradients right, nothing beyond (as a custom op whose backward is opaque kernels)."""

    @staticmethod
    def forward(ctx, call, *tensors):
        leaves = [t.detach().requires_grad_(t.requires_grad) if t.is_floating_point() else t
                  for t in tensors]  # fmt: skip
        with torch.enable_grad():
            y = call(*leaves)
        ctx.graph = (y, leaves)
        return y.detach()

    @staticmethod
    def backward(ctx, grad_y):
        y, leaves = ctx.graph
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad_y, allow_unused=True))
        return None, *(next(grads) if t.requires_grad else None for t in leaves)


def _first_order_only(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        values = [*args, *kwargs.values()]
        at = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]

        def call(*tensors):
            filled = list(values)
            for i, t in zip(at, tensors, strict=True):
                filled[i] = t
            return fn(*filled[: len(args)], **dict(zip(kwargs, filled[len(args) :], strict=True)))

        return _FirstOrderOnly.apply(call, *(values[i] for i in at))

    return wrapped


def _off(fn):
    @functools.wraps(fn)
    def wrapped(input, *args, **kwargs):
        return (fn(input, *args, **kwargs) * 1.03).to(input.dtype)

    return wrapped


_BROKEN = {
    "torch-first-order": {k: _first_order_only(f) for k, f in _TWIN_FUNCTIONS.items()},
    "torch-off": {k: _off(f) for k, f in _TWIN_FUNCTIONS.items()},
}
_ALL = {"tritonnorm": TRITONNORM, "torch": TORCH}
_ALL.update({name: _namespace(name, fns) for name, fns in _BROKEN.items()})

LIBS = [_ALL[n.strip()] for n in os.environ.get("TRITONNORM_TEST_LIBS", "tritonnorm").split(",")]

# Every test of the two files takes ``lib`` (module-level ``pytestmark = over_libs``).
over_libs = pytest.mark.parametrize("lib", [pytest.param(lib, id=lib.name) for lib in LIBS])


# --- the ops ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    id: str
    # call(lib, input, weight, bias, running_mean, running_var, **extras) -> output
    call: Callable
    bias: bool = True
    # running statistics: None, "update" (batch statistics, buffers move) or "read" (eval)
    running: str | None = None
    # Each sample is normalised alone and nothing is updated (vmap may fold the mapped axis into
    # the batch).
    per_sample: bool = True


def _bn(training):
    def call(lib, input, weight=None, bias=None, running_mean=None, running_var=None, **extras):
        return lib.batch_norm(input, running_mean, running_var, weight, bias, training, 0.1, 1e-5,
                              **extras)  # fmt: skip

    return call


def _in(use_input_stats):
    def call(lib, input, weight=None, bias=None, running_mean=None, running_var=None, **extras):
        return lib.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                                 0.1, 1e-5, **extras)  # fmt: skip

    return call


def _gn(lib, input, weight=None, bias=None, running_mean=None, running_var=None, **ex):
    return lib.group_norm(input, 2, weight, bias, 1e-5, **ex)  # 2 groups of the 4 channels


def _ln2d(lib, input, weight=None, bias=None, running_mean=None, running_var=None, **ex):
    return lib.layer_norm_2d(input, weight, bias, 1e-6, **ex)


def _rms2d(lib, input, weight=None, bias=None, running_mean=None, running_var=None, **ex):
    assert bias is None, "RMSNorm2d takes no bias"
    return lib.rms_norm_2d(input, weight, 1e-6, **ex)


OPS = {
    op.id: op
    for op in (
        # training BN with running statistics (its output does not depend on them)
        Op("bn-train", _bn(True), running="update", per_sample=False),
        Op("bn-eval", _bn(False), running="read"),
        Op("in", _in(True)),
        # track_running_stats: instance statistics normalise, the buffers move
        Op("in-running", _in(True), running="update", per_sample=False),
        # use_input_stats=False: the running statistics normalise (as BN eval)
        Op("in-eval", _in(False), running="read"),
        Op("gn", _gn),
        Op("ln2d", _ln2d),
        Op("rms2d", _rms2d, bias=False),
    )
}
PER_SAMPLE = tuple(k for k, op in OPS.items() if op.per_sample)

# The extras: which of scale / shift / residual, and the activation.
EXTRAS = {
    "plain": ((), None),
    # everything at once; SiLU is smooth, so the second derivative is exercised everywhere
    "all-silu": (("scale", "shift", "residual"), "silu"),
    # the ResNet block relu(bn(x) + identity): ReLU's second derivative is 0 away from 0, and
    # random inputs are never at 0 (nor within gradcheck's 1e-6 of it, in practice)
    "residual-relu": (("residual",), "relu"),
    # for the mixed-dtype cases
    "scale-shift": (("scale", "shift"), None),
    "residual-silu": (("residual",), "silu"),
}

# (op, extras): every op plain and with all extras, and the ResNet block on training BN.
CASES = [(o, e) for o in OPS for e in ("plain", "all-silu")] + [("bn-train", "residual-relu")]


def case_params(cases=CASES):
    return [pytest.param(OPS[o], e, id=f"{o}-{e}") for o, e in cases]


SHAPE = (2, 4, 3, 3)  # N=2, C=4 (GN: 2 groups of 2), 3x3: tiny, the interpreter is slow
DIFFERENTIABLE = ("input", "weight", "bias", "scale", "shift", "residual")


def make_args(op: Op, extras: str, *, shape=SHAPE, dtype=torch.float64, device="cpu",
              dtypes: dict | None = None) -> dict:  # fmt: skip
    """The keyword arguments of ``op.call``: input, weight (near 1), bias (absent without one),
    running statistics (if the op has them) and the extras; all ``dtype`` unless ``dtypes``
    (name -> dtype) says otherwise. Drawn on the CPU (same values on every device)."""
    parts, activation = EXTRAS[extras]
    N, C = shape[:2]
    args = {"input": torch.randn(shape, dtype=torch.float64)}
    args["weight"] = 1 + 0.3 * torch.randn(C, dtype=torch.float64)
    if op.bias:
        args["bias"] = 0.3 * torch.randn(C, dtype=torch.float64)
    if op.running:
        args["running_mean"] = 0.3 * torch.randn(C, dtype=torch.float64)
        args["running_var"] = 0.5 + torch.rand(C, dtype=torch.float64)
    if "scale" in parts:
        args["scale"] = 1 + 0.3 * torch.randn(N, C, dtype=torch.float64)
    if "shift" in parts:
        args["shift"] = 0.3 * torch.randn(N, C, dtype=torch.float64)
    if "residual" in parts:
        args["residual"] = torch.randn(shape, dtype=torch.float64)
    dtypes = dtypes or {}
    out = {k: v.to(device=device, dtype=dtypes.get(k, dtype)) for k, v in args.items()}
    if activation is not None:
        out["activation"] = activation
    return out


def fresh(args: dict) -> dict:
    """Private running statistics (ops update them in place); the other tensors shared."""
    return {k: v.clone() if k.startswith("running") else v for k, v in args.items()}


def split(args: dict) -> tuple[tuple[str, ...], tuple, dict]:
    """(names, tensors, the rest) for the differentiable arguments present."""
    names = tuple(k for k in DIFFERENTIABLE if k in args)
    return names, tuple(args[k] for k in names), {k: v for k, v in args.items() if k not in names}


def as_function(lib, op: Op, args: dict, names: tuple[str, ...]):
    """``op`` as a function of the tensors named ``names`` (positional), the rest fixed."""
    fixed = {k: v for k, v in args.items() if k not in names}
    return lambda *tensors: op.call(lib, **fixed, **dict(zip(names, tensors, strict=True)))
