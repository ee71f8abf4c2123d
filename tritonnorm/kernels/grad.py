"""Backward reductions: split per-channel partial sums of dy and dy * x_hat, and the second stage
that combines them into dweight, dbias and the per-channel coefficients of the dx pass."""

import triton
import triton.language as tl

from . import config
from .common import (
    channel_offsets,
    channel_values,
    epilogue_output_grad,
    grad_coefficients,
    group_channels,
    load_tile,
    normalized,
    reduce_positions,
    stat_offsets,
    store_coefficients,
)
from .launcher import NO_EPILOGUE, Kernel, Launch, bind, index_64


@triton.jit
def _grad_tile(
    x_ptr, dy_ptr, n0, g0, s0, N, C, S, K,
    stride_n, stride_c, stride_s,
    dy_stride_n, dy_stride_c, dy_stride_s,
    mean, rstd,  # [ROWS, BLOCK_G, 1, 1] statistics of the tile's groups
    acc_dtype: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,
):  # fmt: skip
    """x, x_hat and dy of the tile at (n0, g0, s0), 0 outside the tensor; x's offsets and mask."""
    x, offsets, mask = load_tile(
        x_ptr, n0, g0, s0, N, C, S, K, stride_n, stride_c, stride_s, acc_dtype,
        BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S, INDEX_64,
    )  # fmt: skip
    dy, _, _ = load_tile(
        dy_ptr, n0, g0, s0, N, C, S, K, dy_stride_n, dy_stride_c, dy_stride_s, acc_dtype,
        BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S, INDEX_64,
    )  # fmt: skip
    x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
    return x, x_hat, dy, offsets, mask


