"""Statistics across the channels at each position: LayerNorm2d (centred) and RMSNorm2d.

The fourth setting of the one reduction. BatchNorm reduces the samples and positions of a
channel, InstanceNorm the positions of a (sample, channel), GroupNorm the positions and C / G
channels of a (sample, group); here each (sample, position) has a statistic over all C channels,
and the affine parameters run along the reduced axis. The tiles are common.py's 4-D tiles with
one group of all C channels, [1, 1, BLOCK_C, BLOCK_S], so loading, the per-channel vectors, the
affine normalisation, its gradient's coefficients and the epilogue are the same functions the
other norms use; only the reduced axis differs (the channels, axis 2, instead of the positions).

A program holds whole channel vectors (BLOCK_C >= C) for BLOCK_S positions: the statistics never
leave registers, x is read once and y written once (2 passes), and the backward reads x and dy
and writes dx (3 passes). dweight and dbias are sums over the samples and positions: each
backward program accumulates its tiles' sums per channel and writes one partial row; grad.py's
finalize adds the rows in a fixed order (with an epilogue it also writes dscale and dshift, for
which the rows are per sample). RMS (``CENTRED=False``) normalises by sqrt(mean(x^2) + eps),
mean 0.
"""

import triton
import triton.language as tl

from . import config
from .common import (
    activation,
    channel_values,
    epilogue_output_grad,
    forward_coefficients,
    grad_coefficients,
    inverse_std,
    load_tile,
    normalized,
    pre_activation,
)
from .launcher import NO_EPILOGUE, Kernel, Launch, bind, index_64


@triton.jit
def _position_stats(x, mask, C, CENTRED: tl.constexpr):
    """mean and 1/sqrt(var + eps)'s M2 over the channels (axis 2) of a [1, 1, BLOCK_C, BLOCK_S]
    tile: two passes over registers (exact for any offset). RMS: mean 0, M2 = sum(x^2)."""
    if CENTRED:
        mean = tl.sum(x, axis=2, keep_dims=True) / C
        centred = tl.where(mask, x - mean, 0.0)
    else:
        mean = tl.zeros([1, 1, 1, x.shape[3]], x.dtype)
        centred = x
    return mean, tl.sum(centred * centred, axis=2, keep_dims=True)


@triton.jit
def _position_offsets(n, s0, S, BLOCK_S: tl.constexpr):
    """Offsets and mask of [1, 1, 1, BLOCK_S] positions of sample n in (N, S) statistics."""
    s = s0 + tl.arange(0, BLOCK_S)
    return (n * S + s)[None, None, None, :], (s < S)[None, None, None, :]


@triton.jit
def _position_norm_forward_kernel(
    x_ptr,  # input, viewed as (N, C, S)
    y_ptr,  # output, same strides as x
    weight_ptr, bias_ptr,  # (C,) or None
    mean_ptr, rstd_ptr,  # (N, S) statistics, written
    N, C, S,
    stride_n, stride_c, stride_s,
    eps: tl.float64,  # a float64 scalar (common.inverse_std)
    scale_ptr, shift_ptr,  # (N, C) per-sample scale and shift, or None (EPILOGUE)
    res_ptr,  # residual with its own strides, or None (EPILOGUE)
    res_stride_n, res_stride_c, res_stride_s,
    slope: tl.float64,  # leaky_relu's negative slope
    CENTRED: tl.constexpr,  # LayerNorm (mean subtracted); False: RMSNorm
    EPILOGUE: tl.constexpr,  # y = act(y * scale + shift + residual) (common.pre_activation)
    ACTIVATION: tl.constexpr,  # activation code (common.py), 0 for none
    FP64: tl.constexpr,  # statistics in float64 (float64 input), else float32
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,  # int64 element offsets (the tensor spans 2**30 elements or more)
):  # fmt: skip
    dtype: tl.constexpr = tl.float64 if FP64 else tl.float32
    num_s_blocks = tl.cdiv(S, BLOCK_S)
    n = tl.program_id(0) // num_s_blocks
    s0 = (tl.program_id(0) % num_s_blocks) * BLOCK_S
    x, offsets, mask = load_tile(
        x_ptr, n, 0, s0, N, C, S, C, stride_n, stride_c, stride_s, dtype,
        1, 1, BLOCK_C, BLOCK_S, INDEX_64,
    )  # fmt: skip
    mean, m2 = _position_stats(x, mask, C, CENTRED)
    rstd = inverse_std(tl.zeros_like(m2) + C, m2, eps)
    weight = channel_values(weight_ptr, 0, C, C, 1.0, dtype, 1, BLOCK_C)[:, :, :, None]
    bias = channel_values(bias_ptr, 0, C, C, 0.0, dtype, 1, BLOCK_C)[:, :, :, None]
    mu, k_x, k_c = forward_coefficients(mean, rstd, weight, bias)
    y = normalized(x, mu, k_x, k_c)
    if EPILOGUE:
        z = pre_activation(
            y, scale_ptr, shift_ptr, res_ptr, n, 0, s0, N, C, S, C,
            res_stride_n, res_stride_c, res_stride_s, 1, 1, BLOCK_C, BLOCK_S, INDEX_64,
        )  # fmt: skip
        y = activation(z, slope, ACTIVATION)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    stats, stats_mask = _position_offsets(n, s0, S, BLOCK_S)
    tl.store(mean_ptr + stats, mean, mask=stats_mask)
    tl.store(rstd_ptr + stats, rstd, mask=stats_mask)


