"""The elementwise pass: out = k_x * (x - mu) + k_dy * dy + k_c with per-group coefficients.
It writes y in the forward (k_x = rstd * w, k_c = b) and dx in the backward, so forward and
backward share one streaming kernel. Centring x before scaling keeps large offsets exact."""

import triton
import triton.language as tl

from .common import group_offsets, load_tile, tile_offsets


@triton.jit
def _norm_apply_kernel(
    x_ptr,  # input, viewed as (N, C, S); read when HAS_X
    dy_ptr,  # output gradient with its own strides; read when HAS_DY
    out_ptr,  # y or dx, same strides as x
    coef_ptr,  # (4, G, C) mu, k_x, k_dy, k_c; G = N if PER_INSTANCE else 1
    N, C, S,
    stride_n, stride_c, stride_s,  # strides of x and out
    dy_stride_n, dy_stride_c, dy_stride_s,
    PER_INSTANCE: tl.constexpr,
    HAS_X: tl.constexpr,
    HAS_DY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,  # int64 element offsets (a tensor spans 2**30 elements or more)
):  # fmt: skip
    pid = tl.program_id(0)
    num_s_blocks = tl.cdiv(S, BLOCK_S)
    num_c_blocks = tl.cdiv(C, BLOCK_C)
    s0 = (pid % num_s_blocks) * BLOCK_S
    c0 = ((pid // num_s_blocks) % num_c_blocks) * BLOCK_C
    n0 = (pid // (num_s_blocks * num_c_blocks)) * BLOCK_N
    G_ROWS: tl.constexpr = BLOCK_N if PER_INSTANCE else 1
    GC = (N if PER_INSTANCE else 1) * C
    coefs, coef_mask = group_offsets(
        n0 if PER_INSTANCE else 0, c0, N if PER_INSTANCE else 1, C, G_ROWS, BLOCK_C
    )
    coef_dtype = coef_ptr.dtype.element_ty
    k_c = tl.load(coef_ptr + 3 * GC + coefs, mask=coef_mask, other=0.0)[:, :, None]
    offsets, mask = tile_offsets(
        n0, c0, s0, N, C, S, stride_n, stride_c, stride_s, BLOCK_N, BLOCK_C, BLOCK_S, INDEX_64
    )
    out = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], coef_dtype) + k_c
    if HAS_X:
        mu = tl.load(coef_ptr + coefs, mask=coef_mask, other=0.0)[:, :, None]
        k_x = tl.load(coef_ptr + GC + coefs, mask=coef_mask, other=0.0)[:, :, None]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(coef_dtype)  # x's offsets: out's
        out += k_x * (x - mu)
    if HAS_DY:
        k_dy = tl.load(coef_ptr + 2 * GC + coefs, mask=coef_mask, other=0.0)[:, :, None]
        dy, _, _ = load_tile(
            dy_ptr, n0, c0, s0, N, C, S, dy_stride_n, dy_stride_c, dy_stride_s, coef_dtype,
            BLOCK_N, BLOCK_C, BLOCK_S, INDEX_64,
        )  # fmt: skip
        out += k_dy * dy
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
