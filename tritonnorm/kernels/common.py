"""Small ``@triton.jit`` helpers shared by the kernels: tile addressing, reductions over the
normalised axes, Chan's combination of (count, mean, M2), and the one home of each formula
(forward coefficients, gradient coefficients, the elementwise epilogue) that the on-chip (fused)
and the streamed paths both use.

Every reduction kernel sees its tensor as a strided (N, C, S) view (S = flattened spatial axes)
whose C channels form groups of K consecutive channels that share a statistic: K = 1 for
BatchNorm and InstanceNorm, C / num_groups for GroupNorm. Tiles are 4-D,
[BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S] = (samples, groups, channels of a group, positions), so a
program always holds whole groups. A reduction sums over (K, S), and over N too when the batch
axis is reduced (BatchNorm). The elementwise apply pass needs no groups: it reads per-(n, c)
coefficients.

The fused epilogue y = act(u * scale[n, c] + shift[n, c] + residual), u = x_hat * w + b, has one
home too: ``pre_activation`` and ``activation`` where y is written, ``epilogue_output_grad``
(recomputing z from x) wherever the backward needs g = dy * act'(z) or du = g * scale.
"""

import triton
import triton.language as tl

# Slots of the (4, rows, C) coefficient block: out = K_X * (x - MU) + K_DY * dy + K_C.
MU = tl.constexpr(0)
K_X = tl.constexpr(1)
K_DY = tl.constexpr(2)
K_C = tl.constexpr(3)


