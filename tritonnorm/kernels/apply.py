"""The elementwise pass: out = k_x * (x - mu) + k_dy * dy + k_c with per-(sample, channel)
coefficients. It writes y in the forward (k_x = rstd * w, k_c = b) and dx in the backward, so
forward and backward share one streaming kernel, and it knows nothing of how the statistics were
grouped: the coefficients' sample stride is 0 when one row serves the whole batch (BatchNorm,
running statistics) and C when each sample has its own (InstanceNorm, GroupNorm).

With ``EPILOGUE`` the forward writes act(y * scale[n, c] + shift[n, c] + residual), and the
backward first turns dy into the gradient of x_hat * w + b, recomputing the pre-activation from x
and the forward coefficients (common.epilogue_output_grad), and writes the residual's gradient."""

import triton
import triton.language as tl

from .common import (
    K_C,
    K_DY,
    K_X,
    MU,
    activation,
    epilogue,
    epilogue_grad,
    epilogue_output_grad,
    load_coefficient,
    load_tile,
    pre_activation,
    tile_offsets,
)


@triton.jit
def _norm_apply_kernel(
    x_ptr,  # input, viewed as (N, C, S); read when HAS_X
    dy_ptr,  # output gradient with its own strides; read when HAS_DY
    out_ptr,  # y or dx, same strides as x
    coef_ptr,  # (4, rows, C) coefficients (named slots, common.py)
    N, C, S,
    stride_n, stride_c, stride_s,  # strides of x and out
    dy_stride_n, dy_stride_c, dy_stride_s,
    coef_stride_n,  # 0 (one row of coefficients for every sample) or C
    coef_stride_slot,  # rows * C
    scale_ptr, shift_ptr,  # (N, C) contiguous per-sample scale and shift, or None (EPILOGUE)
    res_ptr,  # residual with its own strides, or None (EPILOGUE)
    res_stride_n, res_stride_c, res_stride_s,
    fwd_coef_ptr,  # (4, rows, C) forward coefficients, to recompute z in the backward, or None
    dres_ptr,  # residual gradient, same strides as x, or None (EPILOGUE backward)
    slope: tl.float64,  # leaky_relu's negative slope
    HAS_X: tl.constexpr,
    HAS_DY: tl.constexpr,
    EPILOGUE: tl.constexpr,  # scale/shift, residual or activation present
    ACTIVATION: tl.constexpr,  # activation code (common.py), 0 for none
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,  # int64 element offsets (a tensor spans 2**30 elements or more)
    Z_FROM_OUTPUT: tl.constexpr = False,  # res_ptr holds the output y (grad.py)
):  # fmt: skip
    # Tiles are the reductions' 4-D tiles with one channel per group: [BLOCK_N, BLOCK_C, 1, S].
    pid = tl.program_id(0)
    num_s_blocks = tl.cdiv(S, BLOCK_S)
    num_c_blocks = tl.cdiv(C, BLOCK_C)
    s0 = (pid % num_s_blocks) * BLOCK_S
    c0 = ((pid // num_s_blocks) % num_c_blocks) * BLOCK_C
    n0 = (pid // (num_s_blocks * num_c_blocks)) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    c = c0 + tl.arange(0, BLOCK_C)
    coefs = ((n * coef_stride_n)[:, None] + c[None, :])[:, :, None, None]
    coefs_mask = ((n < N)[:, None] & (c < C)[None, :])[:, :, None, None]
    dtype = coef_ptr.dtype.element_ty
    k_c = load_coefficient(coef_ptr, K_C, coefs, coefs_mask, coef_stride_slot)
    offsets, mask = tile_offsets(
        n0, c0, s0, N, C, S, 1, stride_n, stride_c, stride_s,
        BLOCK_N, BLOCK_C, 1, BLOCK_S, INDEX_64,
    )  # fmt: skip
    if HAS_DY:
        dy, _, _ = load_tile(
            dy_ptr, n0, c0, s0, N, C, S, 1, dy_stride_n, dy_stride_c, dy_stride_s, dtype,
            BLOCK_N, BLOCK_C, 1, BLOCK_S, INDEX_64,
        )  # fmt: skip
        k_dy = load_coefficient(coef_ptr, K_DY, coefs, coefs_mask, coef_stride_slot)
    if HAS_X:
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(dtype)  # x's offsets are out's
        mu = load_coefficient(coef_ptr, MU, coefs, coefs_mask, coef_stride_slot)
        k_x = load_coefficient(coef_ptr, K_X, coefs, coefs_mask, coef_stride_slot)
        if HAS_DY:
            if EPILOGUE:
                f_mu, f_k_x, f_k_c = mu, k_x, k_c
                if fwd_coef_ptr is not None:
                    f_mu = load_coefficient(fwd_coef_ptr, MU, coefs, coefs_mask, coef_stride_slot)
                    f_k_x = load_coefficient(fwd_coef_ptr, K_X, coefs, coefs_mask, coef_stride_slot)
                    f_k_c = load_coefficient(fwd_coef_ptr, K_C, coefs, coefs_mask, coef_stride_slot)
                g, dy = epilogue_output_grad(
                    x, dy, f_mu, f_k_x, f_k_c, scale_ptr, shift_ptr, res_ptr, n0, c0, s0,
                    N, C, S, 1, res_stride_n, res_stride_c, res_stride_s, slope, ACTIVATION,
                    Z_FROM_OUTPUT, BLOCK_N, BLOCK_C, 1, BLOCK_S, INDEX_64,
                )  # fmt: skip
                if dres_ptr is not None:
                    tl.store(dres_ptr + offsets, g.to(dres_ptr.dtype.element_ty), mask=mask)
            out = epilogue_grad(x, dy, mu, k_x, k_dy, k_c)
        else:
            out = epilogue(x, mu, k_x, k_c)
            if EPILOGUE:
                z = pre_activation(
                    out, scale_ptr, shift_ptr, res_ptr, n0, c0, s0, N, C, S, 1,
                    res_stride_n, res_stride_c, res_stride_s, BLOCK_N, BLOCK_C, 1, BLOCK_S,
                    INDEX_64,
                )  # fmt: skip
                out = activation(z, slope, ACTIVATION)
    else:  # dx with constant (running) statistics: k_x = 0, so x is not read
        out = k_dy * dy + k_c
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
