"""Forward statistics: split partial (count, mean, M2) per statistic, and the small deterministic
second stage that combines them, updates the running statistics and produces the per-channel
coefficients of the apply pass."""

import triton
import triton.language as tl

from . import config
from .common import (
    activation,
    chan_combine,
    channel_offsets,
    channel_values,
    combine_partials,
    forward_coefficients,
    inverse_std,
    lane_update,
    lanes_summary,
    load_tile,
    normalized,
    pre_activation,
    stat_offsets,
    store_coefficients,
    tile_summary,
    update_running,
)
from .launcher import NO_EPILOGUE, Kernel, Launch, bind, index_64


@triton.jit
def _norm_stats_partial_kernel(
    x_ptr,  # input, viewed as (N, C, S)
    y_ptr,  # output, same strides as x; written only when FUSED
    weight_ptr,  # (C,) or None; read only when FUSED
    bias_ptr,  # (C,) or None; read only when FUSED
    partial_ptr,  # (3, SPLIT, rows, C // K) count, mean, M2 (rows = 1 if REDUCE_BATCH else N), or None
    # FUSED: the statistics themselves, (rows, C // K), or None (then partials)
    mean_ptr, rstd_ptr,
    # FUSED with REDUCE_BATCH (one program holds whole channels): the running statistics (C,),
    # updated in place, or None
    running_mean_ptr, running_var_ptr,
    N, C, S,
    K,  # channels per statistic (1: BatchNorm, InstanceNorm; C / num_groups: GroupNorm)
    stride_n, stride_c, stride_s,  # strides of x (and y)
    partial_stride_k, partial_stride_p,  # strides of the partials' first two axes
    eps: tl.float64,  # float64 scalars: float64 inputs keep every digit (see inverse_std)
    momentum: tl.float64,
    scale_ptr, shift_ptr,  # (N, C) per-sample scale and shift, or None; read only when FUSED
    res_ptr,  # residual with its own strides, or None; read only when FUSED
    res_stride_n, res_stride_c, res_stride_s,
    slope: tl.float64,  # leaky_relu's negative slope
    REDUCE_BATCH: tl.constexpr,  # statistics over the batch axis too (BatchNorm)
    FUSED: tl.constexpr,  # the whole reduction is this tile: normalise in registers, write y
    EPILOGUE: tl.constexpr,  # y = act(y * scale + shift + residual) (common.pre_activation)
    ACTIVATION: tl.constexpr,  # activation code (common.py), 0 for none
    SPLIT: tl.constexpr,  # programs sharing one statistic's reduction
    # Streamed: per-element Welford accumulators reduced once at the end (lane_update), instead
    # of a (count, mean, M2) summary of every tile: no cross-thread reduction per tile. An
    # autotune choice (config.py); each is deterministic.
    LANES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,  # int64 element offsets (the tensor spans 2**30 elements or more)
):  # fmt: skip
    acc_dtype = mean_ptr.dtype.element_ty if partial_ptr is None else partial_ptr.dtype.element_ty
    ROWS: tl.constexpr = 1 if REDUCE_BATCH else BLOCK_N
    groups = C // K
    num_g_blocks = tl.cdiv(groups, BLOCK_G)
    g0 = (tl.program_id(0) % num_g_blocks) * BLOCK_G
    n_first = 0 if REDUCE_BATCH else (tl.program_id(0) // num_g_blocks) * BLOCK_N
    num_s_tiles = tl.cdiv(S, BLOCK_S)

    if FUSED:
        x, offsets, mask = load_tile(
            x_ptr, n_first, g0, 0, N, C, S, K, stride_n, stride_c, stride_s, acc_dtype,
            BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S, INDEX_64,
        )  # fmt: skip
        count = tl.zeros([ROWS, BLOCK_G], acc_dtype) + (N if REDUCE_BATCH else 1) * K * S
        mean, m2 = tile_summary(x, mask, count, REDUCE_BATCH)
        weight = channel_values(weight_ptr, g0, K, C, 1.0, acc_dtype, BLOCK_G, BLOCK_K)
        bias = channel_values(bias_ptr, g0, K, C, 0.0, acc_dtype, BLOCK_G, BLOCK_K)
        rstd = inverse_std(count, m2, eps)
        mu, k_x, k_c = forward_coefficients(mean[:, :, None], rstd[:, :, None], weight, bias)
        y = normalized(x, mu[:, :, :, None], k_x[:, :, :, None], k_c[:, :, :, None])
        if EPILOGUE:
            z = pre_activation(
                y, scale_ptr, shift_ptr, res_ptr, n_first, g0, 0, N, C, S, K,
                res_stride_n, res_stride_c, res_stride_s, BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S,
                INDEX_64,
            )  # fmt: skip
            y = activation(z, slope, ACTIVATION)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        num_tiles = tl.cdiv(N, BLOCK_N) * num_s_tiles if REDUCE_BATCH else num_s_tiles
        tiles_per_split = tl.cdiv(num_tiles, SPLIT)
        t_begin = tl.program_id(1) * tiles_per_split
        t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
        if LANES:
            lane_count = tl.zeros([BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S], acc_dtype)
            lane_mean = tl.zeros([BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S], acc_dtype)
            lane_m2 = tl.zeros([BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S], acc_dtype)
        else:
            count = tl.zeros([ROWS, BLOCK_G], acc_dtype)
            mean = tl.zeros([ROWS, BLOCK_G], acc_dtype)
            m2 = tl.zeros([ROWS, BLOCK_G], acc_dtype)
        for t in range(t_begin, t_end):
            n0 = n_first + (t // num_s_tiles) * BLOCK_N
            s0 = (t % num_s_tiles) * BLOCK_S
            x, _, mask = load_tile(
                x_ptr, n0, g0, s0, N, C, S, K, stride_n, stride_c, stride_s, acc_dtype,
                BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S, INDEX_64,
            )  # fmt: skip
            if LANES:
                lane_count, lane_mean, lane_m2 = lane_update(
                    lane_count, lane_mean, lane_m2, x, mask
                )
            else:
                valid = K * tl.minimum(S - s0, BLOCK_S)
                if REDUCE_BATCH:
                    valid *= tl.minimum(N - n0, BLOCK_N)
                tile_count = tl.zeros([ROWS, BLOCK_G], acc_dtype) + valid
                tile_mean, tile_m2 = tile_summary(x, mask, tile_count, REDUCE_BATCH)
                count, mean, m2 = chan_combine(count, mean, m2, tile_count, tile_mean, tile_m2)
        if LANES:
            count, mean, m2 = lanes_summary(lane_count, lane_mean, lane_m2, REDUCE_BATCH)

    stats, stats_mask = stat_offsets(n_first, g0, 1 if REDUCE_BATCH else N, groups, ROWS, BLOCK_G)
    if FUSED and mean_ptr is not None:  # the statistics themselves: no finalize launch
        tl.store(mean_ptr + stats, mean, mask=stats_mask)
        tl.store(rstd_ptr + stats, rstd, mask=stats_mask)
        if running_mean_ptr is not None:  # REDUCE_BATCH, K = 1: stats index the channels
            # a float64 scalar (common.inverse_std); float64 by addition: the interpreter's
            # tl.cast of a Python float rounds it to float32 first
            if acc_dtype == tl.float64:
                momentum = momentum + tl.zeros([1], acc_dtype)
            else:
                momentum = tl.cast(momentum, acc_dtype)
            update_running(
                running_mean_ptr, running_var_ptr, running_mean_ptr, running_var_ptr, stats,
                stats_mask, mean, m2 / tl.maximum(count - 1.0, 1.0), momentum,
            )  # fmt: skip
    if partial_ptr is not None:
        stats += tl.program_id(1) * partial_stride_p
        tl.store(partial_ptr + stats, count, mask=stats_mask)
        tl.store(partial_ptr + partial_stride_k + stats, mean, mask=stats_mask)
        tl.store(partial_ptr + 2 * partial_stride_k + stats, m2, mask=stats_mask)


@triton.jit
def _norm_stats_finalize_kernel(
    partial_ptr,  # (3, P, rows, groups) count, mean, M2 partials, combined in order p = 0..P-1
    num_partials,  # P
    partial_stride_k, partial_stride_p,
    combined_ptr,  # (3, rows, groups) combined count, mean, M2, or None
    mean_ptr,  # (rows, groups) saved mean
    rstd_ptr,  # (rows, groups) saved 1/sqrt(var + eps)
    coef_ptr,  # (4, rows, C) apply coefficients (named slots, common.py), or None
    weight_ptr, bias_ptr,  # (C,) or None
    running_mean_ptr, running_var_ptr,  # (C,) or None: the running statistics read
    new_running_mean_ptr, new_running_var_ptr,  # (C,) updated running statistics, or None
    rows, C,
    K,  # channels per statistic
    momentum: tl.float64, eps: tl.float64,  # float64: exact for float64 running statistics
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Programs: (blocks of groups) x (programs over rows). Updating running statistics averages
    # over rows, so the launcher gives that case one program per block of groups, which walks
    # the rows in order (deterministic).
    acc_dtype = mean_ptr.dtype.element_ty
    groups = C // K
    g0 = tl.program_id(0) * BLOCK_G
    weight = channel_values(weight_ptr, g0, K, C, 1.0, acc_dtype, BLOCK_G, BLOCK_K)
    bias = channel_values(bias_ptr, g0, K, C, 0.0, acc_dtype, BLOCK_G, BLOCK_K)
    sum_mean = tl.zeros([BLOCK_G], acc_dtype)
    sum_unbiased_var = tl.zeros([BLOCK_G], acc_dtype)
    for r0 in range(tl.program_id(1) * BLOCK_R, rows, tl.num_programs(1) * BLOCK_R):
        stats, stats_mask = stat_offsets(r0, g0, rows, groups, BLOCK_R, BLOCK_G)
        zero = tl.zeros([BLOCK_R, BLOCK_G], acc_dtype)
        count, mean, m2 = combine_partials(
            partial_ptr, num_partials, partial_stride_k, partial_stride_p, stats, stats_mask,
            zero, zero, zero,
        )  # fmt: skip
        if combined_ptr is not None:
            slot = rows * groups
            tl.store(combined_ptr + stats, count, mask=stats_mask)
            tl.store(combined_ptr + slot + stats, mean, mask=stats_mask)
            tl.store(combined_ptr + 2 * slot + stats, m2, mask=stats_mask)
        rstd = inverse_std(count, m2, eps)
        tl.store(mean_ptr + stats, mean, mask=stats_mask)
        tl.store(rstd_ptr + stats, rstd, mask=stats_mask)
        if coef_ptr is not None:
            mu, k_x, k_c = forward_coefficients(mean[:, :, None], rstd[:, :, None], weight, bias)
            coefs, coefs_mask = channel_offsets(r0, g0, rows, K, C, BLOCK_R, BLOCK_G, BLOCK_K)
            zeros = tl.zeros_like(k_x)
            store_coefficients(coef_ptr, coefs, coefs_mask, rows * C, mu, k_x, zeros, k_c)
        if new_running_mean_ptr is not None:  # K = 1: the batch average, as torch's IN
            sum_mean += tl.sum(tl.where(stats_mask, mean, 0.0), axis=0)
            unbiased_var = m2 / tl.maximum(count - 1.0, 1.0)
            sum_unbiased_var += tl.sum(tl.where(stats_mask, unbiased_var, 0.0), axis=0)
    if new_running_mean_ptr is not None:
        c = g0 + tl.arange(0, BLOCK_G)
        if acc_dtype == tl.float64:  # as above: exact
            momentum = momentum + tl.zeros([1], acc_dtype)
        else:
            momentum = tl.cast(momentum, acc_dtype)
        update_running(
            running_mean_ptr, running_var_ptr, new_running_mean_ptr, new_running_var_ptr, c,
            c < C, sum_mean / rows, sum_unbiased_var / rows, momentum,
        )  # fmt: skip


# --- launchers ----------------------------------------------------------------------------------

_STATS = Kernel(_norm_stats_partial_kernel)
_FINALIZE = Kernel(_norm_stats_finalize_kernel)


def bind_statistics(
    red, tensors: dict, *, fused: bool, eps: float = 0.0, momentum: float = 0.0,
    extras: dict = NO_EPILOGUE,
) -> Launch:  # fmt: skip
    """The statistics kernel over the reduction ``red`` (launch.Reduction): partials, or fused
    (the reduction fits one tile) y and the statistics themselves; config chosen by tuning.py.
    ``eps`` and ``momentum`` are bound unless ``tensors`` passes them at every call."""
    candidates = config.reduction_configs(red, fused, epilogue=extras["EPILOGUE"])
    max_split = max(c.kwargs["SPLIT"] for c in candidates.configs)
    constants = dict(
        **red.kernel_args(), eps=eps, momentum=momentum, **extras,
        REDUCE_BATCH=red.reduce_batch, FUSED=fused, INDEX_64=index_64(red.view),
        partial_stride_k=max_split * red.rows * red.groups, partial_stride_p=red.rows * red.groups,
    )  # fmt: skip
    return bind(
        _STATS, red, tensors, constants, candidates=candidates, fused=fused,
        grid_of=lambda m: (red.stats_programs(m), m["SPLIT"]),
    )  # fmt: skip


def bind_finalize(
    red, tensors: dict, num_partials: int, *, update: bool, partial_strides: tuple[int, int],
    eps: float = 0.0, momentum: float = 0.0,
) -> Launch:  # fmt: skip
    """The finalize kernel: ``num_partials`` partials combined in order; running statistics
    updated when ``update`` (one program walks every row of its groups)."""
    grid, blocks = red.finalize_grid(ordered_rows=update)
    return bind(
        _FINALIZE, red, tensors, dict(
            num_partials=num_partials, partial_stride_k=partial_strides[0],
            partial_stride_p=partial_strides[1], rows=red.rows, C=red.view.C, K=red.group_size,
            momentum=momentum, eps=eps, **blocks,
        ), grid=grid,
    )  # fmt: skip
