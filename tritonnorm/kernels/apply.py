"""The elementwise pass: out = k_x * (x - mu) + k_dy * dy + k_c with per-(sample, channel)
coefficients. It writes y in the forward (k_x = rstd * w, k_c = b) and dx in the backward, so
forward and backward share one streaming kernel.

Where the coefficients come from (``SOURCE``) is what lets a call skip the finalize launch:
- ``COEFFICIENTS``: a (4, rows, C) block a finalize kernel wrote (SyncBatchNorm, GroupNorm's
  backward, the epilogue backward);
- ``RUNNING``: the running statistics (eval): y = (x - rm) / sqrt(rv + eps) * w + b, or
  dx = w / sqrt(rv + eps) * dy;
- ``STATS_PARTIALS``: the statistics kernel's (count, mean, M2) partials, combined by every
  program for its own channels in the same fixed order (Chan), so every program holds bitwise
  the same statistics;
- ``GRAD_PARTIALS``: the gradient kernel's per-channel sums, likewise (one channel per
  statistic).
The programs of the first position block (and first sample block when one row of statistics
serves the batch) own their channels' outputs of the reduction: mean and rstd, the running
statistics' update, dweight and dbias, each written once.

With ``EPILOGUE`` the forward writes act(y * scale[n, c] + shift[n, c] + residual), and the
backward first turns dy into the gradient of x_hat * w + b, recomputing the pre-activation from x
and the forward coefficients (common.epilogue_output_grad), and writes the residual's gradient."""

import torch
import triton
import triton.language as tl

from . import config
from .common import (
    K_C,
    K_DY,
    K_X,
    MU,
    activation,
    affine_grad,
    combine_partials,
    epilogue_output_grad,
    forward_coefficients,
    grad_coefficients,
    inverse_std,
    load_coefficient,
    load_tile,
    normalized,
    pre_activation,
    tile_offsets,
    update_running,
)
from .launcher import NO_EPILOGUE, Kernel, Launch, bind, index_64

# Where the coefficients come from (module docstring).
COEFFICIENTS = tl.constexpr(0)
RUNNING = tl.constexpr(1)
STATS_PARTIALS = tl.constexpr(2)
GRAD_PARTIALS = tl.constexpr(3)


@triton.jit
def _per_channel(ptr, c, c_mask, default, dtype: tl.constexpr):
    """A (C,) vector as [1, BLOCK_C]; ``default`` where ptr is None or outside C."""
    if ptr is None:
        values = tl.zeros(c.shape, dtype) + default
    else:
        values = tl.load(ptr + c, mask=c_mask, other=default).to(dtype)
    return values[None, :]