@triton.jit
def _norm_grad_partial_kernel(
    x_ptr,  # input, viewed as (N, C, S)
    dy_ptr,  # output gradient, (N, C, S) with its own strides
    # input gradient, same strides as x, or None: written when FUSED, and streamed in eval
    # (the running statistics: dx = w rstd dy, no sums needed for it)
    dx_ptr,
    mean_ptr, rstd_ptr,  # (rows, C // K) statistics used by the forward
    weight_ptr,  # (C,) or None; read when FUSED or EPILOGUE
    bias_ptr,  # (C,) or None; read only when EPILOGUE
    partial_ptr,  # (2, SPLIT, rows, C) per-channel sum(dy), sum(dy * x_hat), or None
    # FUSED with REDUCE_BATCH (one program holds whole channels): dweight, dbias (C,), or None
    dweight_ptr, dbias_ptr,
    N, C, S,
    K,  # channels per statistic
    stride_n, stride_c, stride_s,  # strides of x (and dx)
    dy_stride_n, dy_stride_c, dy_stride_s,
    partial_stride_k, partial_stride_p,
    scale_ptr, shift_ptr,  # (N, C) per-sample scale and shift, or None (EPILOGUE)
    res_ptr,  # residual with its own strides, or None (EPILOGUE)
    res_stride_n, res_stride_c, res_stride_s,
    dres_ptr,  # residual gradient, same strides as x, or None; written only when FUSED
    # The forward's output y, same strides as x, or None: act'(z) = act'(y) (ReLU, leaky ReLU
    # with a slope >= 0), so z is not recomputed (common.epilogue_output_grad).
    y_ptr,
    slope: tl.float64,  # leaky_relu's negative slope
    REDUCE_BATCH: tl.constexpr,
    FUSED: tl.constexpr,  # whole reduction in this tile: write dx from registers
    # Sums of g = dy * act'(z) instead of dy (not with REDUCE_BATCH); when FUSED, dx from
    # du = g * scale and the residual's gradient g are written too.
    EPILOGUE: tl.constexpr,
    ACTIVATION: tl.constexpr,  # activation code (common.py), 0 for none
    SPLIT: tl.constexpr,
    LANES: tl.constexpr,  # streamed: per-element sums, reduced once at the end (stats.py)
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,  # int64 element offsets (a tensor spans 2**30 elements or more)
    # The statistics are one row for the whole batch while the sums are per sample (BatchNorm
    # with per-sample scale/shift: the epilogue backward).
    STATS_SHARED: tl.constexpr = False,
):  # fmt: skip
    acc_dtype = rstd_ptr.dtype.element_ty
    ROWS: tl.constexpr = 1 if REDUCE_BATCH else BLOCK_N
    rows = 1 if REDUCE_BATCH else N
    groups = C // K
    num_g_blocks = tl.cdiv(groups, BLOCK_G)
    g0 = (tl.program_id(0) % num_g_blocks) * BLOCK_G
    n_first = 0 if REDUCE_BATCH else (tl.program_id(0) // num_g_blocks) * BLOCK_N
    num_s_tiles = tl.cdiv(S, BLOCK_S)
    if STATS_SHARED:  # one row of statistics serves every sample (sums per sample)
        stats, stats_mask = stat_offsets(0, g0, 1, groups, 1, BLOCK_G)
    else:
        stats, stats_mask = stat_offsets(n_first, g0, rows, groups, ROWS, BLOCK_G)
    mean = tl.load(mean_ptr + stats, mask=stats_mask, other=0.0)[:, :, None, None]
    group_rstd = tl.load(rstd_ptr + stats, mask=stats_mask, other=0.0)[:, :, None]
    rstd = group_rstd[:, :, :, None]

    if FUSED:
        x, x_hat, dy, offsets, mask = _grad_tile(
            x_ptr, dy_ptr, n_first, g0, 0, N, C, S, K, stride_n, stride_c, stride_s,
            dy_stride_n, dy_stride_c, dy_stride_s, mean, rstd, acc_dtype,
            BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S, INDEX_64,
        )  # fmt: skip
        if EPILOGUE:  # dy becomes du = g * scale, the gradient of x_hat * w + b
            w_e = channel_values(weight_ptr, g0, K, C, 1.0, acc_dtype, BLOCK_G, BLOCK_K)
            b_e = channel_values(bias_ptr, g0, K, C, 0.0, acc_dtype, BLOCK_G, BLOCK_K)
            g, dy = epilogue_output_grad(
                x, dy, mean, rstd * w_e[:, :, :, None], b_e[:, :, :, None],
                scale_ptr, shift_ptr, res_ptr, y_ptr, offsets, mask, n_first, g0, 0, N, C, S, K,
                res_stride_n, res_stride_c, res_stride_s, slope, ACTIVATION,
                BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S, INDEX_64,
            )  # fmt: skip
            if dres_ptr is not None:
                tl.store(dres_ptr + offsets, g.to(dres_ptr.dtype.element_ty), mask=mask)
        sum_dy = reduce_positions(dy, REDUCE_BATCH)
        sum_dy_xhat = reduce_positions(dy * x_hat, REDUCE_BATCH)
        weight = channel_values(weight_ptr, g0, K, C, 1.0, acc_dtype, BLOCK_G, BLOCK_K)
        count = (N if REDUCE_BATCH else 1) * K * S
        k_x, k_dy, k_c = grad_coefficients(group_rstd, weight, sum_dy, sum_dy_xhat, count, True)
        dx = normalized(x, mean, k_x[:, :, :, None], k_c[:, :, :, None]) + k_dy[:, :, :, None] * dy
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if EPILOGUE:  # the partials hold the per-(sample, channel) sums of g (dscale, dshift)
            sum_dy = reduce_positions(g, REDUCE_BATCH)
            sum_dy_xhat = reduce_positions(g * x_hat, REDUCE_BATCH)
    else:
        num_tiles = tl.cdiv(N, BLOCK_N) * num_s_tiles if REDUCE_BATCH else num_s_tiles
        tiles_per_split = tl.cdiv(num_tiles, SPLIT)
        t_begin = tl.program_id(1) * tiles_per_split
        t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
        sum_dy = tl.zeros([ROWS, BLOCK_G, BLOCK_K], acc_dtype)
        sum_dy_xhat = tl.zeros([ROWS, BLOCK_G, BLOCK_K], acc_dtype)
        if LANES:
            lane_dy = tl.zeros([BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S], acc_dtype)
            lane_dy_xhat = tl.zeros([BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S], acc_dtype)
        if EPILOGUE or dx_ptr is not None:
            weight = channel_values(weight_ptr, g0, K, C, 1.0, acc_dtype, BLOCK_G, BLOCK_K)
            bias = channel_values(bias_ptr, g0, K, C, 0.0, acc_dtype, BLOCK_G, BLOCK_K)
        for t in range(t_begin, t_end):
            n0 = n_first + (t // num_s_tiles) * BLOCK_N
            s0 = (t % num_s_tiles) * BLOCK_S
            x, x_hat, dy, offsets, mask = _grad_tile(
                x_ptr, dy_ptr, n0, g0, s0, N, C, S, K, stride_n, stride_c, stride_s,
                dy_stride_n, dy_stride_c, dy_stride_s, mean, rstd, acc_dtype,
                BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S, INDEX_64,
            )  # fmt: skip
            if EPILOGUE:  # per-(sample, channel) sums of g, the pre-activation's gradient
                dy, _ = epilogue_output_grad(
                    x, dy, mean, rstd * weight[:, :, :, None], bias[:, :, :, None],
                    scale_ptr, shift_ptr, res_ptr, y_ptr, offsets, mask, n0, g0, s0,
                    N, C, S, K, res_stride_n, res_stride_c, res_stride_s, slope, ACTIVATION,
                    BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S, INDEX_64,
                )  # fmt: skip
            if dx_ptr is not None:  # eval: dx = w rstd dy, written on the way (x, dy read once)
                dx = (weight[:, :, :, None] * rstd) * dy
                tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if LANES:
                lane_dy += dy
                lane_dy_xhat += dy * x_hat
            else:
                sum_dy += reduce_positions(dy, REDUCE_BATCH)
                sum_dy_xhat += reduce_positions(dy * x_hat, REDUCE_BATCH)
        if LANES:
            sum_dy = reduce_positions(lane_dy, REDUCE_BATCH)
            sum_dy_xhat = reduce_positions(lane_dy_xhat, REDUCE_BATCH)

    sums, sums_mask = channel_offsets(n_first, g0, rows, K, C, ROWS, BLOCK_G, BLOCK_K)
    if FUSED and dweight_ptr is not None:  # REDUCE_BATCH: the sums are over the whole batch
        tl.store(dweight_ptr + sums, sum_dy_xhat.to(dweight_ptr.dtype.element_ty), mask=sums_mask)
        tl.store(dbias_ptr + sums, sum_dy.to(dbias_ptr.dtype.element_ty), mask=sums_mask)
    if partial_ptr is not None:
        sums += tl.program_id(1) * partial_stride_p
        tl.store(partial_ptr + sums, sum_dy, mask=sums_mask)
        tl.store(partial_ptr + partial_stride_k + sums, sum_dy_xhat, mask=sums_mask)


@triton.jit
def _norm_grad_finalize_kernel(
    partial_ptr,  # (2, P, rows, C) sum(dy), sum(dy * x_hat), summed in order p = 0..P-1
    num_partials,  # P (0: no sums needed, eval-mode dx only)
    partial_stride_k, partial_stride_p,
    mean_ptr, rstd_ptr,  # (rows, groups) forward statistics (one row when STATS_SHARED)
    weight_ptr,  # (C,) or None
    bias_ptr,  # (C,) or None (EPILOGUE: dscale)
    dweight_ptr, dbias_ptr,  # (C,) outputs (sums over the rows), or None
    coef_ptr,  # (4, rows, C) dx coefficients (named slots, common.py; one row when STATS_SHARED)
    scale_ptr,  # (rows, C) per-sample scale, or None (EPILOGUE)
    dscale_ptr, dshift_ptr,  # (rows, C) outputs, or None (EPILOGUE)
    rows, C,
    K,  # channels per statistic
    count,  # elements per statistic (an integer: exact in the statistics' dtype)
    USE_INPUT_STATS: tl.constexpr,  # training formula (the statistics depend on x)
    # The sums are of g, the pre-activation's gradient, per sample: dscale = w sum(g x_hat) +
    # b sum(g) and dshift = sum(g) are written, and the sums become those of du = g * scale.
    EPILOGUE: tl.constexpr,
    # One row of statistics for the per-sample sums (BatchNorm's epilogue backward): the
    # coefficients come from the sums over every row (one program walks them in order).
    STATS_SHARED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Programs: (blocks of groups) x (programs over rows); parameter gradients sum over rows, so
    # the launcher gives that case one program per block of groups, walking the rows in order.
    acc_dtype = rstd_ptr.dtype.element_ty
    groups = C // K
    g0 = tl.program_id(0) * BLOCK_G
    weight = channel_values(weight_ptr, g0, K, C, 1.0, acc_dtype, BLOCK_G, BLOCK_K)
    dweight = tl.zeros([BLOCK_G, BLOCK_K], acc_dtype)
    dbias = tl.zeros([BLOCK_G, BLOCK_K], acc_dtype)
    for r0 in range(tl.program_id(1) * BLOCK_R, rows, tl.num_programs(1) * BLOCK_R):
        sums, sums_mask = channel_offsets(r0, g0, rows, K, C, BLOCK_R, BLOCK_G, BLOCK_K)
        sum_dy = tl.zeros([BLOCK_R, BLOCK_G, BLOCK_K], acc_dtype)
        sum_dy_xhat = tl.zeros([BLOCK_R, BLOCK_G, BLOCK_K], acc_dtype)
        for p in range(num_partials):
            part = partial_ptr + p * partial_stride_p + sums
            sum_dy += tl.load(part, mask=sums_mask, other=0.0)
            sum_dy_xhat += tl.load(part + partial_stride_k, mask=sums_mask, other=0.0)
        if EPILOGUE:
            if dscale_ptr is not None:
                bias = channel_values(bias_ptr, g0, K, C, 0.0, acc_dtype, BLOCK_G, BLOCK_K)
                dscale = weight * sum_dy_xhat + bias * sum_dy
                tl.store(dscale_ptr + sums, dscale.to(dscale_ptr.dtype.element_ty), mask=sums_mask)
                tl.store(dshift_ptr + sums, sum_dy.to(dshift_ptr.dtype.element_ty), mask=sums_mask)
            if scale_ptr is not None:
                scale = tl.load(scale_ptr + sums, mask=sums_mask, other=0.0).to(acc_dtype)
                sum_dy *= scale
                sum_dy_xhat *= scale
        dweight += tl.sum(sum_dy_xhat, axis=0)
        dbias += tl.sum(sum_dy, axis=0)
        if coef_ptr is not None and not STATS_SHARED:
            stats, stats_mask = stat_offsets(r0, g0, rows, groups, BLOCK_R, BLOCK_G)
            mean = tl.load(mean_ptr + stats, mask=stats_mask, other=0.0)[:, :, None]
            rstd = tl.load(rstd_ptr + stats, mask=stats_mask, other=0.0)[:, :, None]
            k_x, k_dy, k_c = grad_coefficients(
                rstd, weight, sum_dy, sum_dy_xhat, count, USE_INPUT_STATS
            )
            store_coefficients(
                coef_ptr, sums, sums_mask, rows * C, mean + tl.zeros_like(k_x), k_x, k_dy, k_c
            )
    if coef_ptr is not None and STATS_SHARED:  # one row, from the sums over every row
        sums, sums_mask = channel_offsets(0, g0, 1, K, C, 1, BLOCK_G, BLOCK_K)
        stats, stats_mask = stat_offsets(0, g0, 1, groups, 1, BLOCK_G)
        mean = tl.load(mean_ptr + stats, mask=stats_mask, other=0.0)[:, :, None]
        rstd = tl.load(rstd_ptr + stats, mask=stats_mask, other=0.0)[:, :, None]
        k_x, k_dy, k_c = grad_coefficients(
            rstd, weight, dbias[None, :, :], dweight[None, :, :], count, USE_INPUT_STATS
        )
        store_coefficients(coef_ptr, sums, sums_mask, C, mean + tl.zeros_like(k_x), k_x, k_dy, k_c)
    c, c_mask = group_channels(g0, K, C, BLOCK_G, BLOCK_K)
    if dweight_ptr is not None:
        tl.store(dweight_ptr + c, dweight.to(dweight_ptr.dtype.element_ty), mask=c_mask)
    if dbias_ptr is not None:
        tl.store(dbias_ptr + c, dbias.to(dbias_ptr.dtype.element_ty), mask=c_mask)


# --- launchers ----------------------------------------------------------------------------------

_GRAD = Kernel(_norm_grad_partial_kernel)
_FINALIZE = Kernel(_norm_grad_finalize_kernel)


def bind_gradient_sums(
    red, tensors: dict, *, dy_view, fused: bool, extras: dict = NO_EPILOGUE,
    stats_shared: bool = False,
) -> Launch:  # fmt: skip
    """The gradient-sum kernel over the reduction ``red`` (launch.Reduction): partials, or
    fused dx and, with the batch reduced, dweight and dbias; config chosen by tuning.py."""
    candidates = config.reduction_configs(red, fused, backward=True, epilogue=extras["EPILOGUE"])
    max_split = max(c.kwargs["SPLIT"] for c in candidates.configs)
    constants = dict(
        **red.kernel_args(), **extras,
        **dict(zip(("dy_stride_n", "dy_stride_c", "dy_stride_s"), dy_view.strides, strict=True)),
        partial_stride_k=max_split * red.rows * red.view.C,
        partial_stride_p=red.rows * red.view.C,
        REDUCE_BATCH=red.reduce_batch, FUSED=fused, INDEX_64=index_64(red.view, dy_view),
        STATS_SHARED=stats_shared,
    )  # fmt: skip
    return bind(
        _GRAD, red, tensors, constants, candidates=candidates, fused=fused,
        grid_of=lambda m: (red.stats_programs(m), m["SPLIT"]),
    )  # fmt: skip


def bind_finalize(
    red, tensors: dict, num_partials: int, *, partial_strides: tuple[int, int], count: int,
    use_input_stats: bool, param_grads: bool, epilogue: bool = False,
    stats_shared: bool = False,
) -> Launch:  # fmt: skip
    """The gradient finalize kernel: dweight, dbias, the dx coefficients (and with an epilogue,
    dscale and dshift) from ``num_partials`` partials, combined in order."""
    grid, blocks = red.finalize_grid(ordered_rows=param_grads or stats_shared)
    return bind(
        _FINALIZE, red, tensors, dict(
            num_partials=num_partials, partial_stride_k=partial_strides[0],
            partial_stride_p=partial_strides[1], rows=red.rows, C=red.view.C, K=red.group_size,
            count=max(count, 1), USE_INPUT_STATS=use_input_stats, EPILOGUE=epilogue,
            STATS_SHARED=stats_shared, **blocks,
        ), grid=grid,
    )  # fmt: skip
