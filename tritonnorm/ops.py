"""The custom operators ``torch.ops.tritonnorm.norm_forward / norm_backward`` and autograd.

One op pair serves every normalisation, with or without a fused epilogue (per-sample scale and
shift, residual, activation: trailing arguments with defaults). The forward updates the running
statistics in place (declared as mutated, so torch.compile functionalises it); the backward takes
an ``output_mask`` (as aten's ``native_batch_norm_backward``) and computes only what autograd
asks for.

Registering with ``torch.library`` lets ``torch.compile(fullgraph=True)`` trace models that use
tritonnorm without graph breaks, and ``torch.library.opcheck`` verify the registration. Eager
calls take a shorter road to the same implementations, :class:`_NormFunction`: a custom op's
Python dispatch (defaults filled, the autograd and backend layers re-entered) cost several times
the launches' own host time. Neither path materialises zero gradients for outputs nobody
differentiates.
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import reference
from .kernels import launch
from .reference import Settings


@functools.cache
def _norm(use_input_stats: bool, reduce_batch: bool, num_groups: int, per_position: bool = False,
          centred: bool = True) -> launch.Norm:  # fmt: skip
    return launch.Norm(reduce_batch, num_groups, use_input_stats, per_position, centred)


def _epilogue(scale, shift, residual, activation, slope) -> launch.Epilogue | None:
    if scale is None and shift is None and residual is None and not activation:
        return None
    scale, shift = _contiguous_pair(scale, shift)
    return launch.Epilogue(scale, shift, residual, activation, slope)


def _contiguous(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _contiguous_pair(a: Tensor | None, b: Tensor | None) -> tuple:
    """Both as the kernels read them (on every call's path: spelled out, no generator)."""
    if (a is None or a.is_contiguous()) and (b is None or b.is_contiguous()):
        return a, b
    return _contiguous(a), _contiguous(b)


def _forward_impl(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_input_stats: bool,
    reduce_batch: bool,
    num_groups: int,
    momentum: float,
    eps: float,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    residual: Tensor | None = None,
    activation: int = 0,
    slope: float = 0.01,
    per_position: bool = False,
    centred: bool = True,
    *,
    in_place: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalise (N, C, *spatial) input (see :class:`launch.Norm` for the settings), then
    y = act(y * scale + shift + residual) in the same pass when an epilogue is given
    (``per_position``: statistics across the channels at each position, LayerNorm2d, or with
    ``centred=False`` RMSNorm2d). Returns
    y; the (rows, groups) mean and 1/sqrt(var + eps) used; and the updated running statistics
    (empty when there is nothing to update; an empty batch leaves them unchanged). ``in_place``
    (eager): the kernels update the given running statistics themselves, and they are what is
    returned; else (the custom op, functional as autograd requires) new tensors, which the
    caller copies into its buffers."""
    rm, rv = running_mean, running_var
    update = use_input_stats and rm is not None and rv is not None
    out = None
    if update and not (in_place and rm.is_contiguous() and rv.is_contiguous()):
        out = (torch.empty_like(rm, memory_format=torch.contiguous_format),
               torch.empty_like(rv, memory_format=torch.contiguous_format))  # fmt: skip
        if input.numel() == 0:
            out[0].copy_(rm), out[1].copy_(rv)
    y, mean, rstd = launch.forward(
        input, *_contiguous_pair(weight, bias), *_contiguous_pair(rm, rv),
        norm=_norm(use_input_stats, reduce_batch, num_groups, per_position, centred),
        momentum=momentum, eps=eps, epilogue=_epilogue(scale, shift, residual, activation, slope),
        running_out=out,
    )  # fmt: skip
    if not update:
        return y, mean, rstd, _NOTHING, _NOTHING
    if out is None:
        return y, mean, rstd, rm, rv
    if in_place:  # strided buffers: updated through contiguous copies
        rm.copy_(out[0]), rv.copy_(out[1])
        return y, mean, rstd, rm, rv
    return y, mean, rstd, out[0], out[1]


_NOTHING = torch.empty(0)


def _functional_forward(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_input_stats: bool,
    reduce_batch: bool,
    num_groups: int,
    momentum: float,
    eps: float,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    residual: Tensor | None = None,
    activation: int = 0,
    slope: float = 0.01,
    per_position: bool = False,
    centred: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_forward_impl` with the running statistics returned as new tensors."""
    if _forward_ad_active():
        _refuse_dual_tensors(input, weight, bias, scale, shift, residual)
    y, mean, rstd, new_mean, new_var = _forward_impl(
        input, weight, bias, running_mean, running_var, use_input_stats, reduce_batch,
        num_groups, momentum, eps, scale, shift, residual, activation, slope, per_position,
        centred, in_place=False,
    )  # fmt: skip
    if not new_mean.numel():
        new_mean, new_var = input.new_empty(0), input.new_empty(0)
    return y, mean, rstd, new_mean, new_var


def _refuse_dual_tensors(*tensors) -> None:
    """The custom op has no forward-mode AD rule, and torch drops a tangent silently where no
    input requires grad: refuse dual tensors (the public functions take them)."""
    for t in tensors:
        if t is not None and _forward_ad.unpack_dual(t).tangent is not None:
            raise RuntimeError(
                "tritonnorm::norm_forward: forward-mode AD (dual tensors) through the custom op "
                "is not supported; call the public functions (tn.batch_norm, tn.group_norm, ...) "
                "or modules, which support torch.autograd.forward_ad and torch.func.jvp"
            )


norm_forward = torch.library.custom_op(
    "tritonnorm::norm_forward", _functional_forward, mutates_args=()
)


def _new_running(input, running_mean, running_var, use_input_stats) -> tuple[Tensor, Tensor]:
    if use_input_stats and running_mean is not None and running_var is not None:
        return (
            input.new_empty(running_mean.shape, dtype=running_mean.dtype),
            input.new_empty(running_var.shape, dtype=running_var.dtype),
        )
    return input.new_empty(0), input.new_empty(0)


def _output_like(input: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A new tensor of x's shape as the kernels write it: x's layout where dense, else
    contiguous."""
    return torch.empty_like(input if launch.is_dense(input) else input.contiguous(), dtype=dtype)


@norm_forward.register_fake
def _norm_forward_fake(
    input, weight, bias, running_mean, running_var, use_input_stats, reduce_batch, num_groups,
    momentum, eps, scale=None, shift=None, residual=None, activation=0, slope=0.01,
    per_position=False, centred=True,
):  # fmt: skip
    norm = _norm(use_input_stats, reduce_batch, num_groups, per_position, centred)
    shape = norm.stats_shape(input.shape)
    mean = input.new_empty(shape, dtype=launch.acc_dtype(input.dtype))
    new_running = _new_running(input, running_mean, running_var, use_input_stats)
    y = _output_like(input, launch.result_dtype(input.dtype, scale, shift, residual))
    return y, mean, torch.empty_like(mean), *new_running


def _backward_impl(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    use_input_stats: bool,
    reduce_batch: bool,
    num_groups: int,
    output_mask: list[bool],
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    residual: Tensor | None = None,
    activation: int = 0,
    slope: float = 0.01,
    output: Tensor | None = None,
    per_position: bool = False,
    centred: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """grad_input, grad_weight, grad_bias, grad_scale, grad_shift, grad_residual, each empty
    unless ``output_mask`` (six booleans, that order) asks for it. shift and residual are
    needed only with an activation (to recompute z); given the forward's ``output`` y, whose
    sign gives the activation's derivative (launch.derivative_from_output), neither is."""
    grads = _gradients(
        grad_output, input, weight, bias, mean, rstd, use_input_stats, reduce_batch, num_groups,
        output_mask, scale, shift, residual, activation, slope, output, per_position, centred,
    )  # fmt: skip
    return tuple(g if g is not None else mean.new_empty(0) for g in grads)


def _gradients(
    grad_output, input, weight, bias, mean, rstd, use_input_stats, reduce_batch, num_groups,
    output_mask, scale=None, shift=None, residual=None, activation=0, slope=0.01,
    output=None, per_position=False, centred=True,
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """:func:`_backward_impl`'s gradients with None for those not asked for (the eager
    backward's: a custom op must return tensors, autograd takes None)."""
    return launch.backward(
        grad_output, input, *_contiguous_pair(weight, bias), mean, rstd,
        norm=_norm(use_input_stats, reduce_batch, num_groups, per_position, centred),
        epilogue=_epilogue(scale, shift, residual, activation, slope),
        output_mask=tuple(output_mask), output=output,
    )  # fmt: skip


norm_backward = torch.library.custom_op(
    "tritonnorm::norm_backward", _backward_impl, mutates_args=()
)


@norm_backward.register_fake
def _norm_backward_fake(
    grad_output, input, weight, bias, mean, rstd, use_input_stats, reduce_batch, num_groups,
    output_mask, scale=None, shift=None, residual=None, activation=0, slope=0.01,
    output=None, per_position=False, centred=True,
):  # fmt: skip
    param_dtype = weight.dtype if weight is not None else mean.dtype
    dscale, dshift, dresidual = launch.extra_grad_dtypes(input.dtype, scale, shift, residual,
                                                          output)  # fmt: skip
    empty = lambda: mean.new_empty(0)
    param = lambda asked: mean.new_empty(input.shape[1], dtype=param_dtype) if asked else empty()
    per_sample = lambda asked, dtype: (
        scale.new_empty(scale.shape, dtype=dtype) if asked and scale is not None else empty()
    )
    return (
        _output_like(input),
        param(output_mask[1]),
        param(output_mask[2]),
        per_sample(output_mask[3], dscale),
        per_sample(output_mask[4], dshift),
        _output_like(input, dresidual) if output_mask[5] else empty(),
    )


# --- autograd -----------------------------------------------------------------------------------
# First-order gradients are the kernels' (norm_backward, or in eager its implementation). What
# autograd can ask beyond them is torch's derivation of reference.py's definition of the same
# math: the backward's own backward (second order), forward-mode AD, and vmap where the mapped
# axis cannot be folded into the batch. The eager functions are in setup_context form, so
# torch.func's transforms take them; the custom ops carry the second order for torch.compile's
# eager fallbacks and direct callers.

# The gradients every backward returns, in this order (``mask``: which are asked for).
GRADIENTS = ("input", "weight", "bias", "scale", "shift", "residual")
# norm_backward's (and _NormGradFunction's) differentiable arguments, in _second_order's order
_SECOND_ORDER = ("grad_output", *GRADIENTS)


class _Dtypes(NamedTuple):
    """The dtypes of the inputs whose gradients the kernels may write in another (dbias in the
    statistics' dtype; the extras' in float64 with float64 statistics; the residual's in the
    output's where it was not kept), to cast them back; the residual's also for a stand-in."""

    bias: torch.dtype | None
    scale: torch.dtype | None
    shift: torch.dtype | None
    residual: torch.dtype | None


def _dtype(t: Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype


def _save(ctx, settings: Settings, input, weight, bias, mean, rstd, scale, shift, residual, y):
    """What the backward needs: no pre-activation; the residual only when an activation's
    derivative needs z (shift, (N, C), always). Where the output's sign is enough (ReLU, leaky
    ReLU of slope >= 0) with a residual, the output instead: a consumer of y keeps it anyway (as
    torch's relu saves its result), while the residual would be kept for this op alone."""
    activation = settings.activation
    from_output = residual is not None and launch.derivative_from_output(activation, settings.slope)
    keep = activation != 0 and not from_output
    ctx.settings = settings
    ctx.dtypes = _Dtypes(_dtype(bias), _dtype(scale), _dtype(shift), _dtype(residual))
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(
        input, weight, bias, mean, rstd, scale, shift, residual if keep else None,
        y if from_output else None,
    )  # fmt: skip


def _cast(grads: tuple, mask, dtypes: _Dtypes) -> tuple:
    """The asked-for gradients (None for the others, which a custom op returns empty), each in
    its input's dtype."""
    dx, dweight, dbias, dscale, dshift, dresidual = grads
    if mask[2] and dbias.dtype != dtypes.bias:
        dbias = dbias.to(dtypes.bias)
    if mask[3] and dscale.dtype != dtypes.scale:
        dscale = dscale.to(dtypes.scale)
    if mask[4] and dshift.dtype != dtypes.shift:
        dshift = dshift.to(dtypes.shift)
    if mask[5] and dresidual.dtype != dtypes.residual:
        dresidual = dresidual.to(dtypes.residual)
    return (
        dx if mask[0] else None, dweight if mask[1] else None, dbias if mask[2] else None,
        dscale if mask[3] else None, dshift if mask[4] else None,
        dresidual if mask[5] else None,
    )  # fmt: skip


def _kernel_gradients(settings: Settings, mask, grad_y, saved: tuple, backward_fn) -> tuple:
    """The first-order gradients from the kernels: ``backward_fn`` is the custom op
    norm_backward or, in eager, its implementation."""
    input, weight, bias, mean, rstd, scale, shift, residual, y = saved
    n = settings.norm
    return backward_fn(
        grad_y, input, weight, bias, mean, rstd, n.use_input_stats, n.reduce_batch, n.num_groups,
        list(mask), scale, shift, residual, settings.activation, settings.slope, y,
        n.per_position, n.centred,
    )  # fmt: skip


def _first_order(ctx, grad_y, mask: list, *, differentiable: bool, backward_fn) -> tuple:
    """The gradients (GRADIENTS' order) of a forward saved by :func:`_save`, those ``mask`` asks
    for. ``differentiable``: through :class:`_NormGradFunction`, whose own backward exists
    (create_graph, torch.func); else the kernels directly."""
    if grad_y is None or not any(mask):
        return (None,) * 6
    settings = ctx.settings
    residual_grad = None
    if mask[5] and settings.activation == 0:  # y = ... + residual: its gradient is dy itself
        residual_grad, mask[5] = grad_y, False
    grads = (None,) * 6
    if any(mask):
        saved = ctx.saved_tensors
        if differentiable:
            grads = _apply(_NormGradFunction, settings, tuple(mask), ctx.dtypes, grad_y, *saved)
        else:
            raw = _kernel_gradients(settings, mask, grad_y, saved, backward_fn)
            grads = _cast(raw, mask, ctx.dtypes)
    if residual_grad is not None:
        grads = (*grads[:5], residual_grad)
    return grads


def _stand_ins(tensors: tuple, dtypes: _Dtypes) -> tuple:
    """The first order's tensors (grad_y, input, weight, bias, mean, rstd, scale, shift,
    residual, y) with zeros for a residual the forward did not keep: its value changes no
    derivative there (y is linear in it, or act' is read off y), and reference.first_order
    differentiates with respect to it."""
    grad_y, input, weight, bias, mean, rstd, scale, shift, residual, y = tensors
    if residual is None and dtypes.residual is not None:
        residual = torch.zeros_like(input, dtype=dtypes.residual)
    return grad_y, input, weight, bias, mean, rstd, scale, shift, residual, y


def _second_order(settings: Settings, mask, dtypes: _Dtypes, tensors: tuple, cotangents,
                  needs) -> tuple:  # fmt: skip
    """The backward of the first-order gradients: for ``tensors`` = (grad_y, input, weight,
    bias, mean, rstd, scale, shift, residual, y) as the first order saw them and ``cotangents``
    of its outputs (GRADIENTS' order), the gradients of (grad_y, input, weight, bias, scale,
    shift, residual) that ``needs`` asks for (that order), by torch's vjp of
    reference.first_order."""
    grad_y, input, weight, bias, mean, rstd, scale, shift, residual, y = _stand_ins(tensors, dtypes)
    primals = [grad_y, input, weight, bias, scale, shift, residual]
    diff = [
        i for i, (p, need) in enumerate(zip(primals, needs, strict=True)) if need and p is not None
    ]
    if not diff:
        return (None,) * 7
    asked = [i for i in range(6) if mask[i]]

    def first(*values):
        args = list(primals)
        for i, v in zip(diff, values, strict=True):
            args[i] = v
        grads = reference.first_order(settings, mask, *args, saved=(mean, rstd), output=y)
        return tuple(grads[i] for i in asked)

    outputs, vjp = torch.func.vjp(first, *(primals[i] for i in diff))
    cotangents = tuple(
        torch.zeros_like(out) if cotangents[i] is None else cotangents[i].to(out.dtype)
        for i, out in zip(asked, outputs, strict=True)
    )
    grads = vjp(cotangents)
    out: list = [None] * 7
    for i, g in zip(diff, grads, strict=True):
        out[i] = g
    return tuple(out)


_functorch_active = torch._C._are_functorch_transforms_active
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _forward_ad_active() -> bool:
    """Whether a torch.autograd.forward_ad dual level is open (dual tensors may come)."""
    return _forward_ad._current_level >= 0


def _apply(function, *args):
    """``function.apply(*args)``; without a torch.func transform (active, or one whose wrappers
    outlive it: a vjp_fn called after torch.func.vjp returned), straight into autograd's C apply:
    Function.apply's Python (binding a setup_context form's arguments by signature) costs several
    times the launches."""
    if _functorch_active() or any(isinstance(a, Tensor) and _is_wrapped(a) for a in args):
        return function.apply(*args)
    return _C_APPLY.__get__(None, function)(*args)


_C_APPLY = torch._C._FunctionBase.__dict__["apply"]


def _fold_vmap(info, in_dims, settings: Settings, tensors):
    """vmap of a per-sample forward (statistics per sample, or the running ones) with only
    (N, C)- and x-shaped tensors batched: the mapped axis folds into the batch, one call of the
    kernels. None where it cannot (then torch.vmap of reference.forward)."""
    input, weight, bias, running_mean, running_var, scale, shift, residual = tensors
    x_dim, w_dim, b_dim, rm_dim, rv_dim, scale_dim, shift_dim, res_dim = in_dims
    norm = settings.norm
    per_sample = not norm.reduce_batch or not norm.use_input_stats
    updates = norm.use_input_stats and running_mean is not None
    if (x_dim is None or not per_sample or updates
            or (w_dim, b_dim, rm_dim, rv_dim) != (None,) * 4):  # fmt: skip
        return None
    B = info.batch_size
    logical = input.movedim(x_dim, 0).shape[1:]  # (N, C, *spatial) of one mapped slice
    N = logical[0]

    def fold(t, dim, shape):  # mapped (B, *shape) -> (B * N, *shape[1:]); unmapped expanded
        t = t.expand(B, *shape) if dim is None else t.movedim(dim, 0)
        return t.reshape(B * N, *shape[1:])

    x = fold(input, x_dim, logical)
    if scale is not None:
        scale = fold(scale, scale_dim, logical[:2])
        shift = fold(shift, shift_dim, logical[:2])
    if residual is not None:
        residual = fold(residual, res_dim, logical)
    y, mean, rstd = _NormFunction.apply(settings, x, weight, bias, running_mean, running_var,
                                        scale, shift, residual)  # fmt: skip
    y = y.reshape(B, N, *y.shape[1:])
    if norm.use_input_stats:  # statistics per sample: (B * N, G) -> (B, N, G)
        return (y, mean.reshape(B, N, -1), rstd.reshape(B, N, -1)), (0, 0, 0)
    return (y, mean, rstd), (0, None, None)


def _unbatched_running_error(settings: Settings) -> RuntimeError:
    return RuntimeError(
        f"tritonnorm.{reference.op_name(settings.norm)} under vmap: batch norm got a batched "
        "tensor as input while the running_mean or running_var, which will be updated in place, "
        "were not batched (as torch). Map the running statistics too, pass None for them, or "
        "use eval mode (for modules: track_running_stats=False)"
    )


def _reference_vmap(info, in_dims, settings: Settings, tensors):
    """vmap of the forward by torch.vmap of reference.forward (what cannot fold: a reduced
    batch, batched parameters or running statistics), running statistics updated as torch
    does."""
    _, _, _, running_mean, running_var, *_ = tensors  # _NormFunction's tensors, in order
    _, _, _, mean_dim, var_dim, *_ = in_dims
    norm = settings.norm
    updates = norm.use_input_stats and running_mean is not None and running_var is not None
    if updates and (mean_dim is None or var_dim is None):
        raise _unbatched_running_error(settings)

    def one(x, w, b, rm, rv, sc, sh, res):
        saved = None
        if not norm.use_input_stats:  # eval: the running statistics, per channel
            saved = (rm.reshape(1, -1), (rv + settings.eps).rsqrt().reshape(1, -1))
        elif updates:
            reference.update_running(x.to(rm.dtype), norm, settings.momentum, (rm, rv))
        return reference.forward(settings, x, w, b, sc, sh, res, saved=saved)

    out = torch.vmap(one, in_dims=tuple(in_dims), randomness="error")(*tensors)
    return out, (0, 0, 0)


class _NormFunction(torch.autograd.Function):
    """Eager calls: norm_forward's implementation, context and backward without the op's
    dispatch; y, and the statistics saved (returned, as torch.func wants what is saved, and
    marked non-differentiable)."""

    @staticmethod
    def forward(settings: Settings, input, weight, bias, running_mean, running_var, scale, shift,
                residual):  # fmt: skip
        n = settings.norm
        y, mean, rstd, _, _ = _forward_impl(
            input, weight, bias, running_mean, running_var, n.use_input_stats, n.reduce_batch,
            n.num_groups, settings.momentum, settings.eps, scale, shift, residual,
            settings.activation, settings.slope, n.per_position, n.centred,
        )  # fmt: skip
        return y, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        settings, input, weight, bias, _, _, scale, shift, residual = inputs
        y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        _save(ctx, settings, input, weight, bias, mean, rstd, scale, shift, residual, y)
        if _forward_ad._current_level >= 0 or _functorch_active():  # what jvp needs
            ctx.save_for_forward(input, weight, bias, scale, shift, residual, mean, rstd)

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        needs = ctx.needs_input_grad
        differentiable = torch.is_grad_enabled() or _functorch_active()
        grads = _first_order(ctx, grad_y, list(_NORM_GRADIENTS.pick(needs)),
                             differentiable=differentiable, backward_fn=_gradients)  # fmt: skip
        return _NORM_GRADIENTS.place(grads)

    @staticmethod
    def jvp(ctx, *tangents):
        input, weight, bias, scale, shift, residual, mean, rstd = ctx.saved_tensors
        tangents = _NORM_GRADIENTS.pick(tangents)
        primals = (input, weight, bias, scale, shift, residual)
        moving = [i for i, t in enumerate(tangents) if t is not None and primals[i] is not None]
        if not moving:
            return None, None, None

        def y_of(*values):
            args = list(primals)
            for i, v in zip(moving, values, strict=True):
                args[i] = v
            return reference.forward(ctx.settings, *args, saved=(mean, rstd))[0]

        y_tangent = reference.linearized(
            y_of, tuple(primals[i] for i in moving), tuple(tangents[i] for i in moving)
        )
        return y_tangent, None, None

    @staticmethod
    def vmap(info, in_dims, settings, *tensors):
        in_dims = _NORM_TENSORS.pick(in_dims)
        folded = _fold_vmap(info, in_dims, settings, tensors)
        if folded is not None:
            return folded
        return _reference_vmap(info, in_dims, settings, tensors)


class _NormGradFunction(torch.autograd.Function):
    """The first-order gradients as a differentiable function (create_graph, torch.func): the
    kernels compute them; their own backward, jvp and vmap are torch's derivations of
    reference.first_order. Outputs in GRADIENTS' order, None where ``mask`` does not ask."""

    @staticmethod
    def forward(settings: Settings, mask: tuple, dtypes: _Dtypes, grad_output, input, weight,
                bias, mean, rstd, scale, shift, residual, y):  # fmt: skip
        saved = (input, weight, bias, mean, rstd, scale, shift, residual, y)
        raw = _kernel_gradients(settings, mask, grad_output, saved, _gradients)
        return _cast(raw, mask, dtypes)

    @staticmethod
    def setup_context(ctx, inputs, output):
        settings, mask, dtypes, *tensors = inputs
        ctx.settings, ctx.mask, ctx.dtypes = settings, mask, dtypes
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors)
        if _forward_ad._current_level >= 0 or _functorch_active():
            ctx.save_for_forward(*tensors)

    @staticmethod
    def backward(ctx, *cotangents):
        needs = ctx.needs_input_grad
        grads = _second_order(ctx.settings, ctx.mask, ctx.dtypes, ctx.saved_tensors, cotangents,
                              _GRAD_SECOND_ORDER.pick(needs))  # fmt: skip
        return _GRAD_SECOND_ORDER.place(grads)

    @staticmethod
    def jvp(ctx, *tangents):
        tensors = _stand_ins(ctx.saved_tensors, ctx.dtypes)
        grad_y, input, weight, bias, mean, rstd, scale, shift, residual, y = tensors
        primals = (grad_y, input, weight, bias, scale, shift, residual)
        tangents = _GRAD_SECOND_ORDER.pick(tangents)
        moving = [i for i, t in enumerate(tangents) if t is not None and primals[i] is not None]
        asked = [i for i in range(6) if ctx.mask[i]]
        if not moving:
            return (None,) * 6

        def first(*values):
            args = list(primals)
            for i, v in zip(moving, values, strict=True):
                args[i] = v
            grads = reference.first_order(ctx.settings, ctx.mask, *args, saved=(mean, rstd),
                                          output=y)  # fmt: skip
            return tuple(grads[i] for i in asked)

        out = reference.linearized(
            first, tuple(primals[i] for i in moving), tuple(tangents[i] for i in moving)
        )
        result: list = [None] * 6
        for i, t in zip(asked, out, strict=True):
            result[i] = t
        return tuple(result)

    @staticmethod
    def vmap(info, in_dims, settings, mask, dtypes, *tensors):
        asked = [i for i in range(6) if mask[i]]

        def first(*one):  # one mapped slice: stand-ins made per slice
            gy, x, w, b, m, r, sc, sh, res, out = _stand_ins(one, dtypes)
            grads = reference.first_order(settings, mask, gy, x, w, b, sc, sh, res, saved=(m, r),
                                          output=out)  # fmt: skip
            return tuple(grads[i] for i in asked)

        in_dims = _GRAD_TENSORS.pick(in_dims)
        grads = torch.vmap(first, in_dims=in_dims, randomness="error")(*tensors)
        result: list = [None] * 6
        for i, g in zip(asked, grads, strict=True):
            result[i] = g
        return tuple(result), tuple(0 if i in asked else None for i in range(6))


# --- the custom ops' autograd -------------------------------------------------------------------


def _positions(op) -> dict[str, int]:
    """Argument name -> position, from a custom op's schema."""
    return {arg.name: i for i, arg in enumerate(op._opoverload._schema.arguments)}


_FORWARD_ARGS = _positions(norm_forward)
_BACKWARD_ARGS = _positions(norm_backward)
_FORWARD_DEFAULTS = {
    arg.name: arg.default_value for arg in norm_forward._opoverload._schema.arguments
}


def _args(inputs: tuple, names: dict, defaults: dict) -> dict:
    """A custom op's arguments by name, the trailing defaults filled (a call may leave them
    out)."""
    return {name: inputs[i] if i < len(inputs) else defaults[name] for name, i in names.items()}


def _wanted(needs: tuple, names: dict, wanted: tuple[str, ...]) -> list[bool]:
    """needs_input_grad at the named arguments (as many as the call passed: the op's may be
    fewer)."""
    return [names[name] < len(needs) and needs[names[name]] for name in wanted]


def _placed(names: dict, count: int, wanted: tuple[str, ...], values) -> tuple:
    """``count`` results, one per argument: ``values`` at the named ones, None elsewhere (a
    backward's gradients)."""
    out = [None] * count
    for name, value in zip(wanted, values, strict=True):
        if value is not None:
            out[names[name]] = value
    return tuple(out)


class _Named:
    """Some of a fixed-arity Function's arguments, by name, as two C-level itemgetters built
    once: ``pick(per_argument)`` (needs_input_grad, tangents, vmap's in_dims) gives the named
    ones in ``wanted``'s order; ``place(values)`` gives one result per argument, ``values`` at
    the named ones and None elsewhere (a backward's gradients)."""

    def __init__(self, names: dict[str, int], wanted: tuple[str, ...]):
        self.pick = _getter([names[name] for name in wanted])
        order = {name: i for i, name in enumerate(wanted)}
        place = _getter([order[name] + 1 if name in order else 0 for name in names])
        self.place = lambda values: place((None, *values))


def _getter(indices: list[int]):
    """itemgetter that always returns a tuple (itemgetter of one index returns the item)."""
    get = operator.itemgetter(*indices)
    return get if len(indices) > 1 else lambda values: (get(values),)


def _parameters(forward) -> dict[str, int]:
    """Argument name -> position, from an autograd Function's forward."""
    return {name: i for i, name in enumerate(inspect.signature(forward).parameters)}


# The eager Functions' arguments by name: their backward, jvp and vmap read and place through
# these, as the custom ops' do through their schemas, so that no position is counted by hand.
_NORM_ARGS = _parameters(_NormFunction.forward)
_NORM_GRADIENTS = _Named(_NORM_ARGS, GRADIENTS)
_NORM_TENSORS = _Named(_NORM_ARGS, tuple(name for name in _NORM_ARGS if name != "settings"))
_GRAD_ARGS = _parameters(_NormGradFunction.forward)
_GRAD_SECOND_ORDER = _Named(_GRAD_ARGS, _SECOND_ORDER)
_GRAD_TENSORS = _Named(
    _GRAD_ARGS, tuple(name for name in _GRAD_ARGS if name not in ("settings", "mask", "dtypes"))
)


def _settings_of(args: dict) -> Settings:
    norm = _norm(args["use_input_stats"], args["reduce_batch"], args["num_groups"],
                 args["per_position"], args["centred"])  # fmt: skip
    return Settings(norm, args.get("momentum", 0.0), args.get("eps", 0.0), args["activation"],
                    args["slope"])  # fmt: skip


def _forward_setup_context(ctx, inputs, output):
    a = _args(inputs, _FORWARD_ARGS, _FORWARD_DEFAULTS)
    y, mean, rstd, new_mean, new_var = output
    ctx.mark_non_differentiable(mean, rstd, new_mean, new_var)
    _save(ctx, _settings_of(a), a["input"], a["weight"], a["bias"], mean, rstd, a["scale"],
          a["shift"], a["residual"], y)  # fmt: skip


def _forward_backward(ctx, grad_y, *_grad_statistics):
    needs = ctx.needs_input_grad
    grads = _first_order(ctx, grad_y, _wanted(needs, _FORWARD_ARGS, GRADIENTS),
                         differentiable=False, backward_fn=norm_backward)  # fmt: skip
    return _placed(_FORWARD_ARGS, len(needs), GRADIENTS, grads)


torch.library.register_autograd(
    "tritonnorm::norm_forward", _forward_backward, setup_context=_forward_setup_context
)

_BACKWARD_DEFAULTS = {
    arg.name: arg.default_value for arg in norm_backward._opoverload._schema.arguments
}


def _backward_setup_context(ctx, inputs, output):
    a = _args(inputs, _BACKWARD_ARGS, _BACKWARD_DEFAULTS)
    ctx.settings = _settings_of(a)
    ctx.mask = tuple(a["output_mask"])
    ctx.dtypes = _Dtypes(_dtype(a["bias"]), _dtype(a["scale"]), _dtype(a["shift"]),
                         _dtype(a["residual"]))  # fmt: skip
    ctx.save_for_backward(*(a[name] for name in (
        "grad_output", "input", "weight", "bias", "mean", "rstd", "scale", "shift", "residual",
        "output")))  # fmt: skip


def _backward_backward(ctx, *cotangents):
    """norm_backward's own backward (second order through the custom ops); its outputs not
    asked for are empty and get no cotangent."""
    needs = ctx.needs_input_grad
    cotangents = [g if asked else None for g, asked in zip(cotangents, ctx.mask, strict=True)]
    grads = _second_order(ctx.settings, ctx.mask, ctx.dtypes, ctx.saved_tensors, cotangents,
                          _wanted(needs, _BACKWARD_ARGS, _SECOND_ORDER))  # fmt: skip
    return _placed(_BACKWARD_ARGS, len(needs), _SECOND_ORDER, grads)


torch.library.register_autograd(
    "tritonnorm::norm_backward", _backward_backward, setup_context=_backward_setup_context
)


def _requires_grad(input, weight, bias, scale, shift, residual) -> bool:
    return (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (scale is not None and scale.requires_grad)
        or (shift is not None and shift.requires_grad)
        or (residual is not None and residual.requires_grad)
    )


def normalize(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    use_input_stats: bool,
    reduce_batch: bool,
    num_groups: int = 0,
    momentum: float = 0.0,
    eps: float,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    residual: Tensor | None = None,
    activation: int = 0,
    slope: float = 0.01,
    per_position: bool = False,
    centred: bool = True,
) -> Tensor:
    """The normalisation (running statistics updated in place): through the custom op while
    torch.compile traces (reference.py's torch ops inside a torch.func transform); through
    :class:`_NormFunction` when autograd, a torch.func transform or forward-mode AD needs it;
    else the implementation directly."""
    momentum, eps, activation, slope = float(momentum), float(eps), int(activation), float(slope)
    compiling = torch.compiler.is_compiling()
    if compiling and not _functorch_active():
        y, _, _, new_mean, new_var = norm_forward(
            input, weight, bias, running_mean, running_var, use_input_stats, reduce_batch,
            num_groups, momentum, eps, scale, shift, residual, activation, slope, per_position,
            centred,
        )  # fmt: skip
        if new_mean.numel():
            with torch.no_grad():
                running_mean.copy_(new_mean), running_var.copy_(new_var)
        return y
    # a torch.func transform or a forward-AD level (dual tensors need not require grad): two
    # reads on every call's path, spelled out
    transformed = compiling or _functorch_active() or _forward_ad._current_level >= 0
    if transformed or (
        torch.is_grad_enabled() and _requires_grad(input, weight, bias, scale, shift, residual)
    ):
        tensors = (input, weight, bias, running_mean, running_var, scale, shift, residual)
        if compiling:  # not through _norm's cache: dynamo would warn that it traces around it
            norm = launch.Norm(reduce_batch, num_groups, use_input_stats, per_position, centred)
            return _traced_reference(Settings(norm, momentum, eps, activation, slope), *tensors)
        norm = _norm(use_input_stats, reduce_batch, num_groups, per_position, centred)
        settings = Settings(norm, momentum, eps, activation, slope)
        function = _NormFunction.apply if transformed else _FAST_NORM_APPLY
        return function(settings, *tensors)[0]
    return _forward_impl(
        input, weight, bias, running_mean, running_var, use_input_stats, reduce_batch,
        num_groups, momentum, eps, scale, shift, residual, activation, slope, per_position,
        centred,
    )[0]  # fmt: skip


_FAST_NORM_APPLY = _C_APPLY.__get__(None, _NormFunction)


def _traced_reference(settings: Settings, input, weight, bias, running_mean, running_var, scale,
                      shift, residual) -> Tensor:  # fmt: skip
    """A call that torch.compile traces inside a torch.func transform: reference.py's torch ops,
    which the transforms and the compiler both see through (the custom op has no rule for the
    transforms: jvp's tangent would be dropped silently; the kernels cannot be traced)."""
    norm = settings.norm
    saved = None
    if not norm.use_input_stats:
        eps = settings.eps
        saved = (running_mean.reshape(1, -1), (running_var + eps).rsqrt().reshape(1, -1))
    elif running_mean is not None and running_var is not None:
        reference.update_running(input, norm, settings.momentum, (running_mean, running_var))
    return reference.forward(settings, input, weight, bias, scale, shift, residual,
                             saved=saved)[0]  # fmt: skip
