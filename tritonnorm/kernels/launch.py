"""Launchers: canonical (N, C, S) views, grids, buffers, and the composition of the kernels into
the forward and backward of a normalisation. No autograd here (see tritonnorm/ops.py).

Forward: statistics partials (split over a (groups x SPLIT) grid) -> finalize (combine in a fixed
order, update running statistics, per-group coefficients) -> apply (write y). When a whole
reduction fits one tile, the first kernel normalises in registers and writes y itself.
Backward: gradient-sum partials -> finalize (dweight, dbias, dx coefficients) -> apply (write dx),
or the fused single-tile kernel.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton

from . import config
from .apply import _norm_apply_kernel
from .grad import _norm_grad_finalize_kernel, _norm_grad_partial_kernel
from .stats import _norm_stats_finalize_kernel, _norm_stats_partial_kernel

_SHAPE_KEY = ["N", "C", "S", "stride_n", "stride_c", "stride_s", "PER_INSTANCE"]
_stats_partial = config.TunedKernel(_norm_stats_partial_kernel, key=[*_SHAPE_KEY, "FUSED"])
_grad_partial = config.TunedKernel(
    _norm_grad_partial_kernel,
    key=[*_SHAPE_KEY, "dy_stride_n", "dy_stride_c", "dy_stride_s", "FUSED"],
)
_apply = config.TunedKernel(
    _norm_apply_kernel,
    key=[*_SHAPE_KEY, "dy_stride_n", "dy_stride_c", "dy_stride_s", "HAS_X", "HAS_DY"],
)
_FINALIZE_BLOCK_C = 128


@dataclass(frozen=True)
class View:
    """A tensor seen as (N, C, S): S flattens the spatial axes (one stride addresses them)."""

    N: int
    C: int
    S: int
    stride_n: int
    stride_c: int
    stride_s: int

    @property
    def strides(self) -> tuple[int, int, int]:
        return self.stride_n, self.stride_c, self.stride_s

    @property
    def span(self) -> int:
        """Elements from the first to the last one addressed, plus one."""
        sizes = (self.N, self.C, self.S)
        return 1 + sum((n - 1) * abs(st) for n, st in zip(sizes, self.strides, strict=True))

    def shape(self, per_instance: bool, dtype: torch.dtype) -> config.Shape:
        channels_fast = self.S == 1 or (self.stride_c == 1 and self.C > 1)
        acc_bytes = acc_dtype(dtype).itemsize
        return config.Shape(self.N, self.C, self.S, channels_fast, per_instance, acc_bytes)


def _flat_view(t: torch.Tensor) -> View | None:
    """(N, C, S) strides of t, or None when its spatial axes cannot share one stride."""
    sizes_strides = zip(t.shape[2:], t.stride()[2:], strict=True)
    spatial = [(size, stride) for size, stride in sizes_strides if size != 1]
    for (_, outer), (inner_size, inner) in itertools.pairwise(spatial):
        if outer != inner * inner_size:
            return None
    S = 1
    for size in t.shape[2:]:
        S *= size
    stride_s = spatial[-1][1] if spatial else 1
    return View(t.shape[0], t.shape[1], S, t.stride(0), t.stride(1), stride_s)


def is_dense(t: torch.Tensor) -> bool:
    """Contiguous in NC* or N*C (channels last) order: handled natively, output alike."""
    return t.is_contiguous() or t.movedim(1, -1).is_contiguous()


def input_view(x: torch.Tensor, per_instance: bool) -> tuple[torch.Tensor, View]:
    """x (densified if needed: one copy, documented) and its kernel view. For BN, a layout where
    the batch axis continues the spatial one (channels last, or S == 1) is seen as one long
    spatial axis (N = 1), so tiles never straddle samples."""
    if not is_dense(x):
        x = x.contiguous()
    view = _flat_view(x)
    assert view is not None
    if not per_instance and view.N > 1 and (view.S == 1 or view.stride_n == view.S * view.stride_s):
        stride_s = view.stride_n if view.S == 1 else view.stride_s
        view = View(1, view.C, view.N * view.S, view.N * view.S * stride_s, view.stride_c, stride_s)
    return x, view


def grad_view(dy: torch.Tensor, x: torch.Tensor, x_view: View) -> tuple[torch.Tensor, View]:
    """dy seen with x's (N, C, S) geometry: its own strides where possible, else a copy in x's
    layout."""
    view = _flat_view(dy)
    if view is not None and (view.N, view.S) == (x_view.N, x_view.S):
        return dy, view
    # x's batch axis may have been folded into S: dy must fold the same way.
    foldable = view is not None and (view.S == 1 or view.stride_n == view.S * view.stride_s)
    if foldable and x_view.N == 1:
        stride_s = view.stride_n if view.S == 1 else view.stride_s
        return dy, View(1, view.C, view.N * view.S, 0, view.stride_c, stride_s)
    dy = torch.empty_like(x).copy_(dy)
    return dy, View(x_view.N, x_view.C, x_view.S, *x_view.strides)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are fp32 for every input dtype but float64, which keeps fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kept_blocks(view: View, per_instance: bool, meta: dict) -> int:
    blocks = triton.cdiv(view.C, meta["BLOCK_C"])
    return blocks * triton.cdiv(view.N, meta["BLOCK_N"]) if per_instance else blocks


def _fused(view: View, per_instance: bool, dtype: torch.dtype, backward: bool = False) -> bool:
    return config.fused_blocks(view.shape(per_instance, dtype), backward) is not None


def _index_64(*views: View | None) -> bool:
    return config.index_64(max(v.span for v in views if v is not None))


def stats_partials(
    x: torch.Tensor, view: View, per_instance: bool, fused_out: tuple | None = None
) -> tuple[torch.Tensor, int]:
    """Partials (3, P, G, C) of (count, mean, M2) and P. With ``fused_out = (y, weight, bias,
    eps)`` the reduction must fit one tile and y is written too."""
    shape = view.shape(per_instance, x.dtype)
    fused = fused_out is not None
    candidates = config.reduction_configs(shape, fused)
    max_split = max(c.kwargs["SPLIT"] for c in candidates)
    groups = view.N if per_instance else 1
    partials = torch.empty(
        (3, max_split, groups, view.C), dtype=acc_dtype(x.dtype), device=x.device
    )
    y, weight, bias, eps = fused_out if fused else (None, None, None, 0.0)
    used = _stats_partial.launch(
        lambda meta: (_kept_blocks(view, per_instance, meta), meta["SPLIT"]),
        candidates,
        x, y, weight, bias, partials,
        view.N, view.C, view.S, *view.strides,
        partials.stride(0), partials.stride(1),
        eps,
        PER_INSTANCE=per_instance, FUSED=fused, INDEX_64=_index_64(view),
    )  # fmt: skip
    return partials, used.kwargs["SPLIT"]


def finalize_stats(
    partials: torch.Tensor | None,
    num_partials: int,
    C: int,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    dtype: torch.dtype,
    device: torch.device,
    want_combined: bool = False,
    running_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Combine partials (or read the running statistics when ``partials is None``): returns
    mean, rstd (G, C), apply coefficients (4, G, C), and the combined (3, G, C) if asked.
    With partials, writes the updated running statistics into ``running_out`` (default: the
    running buffers themselves, in place)."""
    new_mean, new_var = running_out if running_out is not None else (running_mean, running_var)
    mean = torch.empty((groups, C), dtype=dtype, device=device)
    rstd = torch.empty_like(mean)
    coef = torch.empty((4, groups, C), dtype=dtype, device=device)
    combined = torch.empty((3, groups, C), dtype=dtype, device=device) if want_combined else None
    from_running = partials is None
    _norm_stats_finalize_kernel[(triton.cdiv(C, _FINALIZE_BLOCK_C),)](
        partials, num_partials,
        partials.stride(0) if partials is not None else 0,
        partials.stride(1) if partials is not None else 0,
        combined, mean, rstd, coef, weight, bias,
        running_mean, running_var, new_mean, new_var,
        groups, C, momentum, eps,
        FROM_RUNNING=from_running, BLOCK_C=_FINALIZE_BLOCK_C, **config.LAUNCH_OPTIONS,
    )  # fmt: skip
    return mean, rstd, coef, combined