@triton.jit
def group_channels(g0, K, C, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_G, BLOCK_K] channel indices c = g * K + k of the groups starting at g0, and their
    mask (k < K pads a group to a power of two; c < C ends the last block)."""
    g = g0 + tl.arange(0, BLOCK_G)
    k = tl.arange(0, BLOCK_K)
    c = g[:, None] * K + k[None, :]
    return c, (k < K)[None, :] & (c < C)


@triton.jit
def tile_offsets(
    n0, g0, s0, N, C, S, K,
    stride_n, stride_c, stride_s,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,
):  # fmt: skip
    """Element offsets and in-bounds mask of the [BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S] tile at
    sample n0, group g0, position s0. Offsets are int32 unless the tensor spans 2**30 elements
    or more (``INDEX_64``): per-element int64 offsets take twice the registers, and made the
    on-chip (fused) kernels spill."""
    n = n0 + tl.arange(0, BLOCK_N)
    c, c_mask = group_channels(g0, K, C, BLOCK_G, BLOCK_K)
    s = s0 + tl.arange(0, BLOCK_S)
    mask = (n < N)[:, None, None, None] & c_mask[None, :, :, None] & (s < S)[None, None, None, :]
    if INDEX_64:
        n = n.to(tl.int64)
        c = c.to(tl.int64)
        s = s.to(tl.int64)
    offsets = (
        (n * stride_n)[:, None, None, None]
        + (c * stride_c)[None, :, :, None]
        + (s * stride_s)[None, None, None, :]
    )
    return offsets, mask


@triton.jit
def load_tile(
    ptr, n0, g0, s0, N, C, S, K,
    stride_n, stride_c, stride_s,
    dtype: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,
):  # fmt: skip
    """The tile at (n0, g0, s0) converted to ``dtype`` (0 outside the tensor), its offsets and
    mask."""
    offsets, mask = tile_offsets(
        n0, g0, s0, N, C, S, K, stride_n, stride_c, stride_s,
        BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S, INDEX_64,
    )  # fmt: skip
    values = tl.load(ptr + offsets, mask=mask, other=0.0).to(dtype)
    return values, offsets, mask


@triton.jit
def channel_values(ptr, g0, K, C, default, dtype: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_K: tl.constexpr):  # fmt: skip
    """A per-channel vector (weight, bias) as [1, BLOCK_G, BLOCK_K]; ``default`` when ptr is
    None or outside C."""
    c, c_mask = group_channels(g0, K, C, BLOCK_G, BLOCK_K)
    if ptr is None:
        values = tl.zeros([BLOCK_G, BLOCK_K], dtype) + default
    else:
        values = tl.load(ptr + c, mask=c_mask, other=default).to(dtype)
    return values[None, :, :]


@triton.jit
def stat_offsets(r0, g0, rows, groups, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """Offsets and mask of a [BLOCK_R, BLOCK_G] block of a (rows, groups) statistics array."""
    r = r0 + tl.arange(0, BLOCK_R)
    g = g0 + tl.arange(0, BLOCK_G)
    return r[:, None] * groups + g[None, :], (r < rows)[:, None] & (g < groups)[None, :]


@triton.jit
def channel_offsets(r0, g0, rows, K, C, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
                    BLOCK_K: tl.constexpr):  # fmt: skip
    """Offsets and mask of a [BLOCK_R, BLOCK_G, BLOCK_K] block of a (rows, C) per-channel array
    (coefficients, gradient sums), channels grouped as the tiles are."""
    r = r0 + tl.arange(0, BLOCK_R)
    c, c_mask = group_channels(g0, K, C, BLOCK_G, BLOCK_K)
    return r[:, None, None] * C + c[None, :, :], (r < rows)[:, None, None] & c_mask[None, :, :]


@triton.jit
def reduce_tile(values, REDUCE_BATCH: tl.constexpr):
    """Sum a [BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S] tile over its positions and a group's channels
    (-> [BLOCK_N, BLOCK_G]), and over the samples too when the batch axis is reduced
    (-> [1, BLOCK_G])."""
    per_group = tl.sum(tl.sum(values, axis=3), axis=2)
    if REDUCE_BATCH:
        return tl.sum(per_group, axis=0, keep_dims=True)
    else:
        return per_group


@triton.jit
def reduce_positions(values, REDUCE_BATCH: tl.constexpr):
    """Per-channel sums of a tile: over positions (and samples when the batch axis is reduced),
    -> [BLOCK_N or 1, BLOCK_G, BLOCK_K]."""
    per_channel = tl.sum(values, axis=3)
    if REDUCE_BATCH:
        return tl.sum(per_channel, axis=0, keep_dims=True)
    else:
        return per_channel


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
def combine_partials(partial_ptr, num_partials, stride_k, stride_p, offsets, mask, count, mean,
                     m2):  # fmt: skip
    """(count, mean, M2) of ``num_partials`` partials of a (3, P, ...) array at ``offsets``,
    combined in order p = 0..P-1 onto the summary given (Chan): every reader of the same
    partials gets bitwise the same statistics."""
    for p in range(num_partials):
        part = partial_ptr + p * stride_p + offsets
        count, mean, m2 = chan_combine(
            count, mean, m2,
            tl.load(part, mask=mask, other=0.0),
            tl.load(part + stride_k, mask=mask, other=0.0),
            tl.load(part + 2 * stride_k, mask=mask, other=0.0),
        )  # fmt: skip
    return count, mean, m2


@triton.jit
def update_running(running_mean_ptr, running_var_ptr, out_mean_ptr, out_var_ptr, offsets, mask,
                   mean, unbiased_var, momentum):  # fmt: skip
    """running = (1 - momentum) running + momentum batch, for the mean and the unbiased
    variance, in the statistics' dtype (``momentum`` already cast to it: inverse_std), stored in
    the buffers' dtype at ``out_*`` (the buffers themselves when updated in place)."""
    dtype = mean.dtype
    running_mean = tl.load(running_mean_ptr + offsets, mask=mask, other=0.0).to(dtype)
    running_var = tl.load(running_var_ptr + offsets, mask=mask, other=0.0).to(dtype)
    running_mean = (1.0 - momentum) * running_mean + momentum * mean
    running_var = (1.0 - momentum) * running_var + momentum * unbiased_var
    tl.store(out_mean_ptr + offsets, running_mean.to(out_mean_ptr.dtype.element_ty), mask=mask)
    tl.store(out_var_ptr + offsets, running_var.to(out_var_ptr.dtype.element_ty), mask=mask)


