"""The custom operators (``torch.ops.tritonnorm.*``): real and fake implementations and autograd.

Registering with ``torch.library`` lets ``torch.compile(fullgraph=True)`` trace models that use
tritonnorm without graph breaks (the ops are opaque nodes with fake shape functions), and lets
``torch.library.opcheck`` verify the registration.

Eager calls take a shorter road to the same implementations: an ``autograd.Function`` with the
same context setup and backward. A custom op's Python dispatch (argument defaults filled, the
autograd and backend layers re-entered, dynamo's guard around the kernel) cost several times
the launches' own host time; :func:`normalize` and :func:`normalize_epilogue` use the ops only
while torch.compile traces.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import launch


def _norm(use_input_stats: bool, reduce_batch: bool, num_groups: int) -> launch.Norm:
    return launch.Norm(reduce_batch, num_groups, use_input_stats)


def _forward(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalise (N, C, *spatial) input (see :class:`launch.Norm` for the last five settings).
    Returns y; the (rows, groups) mean and 1/sqrt(var + eps) used; and the updated running mean
    and var (empty when there is nothing to update). Functional, as autograd requires: the
    caller copies the new running statistics into its buffers (:func:`normalize`)."""
    return _run_forward(
        input, weight, bias, running_mean, running_var,
        _norm(use_input_stats, reduce_batch, num_groups), momentum, eps,
    )  # fmt: skip


norm_forward = torch.library.custom_op("tritonnorm::norm_forward", _forward, mutates_args=())


def _run_forward(
    input, weight, bias, running_mean, running_var, norm: launch.Norm, momentum, eps,
    epilogue: launch.Epilogue | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The body of both forward ops: launch.forward with the updated running statistics written
    into new tensors (empty when there is nothing to update)."""
    new_mean, new_var = _new_running(input, running_mean, running_var, norm.use_input_stats)
    running_out = (new_mean, new_var) if new_mean.numel() else None
    if running_out is not None and input.numel() == 0:
        new_mean.copy_(running_mean), new_var.copy_(running_var)  # an empty batch changes nothing
    y, mean, rstd = launch.forward(
        input, _contiguous(weight), _contiguous(bias), _contiguous(running_mean),
        _contiguous(running_var), norm=norm, momentum=momentum, eps=eps, running_out=running_out,
        epilogue=epilogue,
    )  # fmt: skip
    return y, mean, rstd, new_mean, new_var


def _store_running(running_mean, running_var, new_mean: Tensor, new_var: Tensor) -> None:
    """Copy the forward's updated running statistics into the buffers (one launch), if any."""
    if new_mean.numel():
        with torch.no_grad():
            torch._foreach_copy_([running_mean, running_var], [new_mean, new_var])


def _contiguous(t: Tensor | None) -> Tensor | None:
    return t.contiguous() if t is not None else None


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
    momentum, eps,
):  # fmt: skip
    shape = _norm(use_input_stats, reduce_batch, num_groups).stats_shape(input.shape)
    mean = input.new_empty(shape, dtype=launch.acc_dtype(input.dtype))
    return (
        _output_like(input),
        mean,
        torch.empty_like(mean),
        *_new_running(input, running_mean, running_var, use_input_stats),
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
) -> Tensor:
    """norm_forward, then the running statistics copied into their buffers (one launch)."""
    forward = norm_forward if torch.compiler.is_compiling() else _EagerNorm.apply
    y, _, _, new_mean, new_var = forward(
        input, weight, bias, running_mean, running_var, use_input_stats, reduce_batch,
        num_groups, float(momentum), float(eps),
    )  # fmt: skip
    _store_running(running_mean, running_var, new_mean, new_var)
    return y


