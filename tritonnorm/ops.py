"""The custom operators (``torch.ops.tritonnorm.*``): real and fake implementations and autograd.

Registering with ``torch.library`` lets ``torch.compile(fullgraph=True)`` trace models that use
tritonnorm without graph breaks (the ops are opaque nodes with fake shape functions), and lets
``torch.library.opcheck`` verify the registration.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import launch


def _per_group(input: Tensor, use_input_stats: bool, per_instance: bool) -> tuple[int, int]:
    groups = input.shape[0] if per_instance and use_input_stats else 1
    return groups, input.shape[1]


@torch.library.custom_op("tritonnorm::norm_forward", mutates_args=())
def norm_forward(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_input_stats: bool,
    per_instance: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalise (N, C, *spatial) input. Returns y; the (G, C) mean and 1/sqrt(var + eps) used
    (G = N for per-instance input statistics, else 1); and the updated running mean and var
    (empty when there is nothing to update). Functional, as autograd requires: the caller
    copies the new running statistics into its buffers (:func:`normalize`)."""
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    new_mean, new_var = _new_running(input, running_mean, running_var, use_input_stats)
    running_out = (new_mean, new_var) if new_mean.numel() else None
    if running_out is not None and input.numel() == 0:
        new_mean.copy_(running_mean), new_var.copy_(running_var)  # an empty batch changes nothing
    y, mean, rstd = launch.forward(
        input, weight, bias,
        running_mean.contiguous() if running_mean is not None else None,
        running_var.contiguous() if running_var is not None else None,
        use_input_stats, per_instance, momentum, eps, running_out,
    )  # fmt: skip
    return y, mean, rstd, new_mean, new_var


def _new_running(input, running_mean, running_var, use_input_stats) -> tuple[Tensor, Tensor]:
    if use_input_stats and running_mean is not None and running_var is not None:
        return (
            input.new_empty(running_mean.shape, dtype=running_mean.dtype),
            input.new_empty(running_var.shape, dtype=running_var.dtype),
        )
    return input.new_empty(0), input.new_empty(0)


@norm_forward.register_fake
def _norm_forward_fake(
    input, weight, bias, running_mean, running_var, use_input_stats, per_instance, momentum, eps
):
    y = torch.empty_like(input if launch.is_dense(input) else input.contiguous())
    shape = _per_group(input, use_input_stats, per_instance)
    mean = input.new_empty(shape, dtype=launch.acc_dtype(input.dtype))
    return (
        y,
        mean,
        torch.empty_like(mean),
        *_new_running(input, running_mean, running_var, use_input_stats),
    )


def normalize(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_input_stats: bool,
    per_instance: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """norm_forward, then the running statistics copied into their buffers (one launch)."""
    y, _, _, new_mean, new_var = norm_forward(
        input, weight, bias, running_mean, running_var, use_input_stats, per_instance,
        momentum, eps,
    )  # fmt: skip
    if new_mean.numel():
        with torch.no_grad():
            torch._foreach_copy_([running_mean, running_var], [new_mean, new_var])
    return y


@torch.library.custom_op("tritonnorm::norm_backward", mutates_args=())
def norm_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    use_input_stats: bool,
    per_instance: bool,
    param_grads: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_input (input's layout), and grad_weight, grad_bias ((C,) in weight's dtype, or empty
    when ``param_grads`` is False)."""
    weight = weight.contiguous() if weight is not None else None
    dx, dweight, dbias = launch.backward(
        grad_output, input, weight, mean, rstd, use_input_stats, per_instance, param_grads
    )
    if not param_grads:
        dweight, dbias = mean.new_empty(0), mean.new_empty(0)
    return dx, dweight, dbias


@norm_backward.register_fake
def _norm_backward_fake(
    grad_output, input, weight, mean, rstd, use_input_stats, per_instance, param_grads
):
    dx = torch.empty_like(input if launch.is_dense(input) else input.contiguous())
    numel = input.shape[1] if param_grads else 0
    dtype = weight.dtype if weight is not None and param_grads else mean.dtype
    return dx, mean.new_empty(numel, dtype=dtype), mean.new_empty(numel, dtype=dtype)


def _setup_context(ctx, inputs, output):
    input, weight, bias, _, _, use_input_stats, per_instance, _, _ = inputs
    _, mean, rstd, new_mean, new_var = output
    ctx.save_for_backward(input, weight, mean, rstd)
    ctx.use_input_stats = use_input_stats
    ctx.per_instance = per_instance
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, rstd, new_mean, new_var)


def _backward(ctx, grad_y, *_grad_statistics):
    input, weight, mean, rstd = ctx.saved_tensors
    needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    dx, dweight, dbias = norm_backward(
        grad_y, input, weight, mean, rstd, ctx.use_input_stats, ctx.per_instance,
        needs_weight or needs_bias,
    )  # fmt: skip
    return (
        dx if needs_input else None,
        dweight if needs_weight else None,
        dbias.to(ctx.bias_dtype) if needs_bias else None,
        None, None, None, None, None, None,
    )  # fmt: skip


torch.library.register_autograd("tritonnorm::norm_forward", _backward, setup_context=_setup_context)

OPS = [torch.ops.tritonnorm.norm_forward.default, torch.ops.tritonnorm.norm_backward.default]


def sample_opcheck_inputs(device: str | torch.device) -> list[tuple]:
    """(op, args, kwargs) samples for ``torch.library.opcheck``: BN train/eval, IN, channels last."""
    make = lambda *shape: torch.randn(*shape, device=device)
    x = make(3, 4, 5, 6)
    x_cl = x.to(memory_format=torch.channels_last)
    w, b = make(4).requires_grad_(), make(4).requires_grad_()
    running = lambda: (torch.zeros(4, device=device), torch.ones(4, device=device))
    fwd = torch.ops.tritonnorm.norm_forward.default
    samples = [
        (fwd, (x.clone().requires_grad_(), w, b, *running(), True, False, 0.1, 1e-5), {}),
        (fwd, (x_cl.clone().requires_grad_(), w, b, *running(), True, True, 0.1, 1e-5), {}),
        (fwd, (x.clone().requires_grad_(), None, None, *running(), False, False, 0.1, 1e-5), {}),
        (fwd, (make(2, 4, 7).requires_grad_(), None, None, None, None, True, True, 0.1, 1e-5), {}),
    ]
    y, mean, rstd, _, _ = fwd(x, w, b, None, None, True, False, 0.1, 1e-5)
    bwd = torch.ops.tritonnorm.norm_backward.default
    samples.append((bwd, (torch.randn_like(y), x, w.detach(), mean, rstd, True, False, True), {}))
    return samples