@triton.jit
def tile_summary(x, mask, count, REDUCE_BATCH: tl.constexpr):
    """(mean, M2) of a tile's valid elements per statistic, given their count. Two passes over
    registers, one over memory."""
    mean = reduce_tile(x, REDUCE_BATCH) / tl.maximum(count, 1.0)
    centred = tl.where(mask, x - mean[:, :, None, None], 0.0)
    return mean, reduce_tile(centred * centred, REDUCE_BATCH)


@triton.jit
def lane_update(count, mean, m2, x, mask):
    """Welford's update of per-element (count, mean, M2) accumulators with one tile: every
    element of the tile is a lane of its own, so no value crosses threads until the end
    (lanes_summary)."""
    count += tl.where(mask, 1.0, 0.0)
    delta = tl.where(mask, x - mean, 0.0)
    mean += delta / tl.maximum(count, 1.0)
    m2 += delta * tl.where(mask, x - mean, 0.0)
    return count, mean, m2


@triton.jit
def lanes_summary(count, mean, m2, REDUCE_BATCH: tl.constexpr):
    """(count, mean, M2) per statistic from per-element accumulators, by the exact parallel
    combination M2 = sum_i (M2_i + n_i (mean_i - mean)^2): one reduction across the tile."""
    total = reduce_tile(count, REDUCE_BATCH)
    combined_mean = reduce_tile(count * mean, REDUCE_BATCH) / tl.maximum(total, 1.0)
    spread = mean - combined_mean[:, :, None, None]
    return total, combined_mean, reduce_tile(m2 + count * spread * spread, REDUCE_BATCH)


@triton.jit
def inverse_std(count, m2, eps):
    """1 / sqrt(biased variance + eps), correctly rounded (fp32's default ops are approximate;
    fp64's are exact).

    Float scalar arguments (``eps``, ``momentum``, ``slope``) are declared ``tl.float64``: Triton
    passes an undeclared float as float32, and float64 statistics showed the rounding on a GPU.
    Float32 math casts them down where they are used, so it is not promoted to float64. The cast
    is written out at each use, not in a helper: the interpreter rounds a Python float passed
    into a jit function to float32."""
    var = m2 / tl.maximum(count, 1.0)
    if var.dtype != tl.float64:
        eps = tl.cast(eps, var.dtype)
    if var.dtype == tl.float64:
        return 1.0 / tl.sqrt(var + eps)
    else:
        return tl.div_rn(tl.full(var.shape, 1.0, var.dtype), tl.sqrt_rn(var + eps))


@triton.jit
def forward_coefficients(mean, rstd, weight, bias):
    """Per-channel coefficients of y = k_x * (x - mu) + k_c from a group's statistics ([R, G, 1])
    and the channels' affine parameters ([1, G, K]): mu = mean, k_x = rstd * weight, k_c = bias."""
    k_x = rstd * weight
    return mean + tl.zeros_like(k_x), k_x, bias + tl.zeros_like(k_x)


@triton.jit
def grad_coefficients(rstd, weight, sum_dy, sum_dy_xhat, count, USE_INPUT_STATS: tl.constexpr):
    """Per-channel coefficients of dx = k_x * (x - mu) + k_dy * dy + k_c.

    With y = x_hat * w + b and x_hat = (x - mu) * rstd over a group of ``count`` elements:
    dx = rstd * (w dy - mean(w dy) - x_hat * mean(w dy x_hat)), the means over the group. The
    per-channel sums of dy and dy * x_hat ([R, G, K]) are weighted and summed over the group's
    channels here. Without input statistics (eval), mu and rstd are constants: dx = w rstd dy."""
    k_dy = weight * rstd
    k_x = tl.zeros_like(k_dy)
    k_c = tl.zeros_like(k_dy)
    if USE_INPUT_STATS:
        inv_count = 1.0 / (tl.zeros_like(rstd) + count)  # in the statistics' dtype
        mean_wdy = tl.sum(weight * sum_dy, axis=2, keep_dims=True) * inv_count
        mean_wdy_xhat = tl.sum(weight * sum_dy_xhat, axis=2, keep_dims=True) * inv_count
        k_x += -rstd * rstd * mean_wdy_xhat
        k_c += -rstd * mean_wdy
    return k_x, k_dy, k_c