@triton.jit
def _position_norm_backward_kernel(
    x_ptr,  # input, viewed as (N, C, S)
    dy_ptr,  # output gradient with its own strides
    dx_ptr,  # input gradient, same strides as x
    mean_ptr, rstd_ptr,  # (N, S) the forward's statistics
    weight_ptr, bias_ptr,  # (C,) or None (bias: only to recompute the pre-activation)
    # (2, SPLIT, rows, C) per-channel sums of g and g * x_hat over each program's tiles (g: the
    # gradient of the pre-activation, dy without an epilogue), or None (no dweight, dbias, dscale)
    partial_ptr,
    N, C, S,
    stride_n, stride_c, stride_s,
    dy_stride_n, dy_stride_c, dy_stride_s,
    partial_stride_k, partial_stride_p,
    scale_ptr, shift_ptr,  # (N, C) per-sample scale and shift, or None (EPILOGUE)
    res_ptr,  # residual with its own strides, or None
    res_stride_n, res_stride_c, res_stride_s,
    dres_ptr,  # residual gradient, same strides as x, or None
    y_ptr,  # the forward's output, same strides as x, to read act' off, or None
    slope: tl.float64,  # leaky_relu's negative slope
    CENTRED: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    # Partials per sample (rows = N: the epilogue's dscale and dshift need them), else one row:
    # a program's tiles then run across samples.
    PER_SAMPLE: tl.constexpr,
    SPLIT: tl.constexpr,  # programs per row of partials (a grid of rows x SPLIT); 0: one per tile
    FP64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,
):  # fmt: skip
    dtype: tl.constexpr = tl.float64 if FP64 else tl.float32
    num_s_blocks = tl.cdiv(S, BLOCK_S)
    if SPLIT == 0:  # dx only: one program per tile
        t_begin = tl.program_id(0)
        t_end = t_begin + 1
        t_first = 0
    else:
        num_tiles = num_s_blocks if PER_SAMPLE else N * num_s_blocks
        t_first = tl.program_id(0) * num_s_blocks if PER_SAMPLE else 0
        per_program = tl.cdiv(num_tiles, SPLIT)
        t_begin = t_first + tl.program_id(1) * per_program
        t_end = t_first + tl.minimum((tl.program_id(1) + 1) * per_program, num_tiles)
    weight = channel_values(weight_ptr, 0, C, C, 1.0, dtype, 1, BLOCK_C)[:, :, :, None]
    bias = channel_values(bias_ptr, 0, C, C, 0.0, dtype, 1, BLOCK_C)[:, :, :, None]
    sum_g = tl.zeros([1, 1, BLOCK_C, 1], dtype)
    sum_g_xhat = tl.zeros([1, 1, BLOCK_C, 1], dtype)
    for t in range(t_begin, t_end):
        n = t // num_s_blocks
        s0 = (t % num_s_blocks) * BLOCK_S
        x, offsets, mask = load_tile(
            x_ptr, n, 0, s0, N, C, S, C, stride_n, stride_c, stride_s, dtype,
            1, 1, BLOCK_C, BLOCK_S, INDEX_64,
        )  # fmt: skip
        dy, _, _ = load_tile(
            dy_ptr, n, 0, s0, N, C, S, C, dy_stride_n, dy_stride_c, dy_stride_s, dtype,
            1, 1, BLOCK_C, BLOCK_S, INDEX_64,
        )  # fmt: skip
        stats, stats_mask = _position_offsets(n, s0, S, BLOCK_S)
        mean = tl.load(mean_ptr + stats, mask=stats_mask, other=0.0)
        rstd = tl.load(rstd_ptr + stats, mask=stats_mask, other=0.0)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy
        if EPILOGUE:  # dy becomes du = g * scale, the gradient of x_hat * w + b
            g, dy = epilogue_output_grad(
                x, dy, mean, rstd * weight, bias, scale_ptr, shift_ptr, res_ptr, y_ptr,
                offsets, mask, n, 0, s0, N, C, S, C, res_stride_n, res_stride_c, res_stride_s,
                slope, ACTIVATION, 1, 1, BLOCK_C, BLOCK_S, INDEX_64,
            )  # fmt: skip
            if dres_ptr is not None:
                tl.store(dres_ptr + offsets, g.to(dres_ptr.dtype.element_ty), mask=mask)
        # The statistic's sums are over this position's channels: the "sums" of the group
        # formula are dy and dy * x_hat themselves. RMS subtracts no mean: no mean(w dy) term.
        sum_dy = dy if CENTRED else tl.zeros_like(dy)
        k_x, k_dy, k_c = grad_coefficients(rstd, weight, sum_dy, dy * x_hat, C, True)
        dx = normalized(x, mean, k_x, k_c) + k_dy * dy
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if partial_ptr is not None:
            sum_g += tl.sum(g, axis=3, keep_dims=True)
            sum_g_xhat += tl.sum(g * x_hat, axis=3, keep_dims=True)
    if partial_ptr is not None:
        c = tl.arange(0, BLOCK_C)[None, None, :, None]
        row = tl.program_id(0) if PER_SAMPLE else 0
        part = partial_ptr + tl.program_id(1) * partial_stride_p + row * C + c
        tl.store(part, sum_g, mask=c < C)
        tl.store(part + partial_stride_k, sum_g_xhat, mask=c < C)


