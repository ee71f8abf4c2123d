"""Input checks shared by the functions and modules. Each raises torch's exception type for the
same case, with a message saying what was wrong and what is expected, before anything (running
statistics, counters) is changed."""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from . import activations

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class InputDimensionError(ValueError, IndexError):
    """Too few dimensions. torch raises IndexError here; ValueError is what it means."""


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """Not a floating-point input. torch raises NotImplementedError; TypeError is what it means."""


class GroupCountError(ValueError, RuntimeError, ZeroDivisionError):
    """num_groups not a positive divisor of the channels. torch raises RuntimeError, or
    ZeroDivisionError for 0; ValueError is what it means."""


def check_input(op: str, input: Tensor, dim_error: type[Exception] = InputDimensionError) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: expected input to be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise dim_error(
            f"{op}: expected input of shape (N, C, *spatial) with at least 2 dimensions, "
            f"got {input.dim()}D input of shape {tuple(input.shape)}"
        )
    if input.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedDtypeError(
            f"{op}: expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"got {input.dtype}"
        )


_HALF = (torch.float16, torch.bfloat16)


def check_per_channel(
    op: str, input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
    running_mean: Tensor | None = None, running_var: Tensor | None = None,
) -> None:  # fmt: skip
    """weight, bias, running_mean, running_var: one floating value per channel, on input's device.
    (On every call's path: the common case costs a few attribute reads per vector.)"""
    channels = input.shape[1]
    dtype = input.dtype
    device = None
    for name, vector in (("running_mean", running_mean), ("running_var", running_var),
                         ("weight", weight), ("bias", bias)):  # fmt: skip
        if vector is None:
            continue
        if vector.numel() != channels:
            raise RuntimeError(
                f"{op}: {name} should contain {channels} elements (one per channel of input "
                f"{tuple(input.shape)}) not {vector.numel()}"
            )
        # fp32 parameters with half input, as torch accepts
        if vector.dtype != dtype and not (vector.dtype == torch.float32 and dtype in _HALF):
            allowed = {dtype, torch.float32} if dtype in _HALF else {dtype}
            expected = " or ".join(sorted(str(d) for d in allowed))
            raise RuntimeError(
                f"{op}: expected {name} of dtype {expected} for {input.dtype} input, "
                f"got {vector.dtype}"
            )
        if device is None:
            device = input.device
        if vector.device != device:
            raise RuntimeError(
                f"{op}: expected {name} on the input's device {input.device}, got {vector.device}"
            )


def check_running_pair(running_mean: Tensor | None, running_var: Tensor | None) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must either both be None or neither be None, got "
            f"running_mean={'None' if running_mean is None else 'a tensor'}, "
            f"running_var={'None' if running_var is None else 'a tensor'}"
        )


def check_eps(op: str, eps: float, training: bool = True) -> None:
    """batch_norm's eps rule, as torch.nn.functional.batch_norm: positive when normalising with
    batch statistics (training), non-negative with the running ones (eval). instance_norm and
    group_norm take any eps, as torch does: NaN wherever variance + eps < 0."""
    if training and eps <= 0.0:
        raise ValueError(f"{op}: eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"{op}: eps must be non-negative, but got {eps}")


def check_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
) -> None:
    op = "batch_norm"
    if isinstance(input, Tensor) and input.dim() == 1 and input.numel() == 0:
        return  # torch returns an empty tensor (with any running statistics): F.batch_norm runs
    check_input(op, input)
    check_running_pair(running_mean, running_var)
    if training:
        values = input.shape[0]
        for size in input.shape[2:]:
            values *= size
        if values == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}"
            )
    else:
        for name, buffer in (("running_mean", running_mean), ("running_var", running_var)):
            if buffer is None:
                raise RuntimeError(
                    f"{op}: {name} must be defined in evaluation mode (training=False normalises "
                    "with the running statistics)"
                )
    check_eps(op, eps, training)
    check_per_channel(
        op, input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )


def check_instance_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_input_stats: bool,
    eps: float,
) -> None:
    op = "instance_norm"
    check_input(op, input)
    check_running_pair(running_mean, running_var)
    if use_input_stats:
        spatial = 1
        for size in input.shape[2:]:
            spatial *= size
        if spatial == 1:
            raise ValueError(
                f"Expected more than 1 spatial element when training, got input size {input.size()}"
            )
    elif running_mean is None or running_var is None:
        raise RuntimeError(
            "Expected running_mean and running_var to be defined when use_input_stats is false"
        )
    check_per_channel(
        op, input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )


