"""The normalisations written in torch ops: the differentiable definition of what the kernels
compute, for what the kernels do not do themselves.

The kernels compute the forward and the first-order gradients. Everything autograd can ask beyond
that is defined here, once, and derived by torch: second-order gradients (the backward's own
backward, :func:`first_order`'s vjp), forward-mode AD (its jvp) and ``vmap`` where the mapped axis
cannot be folded into the batch (``torch.vmap`` of these functions). The arithmetic follows the
kernels': statistics in float32 (float64 for float64 input) over the same axes, two-pass variance,
one rounding to the output dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import activations
from .kernels.geometry import Norm, acc_dtype, result_dtype

_ACTIVATION_NAMES = {a.code: a.name for a in activations.TABLE}
_LEAKY_RELU = activations.CODES["leaky_relu"]


class Settings(NamedTuple):
    """Everything of a call that is not a tensor: the statistics (``norm``), the running
    statistics' ``momentum``, ``eps`` and the epilogue's activation (a kernels' code, 0 for none)
    with leaky ReLU's ``slope``. (A named tuple: one is made per call.)"""

    norm: Norm
    momentum: float
    eps: float
    activation: int = 0
    slope: float = 0.01


def op_name(norm: Norm) -> str:
    """The public function a Norm stands for (error messages)."""
    if norm.per_position:
        return "layer_norm_2d" if norm.centred else "rms_norm_2d"
    if norm.num_groups:
        return "group_norm"
    return "batch_norm" if norm.reduce_batch else "instance_norm"


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ...) against an input of ``ndim`` axes."""
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def _per_sample(t: Tensor, ndim: int) -> Tensor:
    """(N, C) -> (N, C, 1, ...)."""
    return t.reshape(*t.shape, *([1] * (ndim - 2)))


def statistics(
    x: Tensor, norm: Norm, eps: float, saved_rstd: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """x (in the statistics' dtype) normalised, and its mean and rstd of ``norm.stats_shape``:
    two-pass, biased variance, as the kernels. Given the forward's ``saved_rstd``, the variance's
    offset is rstd^-2 - var instead of eps (a constant): rstd keeps the forward's value exactly,
    and its derivatives of every order are those of (var + eps)^-1/2 at that value."""
    N, C = x.shape[0], x.shape[1]
    if norm.per_position:
        dims, shape = (1,), (N, 1, *x.shape[2:])
        grouped = x
    elif norm.num_groups:
        dims, shape = (-1,), (N, norm.num_groups, 1)
        grouped = x.reshape(N, norm.num_groups, -1)
    else:
        spatial = tuple(range(2, x.dim()))
        dims = (0, *spatial) if norm.reduce_batch else spatial
        shape = (1 if norm.reduce_batch else N, C, *([1] * len(spatial)))
        grouped = x
    if norm.centred or not norm.per_position:
        mean = grouped.mean(dims, keepdim=True)
    else:  # RMSNorm: the root mean square about 0
        mean = torch.zeros(shape, dtype=x.dtype, device=x.device)
    var = (grouped - mean).square().mean(dims, keepdim=True)
    offset = eps if saved_rstd is None else saved_rstd.reshape(shape).pow(-2) - var.detach()
    rstd = (var + offset).rsqrt()
    rows = norm.stats_shape(x.shape)
    x_hat = ((grouped - mean) * rstd).reshape(x.shape)
    return x_hat, mean.reshape(rows), rstd.reshape(rows)


def update_running(x: Tensor, norm: Norm, momentum: float, running: tuple[Tensor, Tensor]) -> None:
    """The running statistics' update of a training call, in place (torch's: unbiased variance;
    InstanceNorm's the average over the samples of theirs)."""
    running_mean, running_var = running
    if x.numel() == 0:  # an empty batch changes nothing (tritonnorm's documented choice)
        return
    dims = (0, *range(2, x.dim())) if norm.reduce_batch else tuple(range(2, x.dim()))
    count = 1
    for d in dims:
        count *= x.shape[d]
    with torch.no_grad():
        mean = x.mean(dims)
        var = x.var(dims, correction=1) if count > 1 else torch.full_like(mean, float("nan"))
        if not norm.reduce_batch:
            mean, var = mean.mean(0), var.mean(0)
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)


