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
import operator

import torch
from torch import Tensor

from .kernels import launch


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
    y, mean, rstd, new_mean, new_var = _forward_impl(
        input, weight, bias, running_mean, running_var, use_input_stats, reduce_batch,
        num_groups, momentum, eps, scale, shift, residual, activation, slope, per_position,
        centred, in_place=False,
    )  # fmt: skip
    if not new_mean.numel():
        new_mean, new_var = input.new_empty(0), input.new_empty(0)
    return y, mean, rstd, new_mean, new_var


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


def _output_like(input: Tensor) -> Tensor:
    return torch.empty_like(input if launch.is_dense(input) else input.contiguous())


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
    return _output_like(input), mean, torch.empty_like(mean), *new_running


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
    empty = lambda: mean.new_empty(0)
    param = lambda asked: mean.new_empty(input.shape[1], dtype=param_dtype) if asked else empty()
    per_sample = lambda asked: scale.new_empty(scale.shape) if asked else empty()
    return (
        _output_like(input),
        param(output_mask[1]),
        param(output_mask[2]),
        per_sample(output_mask[3]),
        per_sample(output_mask[4]),
        _output_like(input) if output_mask[5] else empty(),
    )


# --- autograd -----------------------------------------------------------------------------------
# The differentiable inputs of norm_forward, by position, and their gradients' slots.
_GRAD_INPUTS = (0, 1, 2, 10, 11, 12)  # input, weight, bias, scale, shift, residual


# norm_forward's trailing arguments with their defaults (a call may leave them out): the
# epilogue's, then the statistics across channels.
_TRAILING_DEFAULTS = (None, None, None, 0, 0.01, False, True)


def _save(ctx, inputs, y) -> tuple:
    """What the backward needs: no pre-activation; shift and the residual only when an
    activation's derivative needs z. Where the output's sign is enough (ReLU, leaky ReLU of
    slope >= 0) with a residual, the output instead: a consumer of y keeps it anyway (as torch's
    relu saves its result), while the residual would be kept for this op alone."""
    inputs = (*inputs, *_TRAILING_DEFAULTS[len(inputs) - 10 :])
    input, weight, bias = inputs[:3]
    use_input_stats, reduce_batch, num_groups = inputs[5:8]
    scale, shift, residual, activation, slope = inputs[10:15]
    from_output = residual is not None and launch.derivative_from_output(activation, slope)
    keep = activation != 0 and not from_output
    # the backward's settings (norm, activation) and the dtypes its dbias, dshift must have
    ctx.settings = (use_input_stats, reduce_batch, num_groups, *inputs[15:17], activation, slope)
    ctx.dtypes = (None if bias is None else bias.dtype, None if shift is None else shift.dtype)
    ctx.set_materialize_grads(False)
    extras = (scale, shift if keep else None, residual if keep else None,
              y if from_output else None)  # fmt: skip
    return (input, weight, bias), extras


def _backward_by(backward_fn, grad_inputs: tuple[int, ...] = _GRAD_INPUTS):
    """The backward of norm_forward, computing with ``backward_fn`` (the custom op, or in eager
    its implementation); ``grad_inputs``: the positions of input, weight, bias, scale, shift
    and residual among the forward's arguments."""
    pick = operator.itemgetter(*grad_inputs)

    def backward(ctx, grad_y, *_grad_statistics):
        needs = ctx.needs_input_grad  # as many as the call passed (the op's may be fewer)
        if len(needs) > grad_inputs[-1]:
            mask = list(pick(needs))
        else:
            mask = [i < len(needs) and needs[i] for i in grad_inputs]
        if grad_y is None or not any(mask):
            return (None,) * len(needs)
        input, weight, bias, mean, rstd, scale, shift, residual, y = ctx.saved_tensors
        use_input_stats, reduce_batch, num_groups, per_position, centred, activation, slope = (
            ctx.settings
        )
        residual_grad = None
        if mask[5] and activation == 0:  # y = ... + residual: its gradient is dy itself
            residual_grad, mask[5] = grad_y, False
        dx, dweight, dbias, dscale, dshift, dresidual = backward_fn(
            grad_y, input, weight, bias, mean, rstd, use_input_stats, reduce_batch, num_groups,
            mask, scale, shift, residual, activation, slope, y, per_position, centred,
        )  # fmt: skip
        bias_dtype, shift_dtype = ctx.dtypes
        if mask[2] and dbias.dtype != bias_dtype:
            dbias = dbias.to(bias_dtype)
        if mask[4] and dshift.dtype != shift_dtype:
            dshift = dshift.to(shift_dtype)
        out = [None] * max(len(needs), grad_inputs[-1] + 1)
        for i, asked, grad in zip(
            grad_inputs, mask, (dx, dweight, dbias, dscale, dshift, dresidual), strict=True
        ):
            if asked:
                out[i] = grad
        if residual_grad is not None:
            out[grad_inputs[5]] = residual_grad
        return tuple(out[: len(needs)])

    return backward


def _setup_context(ctx, inputs, output):
    y, mean, rstd, new_mean, new_var = output
    params, extras = _save(ctx, inputs, y)
    ctx.save_for_backward(*params, mean, rstd, *extras)
    ctx.mark_non_differentiable(mean, rstd, new_mean, new_var)


torch.library.register_autograd(
    "tritonnorm::norm_forward", _backward_by(norm_backward), setup_context=_setup_context
)


class _NormFunction(torch.autograd.Function):
    """Eager calls: norm_forward's implementation, context and backward without the op's
    dispatch. Only y is an output (mean and rstd are saved, not returned), so autograd has no
    statistics' gradients to materialise."""

    @staticmethod
    def forward(ctx, settings, input, weight, bias, running_mean, running_var, scale, shift,
                residual):  # fmt: skip
        inputs = (input, weight, bias, running_mean, running_var, *settings[:5], scale, shift,
                  residual, *settings[5:])  # fmt: skip
        y, mean, rstd, _, _ = _forward_impl(*inputs)
        params, extras = _save(ctx, inputs, y)
        ctx.save_for_backward(*params, mean, rstd, *extras)
        return y

    # The tensors follow one tuple of settings: autograd's apply costs per argument.
    backward = staticmethod(_backward_by(_gradients, grad_inputs=(1, 2, 3, 6, 7, 8)))


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
    """The normalisation (running statistics updated in place), through the custom op while
    torch.compile traces and through :class:`_NormFunction` in eager mode."""
    momentum, eps, activation, slope = float(momentum), float(eps), int(activation), float(slope)
    compiling = torch.compiler.is_compiling()
    if (
        not compiling
        and torch.is_grad_enabled()
        and _requires_grad(input, weight, bias, scale, shift, residual)
    ):
        settings = (use_input_stats, reduce_batch, num_groups, momentum, eps, activation, slope,
                    per_position, centred)  # fmt: skip
        return _NormFunction.apply(
            settings, input, weight, bias, running_mean, running_var, scale, shift, residual
        )
    args = (
        input, weight, bias, running_mean, running_var, use_input_stats, reduce_batch,
        num_groups, momentum, eps, scale, shift, residual, activation, slope, per_position,
        centred,
    )  # fmt: skip
    if compiling:
        y, _, _, new_mean, new_var = norm_forward(*args)
        if new_mean.numel():
            with torch.no_grad():
                running_mean.copy_(new_mean), running_var.copy_(new_var)
        return y
    return _forward_impl(*args)[0]
