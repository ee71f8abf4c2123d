"""Public functions with torch.nn.functional's exact signatures and semantics.

CUDA tensors run the Triton kernels. CPU tensors run the same kernels through Triton's
interpreter when ``TRITON_INTERPRET=1`` (how the tests run without a GPU); otherwise they fall
back to torch's own op, so a model moved to the CPU keeps working.

Each function also takes keyword-only epilogue extras, fused into the normalisation's passes:
``y = act((x_hat * weight + bias) * scale + shift + residual)`` with ``scale``, ``shift`` of
shape (N, C), ``residual`` of the input's shape and ``activation`` one of "relu", "leaky_relu"
(or ("leaky_relu", negative_slope)), "silu", "gelu", "gelu_tanh". The backward recomputes the
normalised value and the pre-activation from the input instead of saving them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import activations, ops, validation
from .kernels import config
from .kernels.config import INTERPRET


def runs_triton(input: Tensor) -> bool:
    """Whether this input goes through the Triton kernels (else torch's own op)."""
    return input.is_cuda or (INTERPRET and input.device.type == "cpu")


apply_activation = activations.apply  # torch's own activation (the unfused fallback)


class Extras(NamedTuple):
    """Checked epilogue keyword arguments of a call: scale and shift completed to both or
    neither, the activation by name (torch's side) and by the kernels' code."""

    scale: Tensor | None
    shift: Tensor | None
    residual: Tensor | None
    activation: str | None
    slope: float
    code: int


def _extras(op, input, scale, shift, residual, activation) -> Extras | None:
    """The call's :class:`Extras`, or None when it has none."""
    if scale is None and shift is None and residual is None and activation is None:
        return None
    name, slope = validation.parse_activation(activation)
    validation.check_epilogue(op, input, scale, shift, residual)
    if scale is not None and shift is None:
        shift = torch.zeros_like(scale)
    elif shift is not None and scale is None:
        scale = torch.ones_like(shift)
    code = activations.CODES[name] if name is not None else 0
    return Extras(scale, shift, residual, name, slope, code)


def _torch_epilogue(y: Tensor, extras: Extras) -> Tensor:
    scale, shift, residual = extras.scale, extras.shift, extras.residual
    if scale is not None:
        extra = (1,) * (y.dim() - 2)
        y = y * scale.reshape(*scale.shape, *extra) + shift.reshape(*shift.shape, *extra)
    if residual is not None:
        y = y + residual
    return apply_activation(y, extras.activation, extras.slope)


def _normalize(input, torch_op, weight, bias, running_mean, running_var, extras, *,
               unfused: bool = False, **settings):  # fmt: skip
    """torch's own op (then the epilogue, unfused) where the kernels do not run (or ``unfused``);
    else the custom op, with the epilogue fused when there are extras."""
    if unfused or not runs_triton(input):
        y = torch_op()
        return y if extras is None else _torch_epilogue(y, extras)
    if extras is None:
        return ops.normalize(input, weight, bias, running_mean, running_var, **settings)
    return ops.normalize(
        input, weight, bias, running_mean, running_var, scale=extras.scale, shift=extras.shift,
        residual=extras.residual, activation=extras.code, slope=extras.slope, **settings,
    )  # fmt: skip


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    residual: Tensor | None = None,
    activation: str | tuple | None = None,
) -> Tensor:
    """Batch normalisation, as :func:`torch.nn.functional.batch_norm`: per-channel statistics
    over the batch and spatial axes (training), or the running statistics (eval). Epilogue
    extras: see the module docstring."""
    validation.check_batch_norm(input, running_mean, running_var, weight, bias, training, eps)
    extras = _extras("batch_norm", input, scale, shift, residual, activation)
    torch_op = lambda: F.batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )
    if input.dim() == 1:  # only an empty input passes the checks: torch returns an empty tensor
        return torch_op()
    return _normalize(
        input, torch_op, weight, bias, running_mean, running_var, extras,
        use_input_stats=training, reduce_batch=True, momentum=momentum, eps=eps,
    )  # fmt: skip


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    residual: Tensor | None = None,
    activation: str | tuple | None = None,
) -> Tensor:
    """Instance normalisation, as :func:`torch.nn.functional.instance_norm`: statistics per
    (sample, channel) over the spatial axes; given running buffers are updated with the batch
    average of the instance statistics. ``use_input_stats=False`` uses the running ones.
    Epilogue extras: see the module docstring."""
    validation.check_instance_norm(
        input, running_mean, running_var, weight, bias, use_input_stats, eps
    )
    extras = _extras("instance_norm", input, scale, shift, residual, activation)
    torch_op = lambda: F.instance_norm(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
    )
    return _normalize(
        input, torch_op, weight, bias, running_mean, running_var, extras,
        use_input_stats=use_input_stats, reduce_batch=False, momentum=momentum, eps=eps,
    )  # fmt: skip


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    residual: Tensor | None = None,
    activation: str | tuple | None = None,
) -> Tensor:
    """Group normalisation, as :func:`torch.nn.functional.group_norm`: statistics per (sample,
    group of C / num_groups consecutive channels) over the group's channels and the spatial axes;
    weight and bias per channel. ``num_groups=1`` is LayerNorm over (C, *spatial); ``num_groups=C``
    is InstanceNorm without running statistics. Epilogue extras: see the module docstring."""
    num_groups = validation.check_group_norm(input, num_groups, weight, bias, eps)
    extras = _extras("group_norm", input, scale, shift, residual, activation)
    torch_op = lambda: F.group_norm(input, num_groups, weight, bias, eps)
    return _normalize(
        input, torch_op, weight, bias, None, None, extras, use_input_stats=True,
        reduce_batch=False, num_groups=num_groups, eps=eps,
    )  # fmt: skip