def _activation(z: Tensor, settings: Settings, output: Tensor | None) -> Tensor:
    """act(z); given the forward's ``output`` where act' is read off it (ReLU, leaky ReLU of
    slope >= 0: the op kept y instead of the residual), z times the slope pattern of y, which
    has act's value where it matters and act's derivatives of every order (act'' = 0)."""
    if not settings.activation:
        return z
    if output is not None:
        below = settings.slope if settings.activation == _LEAKY_RELU else 0.0
        return z * torch.where(output > 0, 1.0, below)
    return activations.apply(z, _ACTIVATION_NAMES[settings.activation], settings.slope)


def forward(
    settings: Settings,
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    residual: Tensor | None = None,
    *,
    saved: tuple[Tensor, Tensor] | None = None,
    output: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """y, mean, rstd as the kernels compute them: y = act((x_hat * w + b) * scale + shift +
    residual). ``saved``: the forward's (mean, rstd); without input statistics (eval) they are
    the statistics used, constants as to the kernels; with them, rstd's value is kept
    (:func:`statistics`). ``output``: the forward's y, for an activation whose derivative the op
    reads off it (:func:`_activation`); the residual may then be None (its value changes no
    derivative)."""
    norm = settings.norm
    x = input.to(acc_dtype(input.dtype))
    if norm.use_input_stats:
        saved_rstd = None if saved is None else saved[1]
        x_hat, mean, rstd = statistics(x, norm, settings.eps, saved_rstd)
    else:
        mean, rstd = saved
        x_hat = (x - _per_channel(mean, x.dim())) * _per_channel(rstd, x.dim())
    y = x_hat
    if weight is not None:
        y = y * _per_channel(weight.to(x.dtype), x.dim())
    if bias is not None:
        y = y + _per_channel(bias.to(x.dtype), x.dim())
    if scale is not None:
        y = y * _per_sample(scale.to(x.dtype), x.dim())
    if shift is not None:
        y = y + _per_sample(shift.to(x.dtype), x.dim())
    if residual is not None:
        y = y + residual.to(x.dtype)
    y = _activation(y, settings, output)
    return y.to(result_dtype(input.dtype, scale, shift, residual)), mean, rstd


def first_order(
    settings: Settings,
    wanted: tuple[bool, ...],
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    residual: Tensor | None,
    *,
    saved: tuple[Tensor, Tensor] | None = None,
    output: Tensor | None = None,
) -> tuple[Tensor | None, ...]:
    """The gradients of :func:`forward`'s y with respect to (input, weight, bias, scale, shift,
    residual), those ``wanted`` (None for the others), for the incoming ``grad_output``: what the
    backward kernels compute, as a differentiable function of all its arguments."""
    tensors = (input, weight, bias, scale, shift, residual)
    positions = [i for i, w in enumerate(wanted) if w]

    def y_of(*primals):
        args = list(tensors)
        for i, p in zip(positions, primals, strict=True):
            args[i] = p
        return forward(settings, *args, saved=saved, output=output)[0]

    _, vjp = torch.func.vjp(y_of, *(tensors[i] for i in positions))
    grads = vjp(grad_output)
    out: list[Tensor | None] = [None] * 6
    for i, g in zip(positions, grads, strict=True):
        out[i] = g
    return tuple(out)


def linearized(fn, primals: tuple, tangents: tuple) -> tuple:
    """fn's Jacobian-vector product J t at ``primals`` by reverse mode twice (the vjp of the
    linear map c -> J^T c is t -> J t): no forward-mode level is opened, so it runs inside a
    jvp that torch.autograd.forward_ad calls, where nested forward AD is not supported."""
    outputs, vjp = torch.func.vjp(fn, *primals)
    single = isinstance(outputs, Tensor)
    outputs = (outputs,) if single else outputs
    cotangents = tuple(torch.zeros_like(o) for o in outputs)
    transposed = lambda *c: vjp(c[0] if single else c)
    _, vjp_of_vjp = torch.func.vjp(transposed, *cotangents)
    out = vjp_of_vjp(tuple(t.to(p.dtype) for t, p in zip(tangents, primals, strict=True)))
    return out[0] if single else out