@triton.jit
def normalized(x, mu, k_x, k_c):
    """The affine normalisation k_x * (x - mu) + k_c: y = x_hat * w + b in the forward, and
    with k_dy * dy added, dx in the backward. Centring before scaling keeps data with a large
    common offset exact."""
    return k_x * (x - mu) + k_c


@triton.jit
def affine_grad(partial_ptr, num_partials, partial_stride_k, partial_stride_p, dweight_ptr,
                dbias_ptr, c, c_mask, rows, C, dtype: tl.constexpr):  # fmt: skip
    """dweight[c] = sum(dy * x_hat), dbias[c] = sum(dy) over every row and partial of
    (2, P, rows, C) gradient sums, in a fixed order (rows, then partials)."""
    dweight = tl.zeros(c.shape, dtype)
    dbias = tl.zeros(c.shape, dtype)
    for r in range(rows):
        for p in range(num_partials):
            part = partial_ptr + p * partial_stride_p + r * C + c
            dbias += tl.load(part, mask=c_mask, other=0.0)
            dweight += tl.load(part + partial_stride_k, mask=c_mask, other=0.0)
    tl.store(dweight_ptr + c, dweight.to(dweight_ptr.dtype.element_ty), mask=c_mask)
    tl.store(dbias_ptr + c, dbias.to(dbias_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def store_coefficients(ptr, offsets, mask, slot_stride, mu, k_x, k_dy, k_c):
    """Write the four named slots of a (4, rows, C) coefficient block."""
    tl.store(ptr + MU * slot_stride + offsets, mu, mask=mask)
    tl.store(ptr + K_X * slot_stride + offsets, k_x, mask=mask)
    tl.store(ptr + K_DY * slot_stride + offsets, k_dy, mask=mask)
    tl.store(ptr + K_C * slot_stride + offsets, k_c, mask=mask)


@triton.jit
def load_coefficient(ptr, slot: tl.constexpr, offsets, mask, slot_stride):
    return tl.load(ptr + slot * slot_stride + offsets, mask=mask, other=0.0)


# ---------------------------------------------------------------------------------------------
# The fused epilogue: y = act((x_hat * w + b) * scale[n, c] + shift[n, c] + residual). Kernels
# take it behind an ``EPILOGUE`` constexpr flag, so without one they compile as before.

# Activation codes (``launch.ACTIVATIONS`` names them).
RELU = tl.constexpr(1)
LEAKY_RELU = tl.constexpr(2)
SILU = tl.constexpr(3)
GELU = tl.constexpr(4)
GELU_TANH = tl.constexpr(5)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(u):
    """tanh through exp (Triton 3.6-3.9 have no portable tanh); saturates to +-1 correctly."""
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def activation(z, slope, ACTIVATION: tl.constexpr):
    """act(z) for an activation code (0: identity); ``slope`` is leaky_relu's negative slope
    (a float64 scalar: inverse_std)."""
    if z.dtype != tl.float64:
        slope = tl.cast(slope, z.dtype)
    if ACTIVATION == RELU:
        out = tl.where(z > 0.0, z, 0.0)
    elif ACTIVATION == LEAKY_RELU:
        out = tl.where(z > 0.0, z, z * slope)
    elif ACTIVATION == SILU:
        out = z * _sigmoid(z)
    elif ACTIVATION == GELU:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == GELU_TANH:
        out = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    else:
        out = z
    return out


@triton.jit
def activation_grad(z, slope, ACTIVATION: tl.constexpr):
    """d act / dz at z (torch's choice at the kinks: relu' (0) = 0, leaky' (0) = slope)."""
    if z.dtype != tl.float64:
        slope = tl.cast(slope, z.dtype)
    if ACTIVATION == RELU:
        out = tl.where(z > 0.0, 1.0, 0.0)
    elif ACTIVATION == LEAKY_RELU:
        out = tl.where(z > 0.0, 1.0, slope + tl.zeros_like(z))
    elif ACTIVATION == SILU:
        s = _sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        out = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACTIVATION == GELU_TANH:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    else:
        out = tl.full(z.shape, 1.0, z.dtype)
    return out


@triton.jit
def sample_channel_values(ptr, n0, g0, N, K, C, dtype: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """A contiguous (N, C) array (per-sample scale, shift) as [BLOCK_N, BLOCK_G, BLOCK_K, 1],
    channels grouped as the tiles are; 0 outside."""
    n = n0 + tl.arange(0, BLOCK_N)
    c, c_mask = group_channels(g0, K, C, BLOCK_G, BLOCK_K)
    offsets = n[:, None, None] * C + c[None, :, :]
    mask = (n < N)[:, None, None] & c_mask[None, :, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(dtype)[:, :, :, None]


@triton.jit
def pre_activation(
    u, scale_ptr, shift_ptr, res_ptr, n0, g0, s0, N, C, S, K,
    res_stride_n, res_stride_c, res_stride_s,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,
):  # fmt: skip
    """z = u * scale[n, c] + shift[n, c] + residual for the tile at (n0, g0, s0), u = the
    normalised value x_hat * w + b; absent parts (None pointers) are skipped."""
    z = u
    if scale_ptr is not None:
        scale = sample_channel_values(
            scale_ptr, n0, g0, N, K, C, u.dtype, BLOCK_N, BLOCK_G, BLOCK_K
        )
        shift = sample_channel_values(
            shift_ptr, n0, g0, N, K, C, u.dtype, BLOCK_N, BLOCK_G, BLOCK_K
        )
        z = z * scale + shift
    if res_ptr is not None:
        residual, _, _ = load_tile(
            res_ptr, n0, g0, s0, N, C, S, K, res_stride_n, res_stride_c, res_stride_s, u.dtype,
            BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S, INDEX_64,
        )  # fmt: skip
        z += residual
    return z


@triton.jit
def epilogue_output_grad(
    x, dy, mu, k_x, k_c, scale_ptr, shift_ptr, res_ptr, y_ptr, offsets, mask, n0, g0, s0,
    N, C, S, K, res_stride_n, res_stride_c, res_stride_s, slope,
    ACTIVATION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,
):  # fmt: skip
    """Backward through the epilogue by recomputation: g = dy * act'(z), the gradient of the
    pre-activation z (and of the residual), with z rebuilt from x and the forward coefficients
    (mu, k_x, k_c); and g * scale[n, c], the gradient of u = x_hat * w + b. With ``y_ptr``
    (the forward's output y, at x's ``offsets``) the activation's derivative is read off y
    instead: for ReLU and a leaky ReLU of slope >= 0, y > 0 exactly where z > 0, so the op
    keeps its output (which the next layer keeps anyway) rather than the residual."""
    g = dy
    if ACTIVATION != 0:
        if y_ptr is not None:
            z = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(dy.dtype)
        else:
            z = pre_activation(
                normalized(x, mu, k_x, k_c), scale_ptr, shift_ptr, res_ptr, n0, g0, s0, N, C, S,
                K, res_stride_n, res_stride_c, res_stride_s, BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S,
                INDEX_64,
            )  # fmt: skip
        g = dy * activation_grad(z, slope, ACTIVATION)
    du = g
    if scale_ptr is not None:
        du = g * sample_channel_values(
            scale_ptr, n0, g0, N, K, C, g.dtype, BLOCK_N, BLOCK_G, BLOCK_K
        )
    return g, du