def _backward_impl(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    use_input_stats: bool,
    reduce_batch: bool,
    num_groups: int,
    param_grads: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_input (input's layout), and grad_weight, grad_bias ((C,) in weight's dtype, or empty
    when ``param_grads`` is False)."""
    weight = weight.contiguous() if weight is not None else None
    dx, dweight, dbias = launch.backward(
        grad_output, input, weight, mean, rstd,
        norm=_norm(use_input_stats, reduce_batch, num_groups), param_grads=param_grads,
    )  # fmt: skip
    if not param_grads:
        dweight, dbias = mean.new_empty(0), mean.new_empty(0)
    return dx, dweight, dbias


norm_backward = torch.library.custom_op(
    "tritonnorm::norm_backward", _backward_impl, mutates_args=()
)


@norm_backward.register_fake
def _norm_backward_fake(
    grad_output, input, weight, mean, rstd, use_input_stats, reduce_batch, num_groups,
    param_grads,
):  # fmt: skip
    numel = input.shape[1] if param_grads else 0
    dtype = weight.dtype if weight is not None and param_grads else mean.dtype
    grad_param = mean.new_empty(numel, dtype=dtype)
    return _output_like(input), grad_param, torch.empty_like(grad_param)


def _setup_context(ctx, inputs, output):
    input, weight, bias, _, _, use_input_stats, reduce_batch, num_groups, _, _ = inputs
    _, mean, rstd, new_mean, new_var = output
    ctx.save_for_backward(input, weight, mean, rstd)
    ctx.settings = (use_input_stats, reduce_batch, num_groups)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, rstd, new_mean, new_var)


def _backward_by(norm_backward_fn):
    """The backward of norm_forward, computing with ``norm_backward_fn`` (the custom op, or in
    eager its implementation)."""

    def backward(ctx, grad_y, *_grad_statistics):
        input, weight, mean, rstd = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        dx, dweight, dbias = norm_backward_fn(
            grad_y, input, weight, mean, rstd, *ctx.settings, needs_weight or needs_bias
        )
        return (
            dx if needs_input else None,
            dweight if needs_weight else None,
            dbias.to(ctx.bias_dtype) if needs_bias else None,
            *([None] * 7),
        )

    return backward


torch.library.register_autograd(
    "tritonnorm::norm_forward", _backward_by(norm_backward), setup_context=_setup_context
)


def _eager_function(name: str, forward, setup_context, backward) -> type:
    """An autograd.Function running ``forward`` with the custom op's context setup and
    backward: what eager calls use instead of the op (module docstring)."""

    def forward_and_setup(ctx, *args):
        # One method, not forward + setup_context: with setup_context, apply() binds default
        # arguments through inspect.signature on every call.
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    methods = dict(forward=staticmethod(forward_and_setup), backward=staticmethod(backward))
    return type(name, (torch.autograd.Function,), methods)


_EagerNorm = _eager_function("_EagerNorm", _forward, _setup_context, _backward_by(_backward_impl))


# --------------------------------------------------------------------------------------------
# With an epilogue: y = act((x_hat * w + b) * scale + shift + residual), scale/shift (N, C).
# Separate ops, so the plain ones keep their schema; activation is a launch.ACTIVATIONS code.


def _epilogue(scale, shift, residual, activation, slope) -> launch.Epilogue:
    return launch.Epilogue(_contiguous(scale), _contiguous(shift), residual, activation, slope)


def _epilogue_forward(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    residual: Tensor | None,
    use_input_stats: bool,
    reduce_batch: bool,
    num_groups: int,
    momentum: float,
    eps: float,
    activation: int,
    slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """norm_forward followed, in the pass that writes y, by y = act(y * scale + shift +
    residual): scale and shift (N, C), both or neither; residual of input's shape."""
    return _run_forward(
        input, weight, bias, running_mean, running_var,
        _norm(use_input_stats, reduce_batch, num_groups), momentum, eps,
        _epilogue(scale, shift, residual, activation, slope),
    )  # fmt: skip


norm_epilogue_forward = torch.library.custom_op(
    "tritonnorm::norm_epilogue_forward", _epilogue_forward, mutates_args=()
)


@norm_epilogue_forward.register_fake
def _norm_epilogue_forward_fake(
    input, weight, bias, running_mean, running_var, scale, shift, residual, use_input_stats,
    reduce_batch, num_groups, momentum, eps, activation, slope,
):  # fmt: skip
    return _norm_forward_fake(
        input, weight, bias, running_mean, running_var, use_input_stats, reduce_batch,
        num_groups, momentum, eps,
    )  # fmt: skip


def _epilogue_backward_impl(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    scale: Tensor | None,
    shift: Tensor | None,
    residual: Tensor | None,
    use_input_stats: bool,
    reduce_batch: bool,
    num_groups: int,
    activation: int,
    slope: float,
    param_grads: bool,
    scale_grads: bool,
    residual_grad: bool,
    z_from_output: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """grad_input, grad_weight, grad_bias, grad_scale, grad_shift, grad_residual (empty where
    not asked). shift and residual are needed only with an activation (to recompute z); with
    ``z_from_output`` the ``residual`` argument is the forward's output y instead, whose sign
    gives the activation's derivative (launch.derivative_from_output)."""
    dx, dw, db, dscale, dshift, dres = launch.backward_epilogue(
        grad_output, input, _contiguous(weight), _contiguous(bias), mean, rstd,
        _epilogue(scale, shift, residual, activation, slope),
        norm=_norm(use_input_stats, reduce_batch, num_groups), param_grads=param_grads,
        scale_grads=scale_grads, residual_grad=residual_grad, z_from_output=z_from_output,
    )  # fmt: skip
    return tuple(
        t if t is not None else mean.new_empty(0) for t in (dx, dw, db, dscale, dshift, dres)
    )


norm_epilogue_backward = torch.library.custom_op(
    "tritonnorm::norm_epilogue_backward", _epilogue_backward_impl, mutates_args=()
)


@norm_epilogue_backward.register_fake
def _norm_epilogue_backward_fake(
    grad_output, input, weight, bias, mean, rstd, scale, shift, residual, use_input_stats,
    reduce_batch, num_groups, activation, slope, param_grads, scale_grads, residual_grad,
    z_from_output,
):  # fmt: skip
    dx, dw, db = _norm_backward_fake(
        grad_output, input, weight, mean, rstd, use_input_stats, reduce_batch, num_groups,
        param_grads,
    )  # fmt: skip
    dscale = scale.new_empty(scale.shape) if scale_grads else mean.new_empty(0)
    dres = _output_like(input) if residual_grad else mean.new_empty(0)
    return dx, dw, db, dscale, torch.empty_like(dscale), dres


def _setup_epilogue_context(ctx, inputs, output):
    input, weight, bias, _, _, scale, shift, residual, use_input_stats, reduce_batch = inputs[:10]
    num_groups, activation, slope = inputs[10], inputs[13], inputs[14]
    y, mean, rstd, new_mean, new_var = output
    # Only what the gradient needs: no pre-activation; shift and the residual only when an
    # activation's derivative needs z. Where the output's sign is enough (ReLU, leaky ReLU of
    # slope >= 0), the output instead of the residual: a consumer of y keeps it anyway (as
    # torch's relu saves its result), while the residual would be kept for this op alone.
    from_output = residual is not None and launch.derivative_from_output(activation, slope)
    keep = activation != 0 and not from_output
    ctx.save_for_backward(
        input, weight, bias, mean, rstd, scale, shift if keep else None,
        y if from_output else residual if keep else None,
    )  # fmt: skip
    ctx.z_from_output = from_output
    ctx.settings = (use_input_stats, reduce_batch, num_groups, activation, slope)
    ctx.dtypes = tuple(t.dtype if t is not None else None for t in (bias, shift))
    ctx.mark_non_differentiable(mean, rstd, new_mean, new_var)


def _epilogue_backward_by(norm_epilogue_backward_fn):
    """The backward of norm_epilogue_forward, computing with ``norm_epilogue_backward_fn``."""

    def backward(ctx, grad_y, *_grad_statistics):
        input, weight, bias, mean, rstd, scale, shift, residual = ctx.saved_tensors
        needs = ctx.needs_input_grad
        param_grads = needs[1] or needs[2]
        scale_grads = needs[5] or needs[6]
        residual_grad = needs[7]
        dx, dw, db, dscale, dshift, dres = norm_epilogue_backward_fn(
            grad_y, input, weight, bias, mean, rstd, scale, shift, residual, *ctx.settings,
            param_grads, scale_grads, residual_grad, ctx.z_from_output,
        )  # fmt: skip
        bias_dtype, shift_dtype = ctx.dtypes
        return (
            dx if needs[0] else None,
            dw if needs[1] else None,
            db.to(bias_dtype) if needs[2] else None,
            None,
            None,
            dscale if needs[5] else None,
            dshift.to(shift_dtype) if needs[6] else None,
            dres if needs[7] else None,
            *([None] * 7),
        )

    return backward


torch.library.register_autograd(
    "tritonnorm::norm_epilogue_forward",
    _epilogue_backward_by(norm_epilogue_backward),
    setup_context=_setup_epilogue_context,
)
_EagerNormEpilogue = _eager_function(
    "_EagerNormEpilogue",
    _epilogue_forward,
    _setup_epilogue_context,
    _epilogue_backward_by(_epilogue_backward_impl),
)


def normalize_epilogue(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    scale: Tensor | None,
    shift: Tensor | None,
    residual: Tensor | None,
    activation: int,
    slope: float,
    use_input_stats: bool,
    reduce_batch: bool,
    num_groups: int = 0,
    momentum: float = 0.0,
    eps: float,
) -> Tensor:
    """norm_epilogue_forward, then the running statistics copied into their buffers."""
    forward = norm_epilogue_forward if torch.compiler.is_compiling() else _EagerNormEpilogue.apply
    y, _, _, new_mean, new_var = forward(
        input, weight, bias, running_mean, running_var, scale, shift, residual, use_input_stats,
        reduce_batch, num_groups, float(momentum), float(eps), int(activation), float(slope),
    )  # fmt: skip
    _store_running(running_mean, running_var, new_mean, new_var)
    return y


OPS = [
    torch.ops.tritonnorm.norm_forward.default,
    torch.ops.tritonnorm.norm_backward.default,
    torch.ops.tritonnorm.norm_epilogue_forward.default,
    torch.ops.tritonnorm.norm_epilogue_backward.default,
]


def sample_opcheck_inputs(device: str | torch.device) -> list[tuple]:
    """(op, args, kwargs) samples for ``torch.library.opcheck``: BN train/eval, IN, GN,
    channels last, and the backward."""
    make = lambda *shape: torch.randn(*shape, device=device)
    x = make(3, 4, 5, 6)
    x_cl = x.to(memory_format=torch.channels_last)
    w, b = make(4).requires_grad_(), make(4).requires_grad_()
    running = lambda: (torch.zeros(4, device=device), torch.ones(4, device=device))
    fwd = torch.ops.tritonnorm.norm_forward.default
    bn, inst, gn = (True, 0), (False, 0), (False, 2)  # (reduce_batch, num_groups)
    samples = [
        (fwd, (x.clone().requires_grad_(), w, b, *running(), True, *bn, 0.1, 1e-5), {}),
        (fwd, (x_cl.clone().requires_grad_(), w, b, *running(), True, *inst, 0.1, 1e-5), {}),
        (fwd, (x.clone().requires_grad_(), None, None, *running(), False, *bn, 0.1, 1e-5), {}),
        (fwd, (make(2, 4, 7).requires_grad_(), None, None, None, None, True, *inst, 0.1, 1e-5), {}),
        (fwd, (x_cl.clone().requires_grad_(), w, b, None, None, True, *gn, 0.0, 1e-5), {}),
    ]
    y, mean, rstd, _, _ = fwd(x, w, b, None, None, True, *bn, 0.1, 1e-5)
    bwd = torch.ops.tritonnorm.norm_backward.default
    samples.append((bwd, (torch.randn_like(y), x, w.detach(), mean, rstd, True, *bn, True), {}))
    y, mean, rstd, _, _ = fwd(x, w, b, None, None, True, *gn, 0.0, 1e-5)
    samples.append((bwd, (torch.randn_like(y), x, w.detach(), mean, rstd, True, *gn, True), {}))
    samples += _sample_epilogue_inputs(make, x, x_cl, w, b, running, bn, inst, gn)
    return samples


def _sample_epilogue_inputs(make, x, x_cl, w, b, running, bn, inst, gn) -> list[tuple]:
    """The epilogue ops: GN + scale/shift + SiLU, BN + residual + ReLU (channels last), BN eval
    + scale/shift + GELU, IN + leaky ReLU, and the backward."""
    fwd = torch.ops.tritonnorm.norm_epilogue_forward.default
    bwd = torch.ops.tritonnorm.norm_epilogue_backward.default
    scale, shift = make(3, 4).requires_grad_(), make(3, 4).requires_grad_()
    residual = make(3, 4, 5, 6).requires_grad_()
    x_grad, x_cl_grad = x.clone().requires_grad_(), x_cl.clone().requires_grad_()
    samples = [
        (fwd, (x_grad, w, b, None, None, scale, shift, None, True, *gn, 0.0, 1e-5, 3, 0.01), {}),
        (fwd, (x_cl_grad, w, b, *running(), None, None, residual, True, *bn, 0.1, 1e-5, 1, 0.01), {}),
        (fwd, (x_grad, w, b, *running(), scale, shift, None, False, *bn, 0.1, 1e-5, 4, 0.01), {}),
        (fwd, (x_grad, None, None, None, None, None, None, residual, True, *inst, 0.1, 1e-5, 2, 0.2), {}),
    ]  # fmt: skip
    y, mean, rstd, _, _ = fwd(x, w, b, None, None, scale, shift, residual, True, *gn, 0.0, 1e-5, 3, 0.01)  # fmt: skip
    args = (torch.randn_like(y), x, w.detach(), b.detach(), mean, rstd, scale.detach(),
            shift.detach(), residual.detach(), True, *gn, 3, 0.01, True, True, True, False)  # fmt: skip
    samples.append((bwd, args, {}))
    # BN + residual + ReLU: the backward reads the derivative off the saved output
    y, mean, rstd, _, _ = fwd(x, w, b, None, None, None, None, residual, True, *bn, 0.1, 1e-5, 1, 0.01)  # fmt: skip
    args = (torch.randn_like(y), x, w.detach(), b.detach(), mean, rstd, None, None, y.detach(),
            True, *bn, 1, 0.01, True, False, True, True)  # fmt: skip
    samples.append((bwd, args, {}))
    return samples