def apply(
    out: torch.Tensor,
    view: View,
    coef: torch.Tensor,
    per_instance: bool,
    x: torch.Tensor | None,
    dy: torch.Tensor | None = None,
    dy_view: View | None = None,
) -> None:
    """out = k_x * (x - mu) + k_dy * dy + k_c, out with x's strides."""
    shape = view.shape(per_instance, out.dtype)
    dy_strides = dy_view.strides if dy_view is not None else (0, 0, 0)
    _apply.launch(
        lambda meta: (
            triton.cdiv(view.N, meta["BLOCK_N"])
            * triton.cdiv(view.C, meta["BLOCK_C"])
            * triton.cdiv(view.S, meta["BLOCK_S"]),
        ),
        config.apply_configs(shape),
        x, dy, out, coef,
        view.N, view.C, view.S, *view.strides, *dy_strides,
        PER_INSTANCE=per_instance, HAS_X=x is not None, HAS_DY=dy is not None,
        INDEX_64=_index_64(view, dy_view),
    )  # fmt: skip


def _per_instance_view(per_instance: bool, use_input_stats: bool) -> bool:
    # Without input statistics IN normalises with per-channel running statistics, like BN.
    return per_instance and use_input_stats


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    use_input_stats: bool,
    per_instance: bool,
    momentum: float,
    eps: float,
    running_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mean, rstd for x of shape (N, C, *spatial). mean/rstd are (G, C) in the statistics'
    dtype, G = N for IN with input statistics, else 1. With input statistics, the updated
    running statistics go to ``running_out`` (default: in place)."""
    per_instance = _per_instance_view(per_instance, use_input_stats)
    x, view = input_view(x, per_instance)
    y = torch.empty_like(x)
    stats_dtype = acc_dtype(x.dtype)
    groups = x.shape[0] if per_instance else 1
    if x.numel() == 0:
        nan = torch.full((groups, x.shape[1]), float("nan"), dtype=stats_dtype, device=x.device)
        return y, nan, nan.clone()
    if not use_input_stats:
        mean, rstd, coef, _ = finalize_stats(
            None, 0, view.C, 1, weight, bias, running_mean, running_var, 0.0, eps,
            stats_dtype, x.device,
        )  # fmt: skip
        apply(y, view, coef, False, x)
        return y, mean, rstd
    fused = _fused(view, per_instance, x.dtype)
    partials, num_partials = stats_partials(
        x, view, per_instance, (y, weight, bias, eps) if fused else None
    )
    mean, rstd, coef, _ = finalize_stats(
        partials, num_partials, view.C, groups, weight, bias, running_mean, running_var,
        momentum, eps, stats_dtype, x.device, running_out=running_out,
    )  # fmt: skip
    if not fused:
        apply(y, view, coef, per_instance, x)
    return y, mean, rstd


def grad_partials(
    dy: torch.Tensor,
    dy_view: View,
    x: torch.Tensor,
    view: View,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    per_instance: bool,
    fused_out: tuple | None = None,
) -> tuple[torch.Tensor, int]:
    """Partials (2, P, G, C) of sum(dy) and sum(dy * x_hat), and P. With ``fused_out = (dx,
    weight)`` the reduction must fit one tile and dx is written too."""
    shape = view.shape(per_instance, x.dtype)
    fused = fused_out is not None
    candidates = config.reduction_configs(shape, fused, backward=True)
    max_split = max(c.kwargs["SPLIT"] for c in candidates)
    groups = view.N if per_instance else 1
    partials = torch.empty((2, max_split, groups, view.C), dtype=mean.dtype, device=x.device)
    dx, weight = fused_out if fused else (None, None)
    used = _grad_partial.launch(
        lambda meta: (_kept_blocks(view, per_instance, meta), meta["SPLIT"]),
        candidates,
        x, dy, dx, mean, rstd, weight, partials,
        view.N, view.C, view.S, *view.strides, *dy_view.strides,
        partials.stride(0), partials.stride(1),
        PER_INSTANCE=per_instance, FUSED=fused, INDEX_64=_index_64(view, dy_view),
    )  # fmt: skip
    return partials, used.kwargs["SPLIT"]


def finalize_grad(
    partials: torch.Tensor | None,
    num_partials: int,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    count: int,
    use_input_stats: bool,
    want_dx_coef: bool,
    want_param_grads: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dweight, dbias (C,) and the dx coefficients (4, G, C) from gradient-sum partials."""
    groups, C = mean.shape
    device = mean.device
    coef = torch.empty((4, groups, C), dtype=mean.dtype, device=device) if want_dx_coef else None
    param_dtype = weight.dtype if weight is not None else mean.dtype
    dweight = dbias = None
    if want_param_grads:
        dweight = torch.empty(C, dtype=param_dtype, device=device)
        dbias = torch.empty(C, dtype=param_dtype, device=device)
    _norm_grad_finalize_kernel[(triton.cdiv(C, _FINALIZE_BLOCK_C),)](
        partials, num_partials,
        partials.stride(0) if partials is not None else 0,
        partials.stride(1) if partials is not None else 0,
        mean, rstd, weight, dweight, dbias, coef,
        groups, C, max(count, 1),
        USE_INPUT_STATS=use_input_stats, BLOCK_C=_FINALIZE_BLOCK_C, **config.LAUNCH_OPTIONS,
    )  # fmt: skip
    return dweight, dbias, coef


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    use_input_stats: bool,
    per_instance: bool,
    want_param_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dx (x's layout), and dweight/dbias (weight's dtype; None unless asked)."""
    per_instance = _per_instance_view(per_instance, use_input_stats)
    x, view = input_view(x, per_instance)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        zeros = torch.zeros(x.shape[1], dtype=weight.dtype if weight is not None else mean.dtype,
                            device=x.device)  # fmt: skip
        return (
            dx,
            (zeros if want_param_grads else None),
            (zeros.clone() if want_param_grads else None),
        )
    dy, dy_view = grad_view(dy, x, view)
    count = view.S if per_instance else view.N * view.S
    if use_input_stats and _fused(view, per_instance, x.dtype, backward=True):
        partials, num_partials = grad_partials(
            dy, dy_view, x, view, mean, rstd, per_instance, (dx, weight)
        )
        dweight, dbias, _ = finalize_grad(
            partials, num_partials, mean, rstd, weight, count, True, False, want_param_grads
        )
        return dx, dweight, dbias
    partials, num_partials = None, 0
    if use_input_stats or want_param_grads:
        partials, num_partials = grad_partials(dy, dy_view, x, view, mean, rstd, per_instance)
    dweight, dbias, coef = finalize_grad(
        partials, num_partials, mean, rstd, weight, count, use_input_stats, True, want_param_grads
    )
    apply(dx, view, coef, per_instance, x if use_input_stats else None, dy, dy_view)
    return dx, dweight, dbias
