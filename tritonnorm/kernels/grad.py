"""Backward reductions: split partial sums of dy and dy * x_hat per channel or instance, and the
second stage that combines them into dweight, dbias and the coefficients of the dx pass."""

import triton
import triton.language as tl

from .common import group_offsets, load_tile, reduce_tile


@triton.jit
def _grad_tile(
    x_ptr, dy_ptr, n0, c0, s0, N, C, S,
    stride_n, stride_c, stride_s,
    dy_stride_n, dy_stride_c, dy_stride_s,
    mean, rstd,  # [G_ROWS, BLOCK_C, 1] statistics of the tile's groups
    acc_dtype: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,
):  # fmt: skip
    """x_hat and dy of the tile at (n0, c0, s0), 0 outside the tensor; x's offsets and mask."""
    x, offsets, mask = load_tile(
        x_ptr, n0, c0, s0, N, C, S, stride_n, stride_c, stride_s, acc_dtype,
        BLOCK_N, BLOCK_C, BLOCK_S, INDEX_64,
    )  # fmt: skip
    dy, _, _ = load_tile(
        dy_ptr, n0, c0, s0, N, C, S, dy_stride_n, dy_stride_c, dy_stride_s, acc_dtype,
        BLOCK_N, BLOCK_C, BLOCK_S, INDEX_64,
    )  # fmt: skip
    x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
    return x_hat, dy, offsets, mask