def _across_channels(op: str, input: Tensor, weight, bias, eps: float, extras: Extras | None,
                     torch_op, centred: bool) -> Tensor:  # fmt: skip
    """LayerNorm2d / RMSNorm2d (``centred=False``): the kernels across the channels at each
    position, or torch's composition above the channels one program holds
    (config.position_max_channels: 4096 with fp32 statistics, 2048 in float64, 1024 in float64
    with extras)."""
    acc_bytes = 8 if input.dtype == torch.float64 else 4
    beyond_chip = input.shape[1] > config.position_max_channels(acc_bytes, extras is not None)
    return _normalize(
        input, torch_op, weight, bias, None, None, extras, unfused=beyond_chip,
        use_input_stats=True, reduce_batch=False, eps=eps, per_position=True, centred=centred,
    )  # fmt: skip


def layer_norm_2d(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    residual: Tensor | None = None,
    activation: str | tuple | None = None,
) -> Tensor:
    """LayerNorm over the channels at every position of (N, C, *spatial) input, as timm's
    ``LayerNorm2d`` computes it (``F.layer_norm`` over C after moving C last, then back) without
    the two copies: statistics per (sample, position), weight and bias per channel, output in
    the input's memory format. Epilogue extras: see the module docstring."""
    op = "layer_norm_2d"
    validation.check_channel_norm(op, input, weight, bias)
    extras = _extras(op, input, scale, shift, residual, activation)
    C = input.shape[1]
    torch_op = lambda: F.layer_norm(input.movedim(1, -1), (C,), weight, bias, eps).movedim(-1, 1)
    return _across_channels(op, input, weight, bias, eps, extras, torch_op, centred=True)


def rms_norm_2d(
    input: Tensor,
    weight: Tensor | None = None,
    eps: float = 1e-6,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    residual: Tensor | None = None,
    activation: str | tuple | None = None,
) -> Tensor:
    """RMSNorm over the channels at every position of (N, C, *spatial) input, as timm's
    ``RmsNorm2d``: x / sqrt(mean over C of x^2 + eps) * weight, statistics in fp32 (float64 for
    float64 input). Epilogue extras: see the module docstring."""
    op = "rms_norm_2d"
    validation.check_channel_norm(op, input, weight)
    extras = _extras(op, input, scale, shift, residual, activation)
    C = input.shape[1]
    torch_op = lambda: F.rms_norm(input.movedim(1, -1), (C,), weight, eps).movedim(-1, 1)
    return _across_channels(op, input, weight, None, eps, extras, torch_op, centred=False)
