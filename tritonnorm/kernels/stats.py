"""Forward statistics: split partial (count, mean, M2) per channel or instance, and the small
deterministic second stage that combines them, updates the running statistics and produces the
per-group coefficients of the apply pass."""

import triton
import triton.language as tl

from .common import chan_combine, group_offsets, inverse_std, load_tile, tile_summary


@triton.jit
def _norm_stats_partial_kernel(
    x_ptr,  # input, viewed as (N, C, S)
    y_ptr,  # output, same strides as x; written only when FUSED
    weight_ptr,  # (C,) or None; read only when FUSED
    bias_ptr,  # (C,) or None; read only when FUSED
    partial_ptr,  # (3, SPLIT, G, C) count, mean, M2; G = N if PER_INSTANCE else 1
    N, C, S,
    stride_n, stride_c, stride_s,  # strides of x (and y)
    partial_stride_k, partial_stride_p,  # strides of the partials' first two axes
    eps,
    PER_INSTANCE: tl.constexpr,  # statistics per (n, c) (IN) rather than per c (BN)
    FUSED: tl.constexpr,  # the whole reduction is this tile: normalise in registers, write y
    SPLIT: tl.constexpr,  # programs sharing one group's reduction
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,  # int64 element offsets (the tensor spans 2**30 elements or more)
):  # fmt: skip
    acc_dtype = partial_ptr.dtype.element_ty
    G_ROWS: tl.constexpr = BLOCK_N if PER_INSTANCE else 1
    pid_group = tl.program_id(0)
    pid_split = tl.program_id(1)
    num_c_blocks = tl.cdiv(C, BLOCK_C)
    c0 = (pid_group % num_c_blocks) * BLOCK_C
    n_first = (pid_group // num_c_blocks) * BLOCK_N if PER_INSTANCE else 0
    num_s_tiles = tl.cdiv(S, BLOCK_S)

    if FUSED:
        x, offsets, mask = load_tile(
            x_ptr, n_first, c0, 0, N, C, S, stride_n, stride_c, stride_s, acc_dtype,
            BLOCK_N, BLOCK_C, BLOCK_S, INDEX_64,
        )  # fmt: skip
        count = tl.zeros([G_ROWS, BLOCK_C], acc_dtype) + (S if PER_INSTANCE else N * S)
        mean, m2 = tile_summary(x, mask, count, PER_INSTANCE)
        scale = inverse_std(count, m2, eps)
        c = c0 + tl.arange(0, BLOCK_C)
        if weight_ptr is not None:
            scale *= tl.load(weight_ptr + c, mask=c < C, other=0.0).to(acc_dtype)[None, :]
        y = (x - mean[:, :, None]) * scale[:, :, None]
        if bias_ptr is not None:
            y += tl.load(bias_ptr + c, mask=c < C, other=0.0).to(acc_dtype)[None, :, None]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        num_tiles = num_s_tiles if PER_INSTANCE else tl.cdiv(N, BLOCK_N) * num_s_tiles
        tiles_per_split = tl.cdiv(num_tiles, SPLIT)
        t_begin = pid_split * tiles_per_split
        t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
        count = tl.zeros([G_ROWS, BLOCK_C], acc_dtype)
        mean = tl.zeros([G_ROWS, BLOCK_C], acc_dtype)
        m2 = tl.zeros([G_ROWS, BLOCK_C], acc_dtype)
        for t in range(t_begin, t_end):
            n0 = n_first + (t // num_s_tiles) * BLOCK_N
            s0 = (t % num_s_tiles) * BLOCK_S
            x, _, mask = load_tile(
                x_ptr, n0, c0, s0, N, C, S, stride_n, stride_c, stride_s, acc_dtype,
                BLOCK_N, BLOCK_C, BLOCK_S, INDEX_64,
            )  # fmt: skip
            valid_s = tl.minimum(S - s0, BLOCK_S)
            tile_count = valid_s if PER_INSTANCE else tl.minimum(N - n0, BLOCK_N) * valid_s
            tile_count = tl.zeros([G_ROWS, BLOCK_C], acc_dtype) + tile_count
            tile_mean, tile_m2 = tile_summary(x, mask, tile_count, PER_INSTANCE)
            count, mean, m2 = chan_combine(count, mean, m2, tile_count, tile_mean, tile_m2)

    out, out_mask = group_offsets(n_first, c0, N if PER_INSTANCE else 1, C, G_ROWS, BLOCK_C)
    out += pid_split * partial_stride_p
    tl.store(partial_ptr + out, count, mask=out_mask)
    tl.store(partial_ptr + partial_stride_k + out, mean, mask=out_mask)
    tl.store(partial_ptr + 2 * partial_stride_k + out, m2, mask=out_mask)


@triton.jit
def _norm_stats_finalize_kernel(
    partial_ptr,  # (3, P, G, C) count, mean, M2 partials, combined in order p = 0..P-1
    num_partials,  # P
    partial_stride_k, partial_stride_p,
    combined_ptr,  # (3, G, C) combined count, mean, M2, or None
    mean_ptr,  # (G, C) saved mean, or None
    rstd_ptr,  # (G, C) saved 1/sqrt(var + eps), or None
    coef_ptr,  # (4, G, C) apply coefficients (mu, k_x, k_dy, k_c), or None
    weight_ptr, bias_ptr,  # (C,) or None
    running_mean_ptr, running_var_ptr,  # (C,) or None: the running statistics read
    new_running_mean_ptr, new_running_var_ptr,  # (C,): where the updated ones are written
    G, C,
    momentum, eps,
    FROM_RUNNING: tl.constexpr,  # eval: statistics are the running ones, no partials
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc_dtype = mean_ptr.dtype.element_ty if FROM_RUNNING else partial_ptr.dtype.element_ty
    weight = tl.full([BLOCK_C], 1.0, acc_dtype)
    if weight_ptr is not None:
        weight = tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(acc_dtype)
    bias = tl.zeros([BLOCK_C], acc_dtype)
    if bias_ptr is not None:
        bias = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)
    GC = G * C
    if FROM_RUNNING:
        mean = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)
        var = tl.load(running_var_ptr + c, mask=c_mask, other=1.0).to(acc_dtype)
        rstd = inverse_std(tl.full([BLOCK_C], 1.0, acc_dtype), var, eps)
        tl.store(mean_ptr + c, mean, mask=c_mask)
        tl.store(rstd_ptr + c, rstd, mask=c_mask)
        tl.store(coef_ptr + c, mean, mask=c_mask)
        tl.store(coef_ptr + GC + c, rstd * weight, mask=c_mask)
        tl.store(coef_ptr + 2 * GC + c, tl.zeros([BLOCK_C], acc_dtype), mask=c_mask)
        tl.store(coef_ptr + 3 * GC + c, bias, mask=c_mask)
    else:
        sum_mean = tl.zeros([BLOCK_C], acc_dtype)
        sum_unbiased_var = tl.zeros([BLOCK_C], acc_dtype)
        for g in range(G):
            count = tl.zeros([BLOCK_C], acc_dtype)
            mean = tl.zeros([BLOCK_C], acc_dtype)
            m2 = tl.zeros([BLOCK_C], acc_dtype)
            for p in range(num_partials):
                part = partial_ptr + p * partial_stride_p + g * C + c
                count, mean, m2 = chan_combine(
                    count, mean, m2,
                    tl.load(part, mask=c_mask, other=0.0),
                    tl.load(part + partial_stride_k, mask=c_mask, other=0.0),
                    tl.load(part + 2 * partial_stride_k, mask=c_mask, other=0.0),
                )  # fmt: skip
            if combined_ptr is not None:
                tl.store(combined_ptr + g * C + c, count, mask=c_mask)
                tl.store(combined_ptr + GC + g * C + c, mean, mask=c_mask)
                tl.store(combined_ptr + 2 * GC + g * C + c, m2, mask=c_mask)
            if mean_ptr is not None:
                rstd = inverse_std(count, m2, eps)
                tl.store(mean_ptr + g * C + c, mean, mask=c_mask)
                tl.store(rstd_ptr + g * C + c, rstd, mask=c_mask)
                tl.store(coef_ptr + g * C + c, mean, mask=c_mask)
                tl.store(coef_ptr + GC + g * C + c, rstd * weight, mask=c_mask)
                tl.store(coef_ptr + 2 * GC + g * C + c, tl.zeros([BLOCK_C], acc_dtype), mask=c_mask)
                tl.store(coef_ptr + 3 * GC + g * C + c, bias, mask=c_mask)
            sum_mean += mean
            sum_unbiased_var += m2 / tl.maximum(count - 1.0, 1.0)
        if running_mean_ptr is not None:
            # IN averages its instances' statistics over the batch, as torch does.
            running_mean = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)
            running_var = tl.load(running_var_ptr + c, mask=c_mask, other=0.0).to(acc_dtype)
            running_mean = (1.0 - momentum) * running_mean + momentum * (sum_mean / G)
            running_var = (1.0 - momentum) * running_var + momentum * (sum_unbiased_var / G)
            out_dtype = new_running_mean_ptr.dtype.element_ty
            tl.store(new_running_mean_ptr + c, running_mean.to(out_dtype), mask=c_mask)
            tl.store(new_running_var_ptr + c, running_var.to(out_dtype), mask=c_mask)