@triton.jit
def _coefficients(
    coef_ptr, weight_ptr, bias_ptr, partial_ptr, num_partials, partial_stride_k,
    partial_stride_p, mean_ptr, rstd_ptr, running_mean_ptr, running_var_ptr, dweight_ptr,
    dbias_ptr, n, c, N, C, K, rows, count, eps, momentum, owner,
    dtype: tl.constexpr, SOURCE: tl.constexpr, HAS_DY: tl.constexpr,
    USE_INPUT_STATS: tl.constexpr,
):  # fmt: skip
    """(mu, k_x, k_dy, k_c), each [BLOCK_N, BLOCK_C], for samples n and channels c; the owner
    program also writes its channels' reduction outputs (module docstring)."""
    row = tl.where(rows > 1, n, 0)  # one row of statistics for the whole batch when rows == 1
    c_mask = c < C
    mask = (n < N)[:, None] & c_mask[None, :]
    if SOURCE == COEFFICIENTS:
        offsets = (row * C)[:, None] + c[None, :]
        slot = rows * C
        mu = load_coefficient(coef_ptr, MU, offsets, mask, slot)
        k_x = load_coefficient(coef_ptr, K_X, offsets, mask, slot)
        k_dy = load_coefficient(coef_ptr, K_DY, offsets, mask, slot)
        k_c = load_coefficient(coef_ptr, K_C, offsets, mask, slot)
    else:
        weight = _per_channel(weight_ptr, c, c_mask, 1.0, dtype)
        zero = tl.zeros([n.shape[0], c.shape[0]], dtype)
        if SOURCE == RUNNING:
            mean_c = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0).to(dtype)
            var_c = tl.load(running_var_ptr + c, mask=c_mask, other=1.0).to(dtype)
            rstd_c = inverse_std(tl.full(var_c.shape, 1.0, dtype), var_c, eps)
            if mean_ptr is not None:  # noqa: SIM102 (a constexpr test, then a runtime one)
                if owner:
                    tl.store(mean_ptr + c, mean_c, mask=c_mask)
                    tl.store(rstd_ptr + c, rstd_c, mask=c_mask)
            mu = mean_c[None, :] + zero
            rstd = rstd_c[None, :] + zero
            if HAS_DY:  # dx = w rstd dy: constants, not functions of x
                k_x, k_dy, k_c = zero, weight * rstd, zero
            else:
                bias = _per_channel(bias_ptr, c, c_mask, 0.0, dtype)
                k_x, k_dy, k_c = weight * rstd, zero, bias + zero
        elif SOURCE == STATS_PARTIALS:
            groups = C // K
            stats = (row * groups)[:, None] + (c // K)[None, :]
            count_, mean, m2 = combine_partials(
                partial_ptr, num_partials, partial_stride_k, partial_stride_p, stats, mask,
                zero, zero, zero,
            )  # fmt: skip
            rstd = inverse_std(count_, m2, eps)
            # a float64 scalar (common.inverse_std), made a tensor outside the runtime branch
            # below (a variable may not change type inside one); float64 by addition: the
            # interpreter's tl.cast of a Python float rounds it to float32 first
            if dtype == tl.float64:
                momentum_acc = momentum + tl.zeros([1], dtype)
            else:
                momentum_acc = tl.cast(momentum, dtype)
            if owner:  # one write per statistic: its group's first channel
                first = mask & ((c % K) == 0)[None, :]
                tl.store(mean_ptr + stats, mean, mask=first)
                tl.store(rstd_ptr + stats, rstd, mask=first)
                if running_mean_ptr is not None:  # rows == 1, K == 1 (BatchNorm)
                    update_running(
                        running_mean_ptr, running_var_ptr, running_mean_ptr, running_var_ptr,
                        stats, first, mean, m2 / tl.maximum(count_ - 1.0, 1.0), momentum_acc,
                    )  # fmt: skip
            mu, k_x, k_dy = mean, weight * rstd, zero
            k_c = _per_channel(bias_ptr, c, c_mask, 0.0, dtype) + zero
        else:  # GRAD_PARTIALS, one channel per statistic
            sums = (row * C)[:, None] + c[None, :]
            sum_dy, sum_dy_xhat = zero, zero
            if partial_ptr is not None:  # None: eval dx = w rstd dy, no sums (compiled, the
                for p in range(num_partials):  # loop would add to a None pointer)
                    part = partial_ptr + p * partial_stride_p + sums
                    sum_dy += tl.load(part, mask=mask, other=0.0)
                    sum_dy_xhat += tl.load(part + partial_stride_k, mask=mask, other=0.0)
            mu = tl.load(mean_ptr + sums, mask=mask, other=0.0)
            rstd = tl.load(rstd_ptr + sums, mask=mask, other=0.0)
            k_x, k_dy, k_c = grad_coefficients(
                rstd[:, :, None], weight[:, :, None], sum_dy[:, :, None], sum_dy_xhat[:, :, None],
                count, USE_INPUT_STATS,
            )  # fmt: skip
            # drop the (size-1) channels-of-a-group axis
            k_x, k_dy, k_c = tl.sum(k_x, axis=2), tl.sum(k_dy, axis=2), tl.sum(k_c, axis=2)
            if dweight_ptr is not None:  # noqa: SIM102 (a constexpr test, then a runtime one)
                if owner:
                    affine_grad(
                        partial_ptr, num_partials, partial_stride_k, partial_stride_p,
                        dweight_ptr, dbias_ptr, c, c_mask, rows, C, dtype,
                    )  # fmt: skip
    return mu, k_x, k_dy, k_c


@triton.jit
def _forward_coefficients(mean_ptr, rstd_ptr, weight_ptr, bias_ptr, n, c, N, C, K, rows,
                          dtype: tl.constexpr):  # fmt: skip
    """The forward's (mu, k_x, k_c), [BLOCK_N, BLOCK_C, 1, 1], from its (rows, C // K)
    statistics and the affine parameters (common.forward_coefficients)."""
    c_mask = c < C
    mask = (n < N)[:, None] & c_mask[None, :]
    stats = (tl.where(rows > 1, n, 0) * (C // K))[:, None] + (c // K)[None, :]
    mean = tl.load(mean_ptr + stats, mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + stats, mask=mask, other=0.0)
    weight = _per_channel(weight_ptr, c, c_mask, 1.0, dtype)
    bias = _per_channel(bias_ptr, c, c_mask, 0.0, dtype)
    mu, k_x, k_c = forward_coefficients(mean, rstd, weight, bias)
    return mu[:, :, None, None], k_x[:, :, None, None], k_c[:, :, None, None]


@triton.jit
def _norm_apply_kernel(
    x_ptr,  # input, viewed as (N, C, S); read when HAS_X
    dy_ptr,  # output gradient with its own strides; read when HAS_DY
    out_ptr,  # y or dx, same strides as x
    coef_ptr,  # COEFFICIENTS: (4, rows, C) coefficients (named slots, common.py)
    weight_ptr, bias_ptr,  # (C,) or None (the other sources)
    # STATS_PARTIALS: (3, P, rows, C // K) count, mean, M2; GRAD_PARTIALS: (2, P, rows, C) sums
    partial_ptr,
    num_partials, partial_stride_k, partial_stride_p,
    # (rows, C // K): written by the owners; read by GRAD_PARTIALS and (the forward's, to
    # recompute z) by the epilogue backward; or None
    mean_ptr, rstd_ptr,
    running_mean_ptr, running_var_ptr,  # (C,): read (RUNNING), updated by the owners, or None
    dweight_ptr, dbias_ptr,  # (C,), written by the owners (GRAD_PARTIALS), or None
    N, C, S,
    K,  # channels per statistic (STATS_PARTIALS)
    rows,  # rows of statistics: 1 (one for the whole batch) or N
    stride_n, stride_c, stride_s,  # strides of x and out
    dy_stride_n, dy_stride_c, dy_stride_s,
    count,  # elements per statistic (GRAD_PARTIALS)
    eps: tl.float64, momentum: tl.float64,  # float64 scalars (common.inverse_std)
    scale_ptr, shift_ptr,  # (N, C) contiguous per-sample scale and shift, or None (EPILOGUE)
    res_ptr,  # residual with its own strides, or None (EPILOGUE)
    res_stride_n, res_stride_c, res_stride_s,
    dres_ptr,  # residual gradient, same strides as x, or None (EPILOGUE backward)
    y_ptr,  # the forward's output, same strides as x, to read act' off, or None (grad.py)
    slope: tl.float64,  # leaky_relu's negative slope
    SOURCE: tl.constexpr,  # where the coefficients come from (module docstring)
    HAS_X: tl.constexpr,
    HAS_DY: tl.constexpr,
    EPILOGUE: tl.constexpr,  # scale/shift, residual or activation present
    ACTIVATION: tl.constexpr,  # activation code (common.py), 0 for none
    USE_INPUT_STATS: tl.constexpr,  # GRAD_PARTIALS: the training formula
    FP64: tl.constexpr,  # statistics and coefficients in float64 (float64 input), else float32
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,  # int64 element offsets (a tensor spans 2**30 elements or more)
):  # fmt: skip
    # Tiles are the reductions' 4-D tiles with one channel per group: [BLOCK_N, BLOCK_C, 1, S].
    pid = tl.program_id(0)
    num_s_blocks = tl.cdiv(S, BLOCK_S)
    num_c_blocks = tl.cdiv(C, BLOCK_C)
    s_block = pid % num_s_blocks
    s0 = s_block * BLOCK_S
    c0 = ((pid // num_s_blocks) % num_c_blocks) * BLOCK_C
    n0 = (pid // (num_s_blocks * num_c_blocks)) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    c = c0 + tl.arange(0, BLOCK_C)
    dtype: tl.constexpr = tl.float64 if FP64 else tl.float32
    owner = (s_block == 0) & ((n0 == 0) | (rows > 1))
    mu, k_x, k_dy, k_c = _coefficients(
        coef_ptr, weight_ptr, bias_ptr, partial_ptr, num_partials, partial_stride_k,
        partial_stride_p, mean_ptr, rstd_ptr, running_mean_ptr, running_var_ptr, dweight_ptr,
        dbias_ptr, n, c, N, C, K, rows, count, eps, momentum, owner, dtype, SOURCE, HAS_DY,
        USE_INPUT_STATS,
    )  # fmt: skip
    mu = mu[:, :, None, None]
    k_x = k_x[:, :, None, None]
    k_dy = k_dy[:, :, None, None]
    k_c = k_c[:, :, None, None]
    offsets, mask = tile_offsets(
        n0, c0, s0, N, C, S, 1, stride_n, stride_c, stride_s,
        BLOCK_N, BLOCK_C, 1, BLOCK_S, INDEX_64,
    )  # fmt: skip
    if HAS_DY:
        dy, _, _ = load_tile(
            dy_ptr, n0, c0, s0, N, C, S, 1, dy_stride_n, dy_stride_c, dy_stride_s, dtype,
            BLOCK_N, BLOCK_C, 1, BLOCK_S, INDEX_64,
        )  # fmt: skip
    if HAS_X:
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(dtype)  # x's offsets are out's
        if HAS_DY:
            if EPILOGUE:
                f_mu, f_k_x, f_k_c = mu, k_x, k_c
                if mean_ptr is not None:  # the forward's coefficients, to recompute z
                    f_mu, f_k_x, f_k_c = _forward_coefficients(
                        mean_ptr, rstd_ptr, weight_ptr, bias_ptr, n, c, N, C, K, rows, dtype
                    )
                g, dy = epilogue_output_grad(
                    x, dy, f_mu, f_k_x, f_k_c, scale_ptr, shift_ptr, res_ptr, y_ptr, offsets,
                    mask, n0, c0, s0, N, C, S, 1, res_stride_n, res_stride_c, res_stride_s,
                    slope, ACTIVATION, BLOCK_N, BLOCK_C, 1, BLOCK_S, INDEX_64,
                )  # fmt: skip
                if dres_ptr is not None:
                    tl.store(dres_ptr + offsets, g.to(dres_ptr.dtype.element_ty), mask=mask)
            out = normalized(x, mu, k_x, k_c) + k_dy * dy
        else:
            out = normalized(x, mu, k_x, k_c)
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


# --- launcher -----------------------------------------------------------------------------------

_APPLY = Kernel(_norm_apply_kernel)


def bind_apply(
    red, tensors: dict, *, source: tl.constexpr, dy_view=None, extras: dict = NO_EPILOGUE,
    num_partials: int = 0, partial_strides=(0, 0), eps: float = 0.0, momentum: float = 0.0,
    use_input_stats: bool = True,
) -> Launch:  # fmt: skip
    """The elementwise pass (y or dx) over ``red`` (launch.Reduction) with its coefficients from
    ``source`` (one of this module's sources); config chosen by tuning.py."""
    view = red.view
    candidates = config.apply_configs(red, epilogue=extras["EPILOGUE"])
    constants = dict(
        N=view.N, C=view.C, S=view.S, K=red.group_size, rows=red.rows,
        stride_n=view.stride_n, stride_c=view.stride_c, stride_s=view.stride_s,
        **dict(zip(("dy_stride_n", "dy_stride_c", "dy_stride_s"),
                   dy_view.strides if dy_view is not None else (0, 0, 0), strict=True)),
        count=max(red.count, 1), eps=eps, momentum=momentum, num_partials=num_partials,
        partial_stride_k=partial_strides[0], partial_stride_p=partial_strides[1],
        **extras, SOURCE=source.value, HAS_X=tensors.get("x_ptr") is not None,
        HAS_DY=tensors.get("dy_ptr") is not None, USE_INPUT_STATS=use_input_stats,
        FP64=red.acc_dtype == torch.float64, INDEX_64=index_64(view, dy_view),
    )  # fmt: skip
    grid_of = lambda m: (
        config.cdiv(view.N, m["BLOCK_N"]) * config.cdiv(view.C, m["BLOCK_C"])
        * config.cdiv(view.S, m["BLOCK_S"]),
    )  # fmt: skip
    return bind(_APPLY, red, tensors, constants, candidates=candidates, grid_of=grid_of)