def check_group_norm(
    input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> int:
    """The checks of group_norm; returns num_groups as an int (torch accepts any integer, a 0-d
    integer tensor included, but not a bool or a float)."""
    op = "group_norm"
    check_input(op, input, dim_error=RuntimeError)  # torch's type here
    channels = input.shape[1]
    try:
        if isinstance(num_groups, bool):
            raise TypeError
        num_groups = operator.index(num_groups)
    except TypeError:
        raise TypeError(
            f"{op}: num_groups must be an int, got {type(num_groups).__name__} {num_groups!r}"
        ) from None
    if num_groups <= 0:
        raise GroupCountError(f"{op}: num_groups must be a positive integer, got {num_groups}")
    if channels % num_groups:
        raise GroupCountError(
            f"{op}: expected the number of channels ({channels}, dimension 1 of input "
            f"{tuple(input.shape)}) to be divisible by num_groups, got num_groups={num_groups}"
        )
    # torch's count (F.group_norm): N x C/G x spatial; only one sample of one-channel groups
    # can make it 1 (every call's path: the loop only then)
    if input.shape[0] == 1 and channels == num_groups and input.numel() == channels:
        raise ValueError(
            f"{op}: expected more than 1 value per group when training (batch x channels per "
            f"group x spatial, as torch counts), got input size {tuple(input.shape)} with "
            f"num_groups={num_groups}"
        )
    for name, vector in (("weight", weight), ("bias", bias)):
        if vector is not None and vector.dim() != 1:
            raise RuntimeError(
                f"{op}: expected {name} to be a vector of {channels} elements (one per channel), "
                f"got shape {tuple(vector.shape)}"
            )
    check_per_channel(op, input, weight=weight, bias=bias)
    return num_groups


ACTIVATION_NAMES = activations.NAMES
LEAKY_RELU_SLOPE = activations.LEAKY_RELU_SLOPE


def parse_activation(activation) -> tuple[str | None, float]:
    """(name, leaky_relu slope) of an epilogue activation: None, one of ACTIVATION_NAMES, or
    ("leaky_relu", negative_slope)."""
    if activation is None:
        return None, LEAKY_RELU_SLOPE
    if isinstance(activation, tuple) and len(activation) == 2 and activation[0] == "leaky_relu":
        slope = activation[1]
        if isinstance(slope, bool) or not isinstance(slope, (int, float)):
            raise TypeError(f"leaky_relu's negative slope must be a number, got {slope!r}")
        return "leaky_relu", float(slope)
    if isinstance(activation, str) and activation in ACTIVATION_NAMES:
        return activation, LEAKY_RELU_SLOPE
    valid = ", ".join(repr(n) for n in ACTIVATION_NAMES)
    raise ValueError(
        f"unknown activation {activation!r}: expected None, one of {valid}, or "
        "('leaky_relu', negative_slope)"
    )


def _extra_dtype_error(op: str, name: str, t: Tensor) -> TypeError:
    """scale, shift and residual may have any floating dtype: the output takes the promoted
    one, as torch's composition."""
    return TypeError(
        f"{op}: expected {name} of a floating dtype (float16, bfloat16, float32 or float64; "
        f"the output's dtype is promoted as torch's composition's), got {t.dtype}"
    )


_FLOATING = frozenset(SUPPORTED_DTYPES)


def check_epilogue(
    op: str, input: Tensor, scale: Tensor | None, shift: Tensor | None, residual: Tensor | None
) -> None:
    """scale and shift (N, C); residual exactly input's shape; each floating, on input's
    device."""
    if input.dim() < 2:
        raise ValueError(f"{op}: scale, shift and residual need input of shape (N, C, *spatial)")
    expected = input.shape[:2]
    device = input.device
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
        if t.shape != expected:
            raise ValueError(
                f"{op}: expected {name} of shape (N, C) = {tuple(expected)} (per sample and "
                f"channel), got {tuple(t.shape)}"
            )
        if t.dtype not in _FLOATING:
            raise _extra_dtype_error(op, name, t)
        if t.device != device:
            raise RuntimeError(f"{op}: expected {name} on {device}, got {t.device}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(
                f"{op}: expected residual to be a torch.Tensor, got {type(residual).__name__}"
            )
        if residual.shape != input.shape:
            raise ValueError(
                f"{op}: expected residual of the input's shape {tuple(input.shape)}, "
                f"got {tuple(residual.shape)}"
            )
        if residual.dtype not in _FLOATING:
            raise _extra_dtype_error(op, "residual", residual)
        if residual.device != input.device:
            raise RuntimeError(f"{op}: expected residual on {input.device}, got {residual.device}")


def check_channel_norm(op: str, input: Tensor, weight: Tensor | None,
                       bias: Tensor | None = None) -> None:  # fmt: skip
    """LayerNorm2d / RMSNorm2d: (N, C, *spatial) floating input, weight and bias of C values."""
    check_input(op, input)
    channels = input.shape[1]
    for name, vector in (("weight", weight), ("bias", bias)):
        if vector is not None and vector.dim() != 1:  # torch's type: RuntimeError
            raise RuntimeError(
                f"{op}: expected {name} of shape ({channels},) (one value per channel), got "
                f"shape {tuple(vector.shape)}"
            )
    check_per_channel(op, input, weight=weight, bias=bias)