# --- launchers ----------------------------------------------------------------------------------

_FORWARD = Kernel(_position_norm_forward_kernel)
_BACKWARD = Kernel(_position_norm_backward_kernel)


def _common(red, centred: bool, extras: dict) -> dict:
    return dict(
        **red.kernel_args(), **extras, CENTRED=centred, FP64=red.acc_dtype.itemsize == 8,
    )  # fmt: skip


def _drop_group(args: dict) -> dict:
    args.pop("K")  # one group of every channel: the kernels pass C where the tiles take K
    return args


def bind_forward(red, tensors: dict, *, centred: bool, eps: float = 0.0,
                 extras: dict = NO_EPILOGUE) -> Launch:  # fmt: skip
    """The forward over ``red`` (launch.Reduction of one group of all channels): y, mean, rstd."""
    candidates = config.position_configs(red, backward=False, epilogue=extras["EPILOGUE"])
    constants = _drop_group(_common(red, centred, extras))
    constants.update(eps=eps, INDEX_64=index_64(red.view))
    v = red.view
    return bind(
        _FORWARD, red, tensors, constants, candidates=candidates,
        grid_of=lambda m: (v.N * config.cdiv(v.S, m["BLOCK_S"]),),
    )  # fmt: skip


def bind_backward(red, tensors: dict, *, centred: bool, dy_view, per_sample: bool,
                  partial_strides: tuple[int, int],
                  extras: dict = NO_EPILOGUE) -> Launch:  # fmt: skip
    """The backward over ``red``: dx (and dresidual), and with a partials tensor the per-channel
    partial sums for the finalize (``per_sample``: one row per sample)."""
    sums = tensors.get("partial_ptr") is not None
    candidates = config.position_configs(
        red, backward=True, epilogue=extras["EPILOGUE"], sums=sums, per_sample=per_sample
    )
    constants = _drop_group(_common(red, centred, extras))
    constants.update(
        **dict(zip(("dy_stride_n", "dy_stride_c", "dy_stride_s"), dy_view.strides, strict=True)),
        partial_stride_k=partial_strides[0], partial_stride_p=partial_strides[1],
        PER_SAMPLE=per_sample, INDEX_64=index_64(red.view, dy_view),
    )  # fmt: skip
    v = red.view

    def grid_of(m):
        if m["SPLIT"] == 0:
            return (v.N * config.cdiv(v.S, m["BLOCK_S"]),)
        return (v.N if per_sample else 1, m["SPLIT"])

    return bind(_BACKWARD, red, tensors, constants, candidates=candidates, grid_of=grid_of)