@triton.jit
def _norm_grad_partial_kernel(
    x_ptr,  # input, viewed as (N, C, S)
    dy_ptr,  # output gradient, (N, C, S) with its own strides
    dx_ptr,  # input gradient, same strides as x; written only when FUSED
    mean_ptr, rstd_ptr,  # (G, C) statistics used by the forward
    weight_ptr,  # (C,) or None; read only when FUSED
    partial_ptr,  # (2, SPLIT, G, C) sum(dy), sum(dy * x_hat)
    N, C, S,
    stride_n, stride_c, stride_s,  # strides of x (and dx)
    dy_stride_n, dy_stride_c, dy_stride_s,
    partial_stride_k, partial_stride_p,
    PER_INSTANCE: tl.constexpr,
    FUSED: tl.constexpr,  # whole reduction in this tile: write dx from registers
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,  # int64 element offsets (a tensor spans 2**30 elements or more)
):  # fmt: skip
    acc_dtype = partial_ptr.dtype.element_ty
    G_ROWS: tl.constexpr = BLOCK_N if PER_INSTANCE else 1
    pid_group = tl.program_id(0)
    pid_split = tl.program_id(1)
    num_c_blocks = tl.cdiv(C, BLOCK_C)
    c0 = (pid_group % num_c_blocks) * BLOCK_C
    n_first = (pid_group // num_c_blocks) * BLOCK_N if PER_INSTANCE else 0
    num_s_tiles = tl.cdiv(S, BLOCK_S)
    stats, stats_mask = group_offsets(n_first, c0, N if PER_INSTANCE else 1, C, G_ROWS, BLOCK_C)
    mean = tl.load(mean_ptr + stats, mask=stats_mask, other=0.0)[:, :, None]
    rstd = tl.load(rstd_ptr + stats, mask=stats_mask, other=0.0)[:, :, None]

    if FUSED:
        x_hat, dy, offsets, mask = _grad_tile(
            x_ptr, dy_ptr, n_first, c0, 0, N, C, S, stride_n, stride_c, stride_s,
            dy_stride_n, dy_stride_c, dy_stride_s, mean, rstd, acc_dtype,
            BLOCK_N, BLOCK_C, BLOCK_S, INDEX_64,
        )  # fmt: skip
        sum_dy = reduce_tile(dy, PER_INSTANCE)
        sum_dy_xhat = reduce_tile(dy * x_hat, PER_INSTANCE)
        count = tl.zeros([G_ROWS, BLOCK_C], acc_dtype) + (S if PER_INSTANCE else N * S)
        scale = rstd
        if weight_ptr is not None:
            c = c0 + tl.arange(0, BLOCK_C)
            scale *= tl.load(weight_ptr + c, mask=c < C, other=0.0).to(acc_dtype)[None, :, None]
        mean_dy = (sum_dy / count)[:, :, None]
        mean_dy_xhat = (sum_dy_xhat / count)[:, :, None]
        dx = scale * (dy - mean_dy - x_hat * mean_dy_xhat)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        num_tiles = num_s_tiles if PER_INSTANCE else tl.cdiv(N, BLOCK_N) * num_s_tiles
        tiles_per_split = tl.cdiv(num_tiles, SPLIT)
        t_begin = pid_split * tiles_per_split
        t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
        sum_dy = tl.zeros([G_ROWS, BLOCK_C], acc_dtype)
        sum_dy_xhat = tl.zeros([G_ROWS, BLOCK_C], acc_dtype)
        for t in range(t_begin, t_end):
            n0 = n_first + (t // num_s_tiles) * BLOCK_N
            s0 = (t % num_s_tiles) * BLOCK_S
            x_hat, dy, _, _ = _grad_tile(
                x_ptr, dy_ptr, n0, c0, s0, N, C, S, stride_n, stride_c, stride_s,
                dy_stride_n, dy_stride_c, dy_stride_s, mean, rstd, acc_dtype,
                BLOCK_N, BLOCK_C, BLOCK_S, INDEX_64,
            )  # fmt: skip
            sum_dy += reduce_tile(dy, PER_INSTANCE)
            sum_dy_xhat += reduce_tile(dy * x_hat, PER_INSTANCE)

    stats += pid_split * partial_stride_p
    tl.store(partial_ptr + stats, sum_dy, mask=stats_mask)
    tl.store(partial_ptr + partial_stride_k + stats, sum_dy_xhat, mask=stats_mask)


@triton.jit
def _norm_grad_finalize_kernel(
    partial_ptr,  # (2, P, G, C) sum(dy), sum(dy * x_hat), summed in order p = 0..P-1
    num_partials,  # P (0: no sums needed, eval-mode dx only)
    partial_stride_k, partial_stride_p,
    mean_ptr, rstd_ptr,  # (G, C) forward statistics
    weight_ptr,  # (C,) or None
    dweight_ptr, dbias_ptr,  # (C,) outputs (sums over the G groups), or None
    coef_ptr,  # (4, G, C) dx coefficients (mu, k_x, k_dy, k_c), or None
    G, C,
    count,  # elements per group (an integer: exact in the statistics' dtype)
    USE_INPUT_STATS: tl.constexpr,  # training formula (the statistics depend on x)
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc_dtype = rstd_ptr.dtype.element_ty
    weight = tl.full([BLOCK_C], 1.0, acc_dtype)
    if weight_ptr is not None:
        weight = tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(acc_dtype)
    dweight = tl.zeros([BLOCK_C], acc_dtype)
    dbias = tl.zeros([BLOCK_C], acc_dtype)
    GC = G * C
    inv_count = 1.0 / tl.full([BLOCK_C], count, acc_dtype)
    for g in range(G):
        sum_dy = tl.zeros([BLOCK_C], acc_dtype)
        sum_dy_xhat = tl.zeros([BLOCK_C], acc_dtype)
        for p in range(num_partials):
            part = partial_ptr + p * partial_stride_p + g * C + c
            sum_dy += tl.load(part, mask=c_mask, other=0.0)
            sum_dy_xhat += tl.load(part + partial_stride_k, mask=c_mask, other=0.0)
        dweight += sum_dy_xhat
        dbias += sum_dy
        if coef_ptr is not None:
            mean = tl.load(mean_ptr + g * C + c, mask=c_mask, other=0.0)
            rstd = tl.load(rstd_ptr + g * C + c, mask=c_mask, other=0.0)
            k_dy = weight * rstd
            # dx = k_dy * (dy - mean(dy) - x_hat * mean(dy * x_hat)), x_hat = (x - mu) * rstd
            k_x = tl.zeros([BLOCK_C], acc_dtype)
            k_c = tl.zeros([BLOCK_C], acc_dtype)
            if USE_INPUT_STATS:
                k_x = -k_dy * rstd * sum_dy_xhat * inv_count
                k_c = -k_dy * sum_dy * inv_count
            tl.store(coef_ptr + g * C + c, mean, mask=c_mask)
            tl.store(coef_ptr + GC + g * C + c, k_x, mask=c_mask)
            tl.store(coef_ptr + 2 * GC + g * C + c, k_dy, mask=c_mask)
            tl.store(coef_ptr + 3 * GC + g * C + c, k_c, mask=c_mask)
    if dweight_ptr is not None:
        tl.store(dweight_ptr + c, dweight.to(dweight_ptr.dtype.element_ty), mask=c_mask)
    if dbias_ptr is not None:
        tl.store(dbias_ptr + c, dbias.to(dbias_ptr.dtype.element_ty), mask=c_mask)
