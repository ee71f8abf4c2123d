"""Small ``@triton.jit`` helpers shared by the kernels: tile addressing, reductions over the
normalised axes, Chan's combination of (count, mean, M2) and the inverse standard deviation.

Every kernel sees its tensor as a strided (N, C, S) view (S = flattened spatial axes). Tiles are
[BLOCK_N, BLOCK_C, BLOCK_S]; statistics are kept per channel (BN: reduce N and S) or per
(instance, channel) (IN, ``PER_INSTANCE``: reduce S only).
"""

import triton
import triton.language as tl


@triton.jit
def tile_offsets(
    n0, c0, s0, N, C, S,
    stride_n, stride_c, stride_s,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,
):  # fmt: skip
    """Element offsets and the in-bounds mask of the tile starting at (n0, c0, s0). Offsets are
    int32 unless the tensor spans 2**30 elements or more (``INDEX_64``): per-element int64 offsets
    take twice the registers, and made the on-chip (fused) kernels spill."""
    n = n0 + tl.arange(0, BLOCK_N)
    c = c0 + tl.arange(0, BLOCK_C)
    s = s0 + tl.arange(0, BLOCK_S)
    mask = (n < N)[:, None, None] & (c < C)[None, :, None] & (s < S)[None, None, :]
    if INDEX_64:
        n = n.to(tl.int64)
        c = c.to(tl.int64)
        s = s.to(tl.int64)
    offsets = (
        (n * stride_n)[:, None, None]
        + (c * stride_c)[None, :, None]
        + (s * stride_s)[None, None, :]
    )
    return offsets, mask


@triton.jit
def load_tile(
    ptr, n0, c0, s0, N, C, S,
    stride_n, stride_c, stride_s,
    dtype: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,
):  # fmt: skip
    """The tile at (n0, c0, s0) converted to ``dtype`` (0 outside the tensor), with its offsets
    and mask."""
    offsets, mask = tile_offsets(
        n0, c0, s0, N, C, S, stride_n, stride_c, stride_s, BLOCK_N, BLOCK_C, BLOCK_S, INDEX_64
    )
    values = tl.load(ptr + offsets, mask=mask, other=0.0).to(dtype)
    return values, offsets, mask


@triton.jit
def group_offsets(n0, c0, N, C, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets and mask of a [BLOCK_G, BLOCK_C] block of a (G, C) per-group vector."""
    g = n0 + tl.arange(0, BLOCK_G)
    c = c0 + tl.arange(0, BLOCK_C)
    return g[:, None] * C + c[None, :], (g < N)[:, None] & (c < C)[None, :]


@triton.jit
def reduce_tile(values, PER_INSTANCE: tl.constexpr):
    """Sum a [BLOCK_N, BLOCK_C, BLOCK_S] tile over the normalised axes: S for IN (-> [BLOCK_N,
    BLOCK_C]); N and S for BN (-> [1, BLOCK_C])."""
    per_row = tl.sum(values, axis=2)
    if PER_INSTANCE:
        return per_row
    else:
        return tl.sum(per_row, axis=0, keep_dims=True)


@triton.jit
def chan_combine(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s parallel combination of two (count, mean, M2) summaries. Exact for any
    offset: no E[x^2] - E[x]^2 cancellation. Empty summaries (count 0) are neutral."""
    count = count_a + count_b
    frac_b = count_b / tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * frac_b
    m2 = m2_a + m2_b + delta * delta * count_a * frac_b
    return count, mean, m2


@triton.jit
def tile_summary(x, mask, count, PER_INSTANCE: tl.constexpr):
    """(mean, M2) of a tile's valid elements over the normalised axes, given their count.
    Two passes over registers, one over memory."""
    mean = reduce_tile(x, PER_INSTANCE) / tl.maximum(count, 1.0)
    centred = tl.where(mask, x - mean[:, :, None], 0.0)
    return mean, reduce_tile(centred * centred, PER_INSTANCE)


@triton.jit
def inverse_std(count, m2, eps):
    """1 / sqrt(biased variance + eps), correctly rounded (fp32's default ops are approximate;
    fp64's are exact)."""
    var = m2 / tl.maximum(count, 1.0)
    if var.dtype == tl.float64:
        return 1.0 / tl.sqrt(var + eps)
    else:
        return tl.div_rn(tl.full(var.shape, 1.0, var.dtype), tl.sqrt_rn(var + eps))
