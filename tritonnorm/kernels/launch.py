"""Launchers: canonical (N, C, S) views, grids, buffers, and the composition of the kernels into
the forward and backward of a normalisation. No autograd here (see tritonnorm/ops.py).

A normalisation is described by a :class:`Norm` (which axes are reduced, how many channels share
a statistic); :func:`plan` turns it and an input into a :class:`Reduction`, the one record every
launch reads its counts, groups and views from.

Forward: statistics partials (split over a (statistics x SPLIT) grid) -> finalize (combine in a
fixed order, update running statistics, per-channel coefficients) -> apply (write y). When a
whole reduction fits one tile, the first kernel normalises in registers and writes y itself.
Backward: per-channel gradient-sum partials -> finalize (dweight, dbias, dx coefficients) ->
apply (write dx), or the fused single-tile kernel.

An :class:`Epilogue` (per-sample scale/shift, residual, activation) rides on the same passes: the
kernel that writes y applies it; the backward (:func:`backward_epilogue`) recomputes the
pre-activation from x and the saved statistics instead of saving it.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import config
from .apply import _norm_apply_kernel
from .grad import _norm_grad_finalize_kernel, _norm_grad_partial_kernel
from .stats import _norm_stats_finalize_kernel, _norm_stats_partial_kernel

_VIEW_KEY = ["N", "C", "S", "stride_n", "stride_c", "stride_s"]
_DY_KEY = ["dy_stride_n", "dy_stride_c", "dy_stride_s"]
_EPILOGUE_KEY = ["EPILOGUE", "ACTIVATION"]
_stats_partial = config.TunedKernel(
    _norm_stats_partial_kernel, key=[*_VIEW_KEY, "K", "REDUCE_BATCH", "FUSED", *_EPILOGUE_KEY]
)
_grad_partial = config.TunedKernel(
    _norm_grad_partial_kernel,
    key=[*_VIEW_KEY, *_DY_KEY, "K", "REDUCE_BATCH", "FUSED", *_EPILOGUE_KEY],
)
_apply = config.TunedKernel(
    _norm_apply_kernel,
    key=[*_VIEW_KEY, *_DY_KEY, "coef_stride_n", "HAS_X", "HAS_DY", *_EPILOGUE_KEY],
)

# Activation names of the epilogue -> the kernels' codes (common.py).
ACTIVATIONS = {"relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5}


def derivative_from_output(activation: int, slope: float) -> bool:
    """Whether act'(z) can be read off the output y = act(z): y > 0 exactly where z > 0 (ReLU;
    leaky ReLU with slope >= 0; a negative slope makes y > 0 where z < 0)."""
    return activation == ACTIVATIONS["relu"] or (
        activation == ACTIVATIONS["leaky_relu"] and slope >= 0
    )


@dataclass(frozen=True)
class Epilogue:
    """y = act((x_hat * w + b) * scale + shift + residual): ``scale`` and ``shift`` (N, C)
    contiguous, both or neither; ``residual`` of the input's shape, any layout; ``activation``
    a code of :data:`ACTIVATIONS` (0: none), ``slope`` leaky_relu's negative slope."""

    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    activation: int = 0
    slope: float = 0.01

    @property
    def present(self) -> bool:
        return self.scale is not None or self.residual is not None or self.activation != 0


_NO_EPILOGUE = dict(
    scale_ptr=None, shift_ptr=None, res_ptr=None, res_stride_n=0, res_stride_c=0, res_stride_s=0,
    slope=0.0, EPILOGUE=False, ACTIVATION=0,
)  # fmt: skip


def _epilogue_args(ep: Epilogue | None, x: torch.Tensor, view: View) -> dict:
    """The kernels' epilogue arguments; the residual is seen with x's view (copied into x's
    layout only when its strides cannot express it)."""
    if ep is None or not ep.present:
        return _NO_EPILOGUE
    residual, res_strides = None, (0, 0, 0)
    if ep.residual is not None:
        residual, res_view = grad_view(ep.residual, x, view)
        res_strides = res_view.strides
    return dict(
        scale_ptr=ep.scale, shift_ptr=ep.shift, res_ptr=residual,
        **dict(zip(("res_stride_n", "res_stride_c", "res_stride_s"), res_strides, strict=True)),
        slope=float(ep.slope), EPILOGUE=True, ACTIVATION=ep.activation,
    )  # fmt: skip


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

    @property
    def channels_fast(self) -> bool:
        return self.S == 1 or (self.stride_c == 1 and self.C > 1)


@dataclass(frozen=True)
class Norm:
    """Which statistics a normalisation uses: BatchNorm reduces the batch and spatial axes per
    channel (``Norm(reduce_batch=True)``), InstanceNorm the spatial axes per sample and channel
    (``Norm(reduce_batch=False)``), GroupNorm the spatial axes and C / ``num_groups`` channels per
    sample (``Norm(reduce_batch=False, num_groups=G)``; LayerNorm over (C, *spatial) is G = 1).
    ``num_groups=0`` means one statistic per channel. Without input statistics the running
    statistics are used: per channel, shared by the whole batch."""

    reduce_batch: bool
    num_groups: int = 0
    use_input_stats: bool = True

    @property
    def batch_reduced(self) -> bool:
        """Whether one statistic serves every sample."""
        return self.reduce_batch or not self.use_input_stats

    def stats_shape(self, input_shape: Sequence[int]) -> tuple[int, int]:
        """(rows, groups) of the saved mean and rstd for an input of ``input_shape``."""
        groups = self.num_groups if self.num_groups and self.use_input_stats else input_shape[1]
        return (1 if self.batch_reduced else input_shape[0], groups)


@dataclass(frozen=True)
class Reduction:
    """One normalisation of one tensor, as every launch sees it: the (N, C, S) view (for a
    reduced batch axis possibly folded into S), ``group_size`` consecutive channels per
    statistic, and statistics arrays of ``rows`` x ``groups``."""

    view: View
    group_size: int
    reduce_batch: bool
    dtype: torch.dtype  # the input's

    @property
    def rows(self) -> int:
        return 1 if self.reduce_batch else self.view.N

    @property
    def groups(self) -> int:
        return self.view.C // self.group_size

    @property
    def count(self) -> int:
        """Elements per statistic."""
        return (self.view.N if self.reduce_batch else 1) * self.group_size * self.view.S

    @property
    def acc_dtype(self) -> torch.dtype:
        return acc_dtype(self.dtype)

    @functools.cached_property
    def shape(self) -> config.Shape:
        v = self.view
        return config.Shape(
            v.N, v.C, v.S, self.group_size, self.reduce_batch, v.channels_fast,
            self.acc_dtype.itemsize,
        )  # fmt: skip

    def kernel_args(self) -> dict:
        """The view's sizes and strides and the group size, as the reduction kernels name them."""
        v = self.view
        return dict(
            N=v.N, C=v.C, S=v.S, K=self.group_size,
            stride_n=v.stride_n, stride_c=v.stride_c, stride_s=v.stride_s,
        )  # fmt: skip

    def stats_programs(self, meta: dict) -> int:
        """Programs along the kept axes of a reduction launched with blocks ``meta``."""
        blocks = config.cdiv(self.groups, meta["BLOCK_G"])
        return blocks if self.reduce_batch else blocks * config.cdiv(self.view.N, meta["BLOCK_N"])

    def finalize_grid(self, ordered_rows: bool) -> tuple[tuple[int, int], dict]:
        """Grid and blocks of a finalize kernel. ``ordered_rows``: the kernel sums over rows
        (running statistics, parameter gradients), so one program walks all rows of its groups."""
        block_r, block_g, block_k = config.finalize_blocks(self.rows, self.groups, self.group_size)
        row_programs = 1 if ordered_rows else config.cdiv(self.rows, block_r)
        grid = (config.cdiv(self.groups, block_g), row_programs)
        return grid, dict(BLOCK_R=block_r, BLOCK_G=block_g, BLOCK_K=block_k)


# Views and plans are pure functions of (sizes, strides, dtype, settings), cached: a training
# step sees a handful of shapes, and recomputing them was a large share of each call's host time.


@functools.lru_cache(maxsize=4096)
def _flat_view(sizes: tuple[int, ...], strides: tuple[int, ...]) -> View | None:
    """(N, C, S) view of a tensor of these sizes and strides, or None when its spatial axes
    cannot share one stride."""
    spatial = [
        (size, stride) for size, stride in zip(sizes[2:], strides[2:], strict=True) if size != 1
    ]
    for (_, outer), (inner_size, inner) in itertools.pairwise(spatial):
        if outer != inner * inner_size:
            return None
    S = 1
    for size in sizes[2:]:
        S *= size
    stride_s = spatial[-1][1] if spatial else 1
    return View(sizes[0], sizes[1], S, strides[0], strides[1], stride_s)


def _packed(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """Row-major contiguous (strides of size-1 axes ignored, as torch does)."""
    expected = 1
    for size, stride in zip(reversed(sizes), reversed(strides), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


@functools.lru_cache(maxsize=4096)
def _dense(sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    if 0 in sizes or _packed(sizes, strides):
        return True
    order = (0, *range(2, len(sizes)), 1)  # channels last
    return _packed([sizes[i] for i in order], [strides[i] for i in order])


def is_dense(t: torch.Tensor) -> bool:
    """Contiguous in NC* or N*C (channels last) order: handled natively, output alike."""
    try:
        return _dense(tuple(t.shape), t.stride())
    except TypeError:  # symbolic sizes (fake tensors while torch.compile traces): not hashable
        return t.is_contiguous() or t.movedim(1, -1).is_contiguous()


@functools.lru_cache(maxsize=4096)
def _plan(
    sizes: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype, norm: Norm, fold: bool
) -> Reduction:
    view = _flat_view(sizes, strides)
    assert view is not None
    # With the batch axis reduced (``fold``), a layout where it continues the spatial one
    # (channels last, or S == 1) is seen as one long spatial axis (N = 1): tiles never straddle
    # samples.
    if fold and view.N > 1 and (view.S == 1 or view.stride_n == view.S * view.stride_s):
        stride_s = view.stride_n if view.S == 1 else view.stride_s
        view = View(1, view.C, view.N * view.S, view.N * view.S * stride_s, view.stride_c, stride_s)
    groups = norm.stats_shape(sizes)[1]
    return Reduction(view, view.C // max(groups, 1), norm.batch_reduced, dtype)


def plan(x: torch.Tensor, norm: Norm, fold_batch: bool = True) -> tuple[torch.Tensor, Reduction]:
    """x (densified if needed: one copy, documented) and the :class:`Reduction` of ``norm`` over
    it. ``fold_batch=False`` keeps the sample axis even when the batch is reduced (per-sample
    scale/shift need it)."""
    if not is_dense(x):
        x = x.contiguous()
    fold = norm.batch_reduced and fold_batch
    return x, _plan(tuple(x.shape), x.stride(), x.dtype, norm, fold)


def grad_view(dy: torch.Tensor, x: torch.Tensor, x_view: View) -> tuple[torch.Tensor, View]:
    """dy seen with x's (N, C, S) geometry: its own strides where possible, else a copy in x's
    layout."""
    view = _flat_view(tuple(dy.shape), dy.stride())
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


def _index_64(*views: View | None) -> bool:
    return config.index_64(max(v.span for v in views if v is not None))


def stats_partials(
    x: torch.Tensor,
    red: Reduction,
    *,
    fused_y: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 0.0,
    epilogue_args: dict = _NO_EPILOGUE,
) -> tuple[torch.Tensor, int]:
    """Partials (3, P, rows, groups) of (count, mean, M2), and P. With ``fused_y`` the reduction
    must fit one tile, and y (normalised with weight, bias, eps, then the epilogue) is written
    there too."""
    fused = fused_y is not None
    candidates = config.reduction_configs(red.shape, fused, epilogue=epilogue_args["EPILOGUE"])
    max_split = max(c.kwargs["SPLIT"] for c in candidates)
    partials = torch.empty(
        (3, max_split, red.rows, red.groups), dtype=red.acc_dtype, device=x.device
    )
    used = _stats_partial.launch(
        lambda meta: (red.stats_programs(meta), meta["SPLIT"]),
        candidates,
        tune_key=red,
        x_ptr=x, y_ptr=fused_y, weight_ptr=weight, bias_ptr=bias, partial_ptr=partials,
        **red.kernel_args(),
        partial_stride_k=partials.stride(0), partial_stride_p=partials.stride(1), eps=eps,
        **epilogue_args, REDUCE_BATCH=red.reduce_batch, FUSED=fused,
        INDEX_64=_index_64(red.view),
    )  # fmt: skip
    return partials, used.kwargs["SPLIT"]


def finalize_stats(
    red: Reduction,
    partials: torch.Tensor | None,
    num_partials: int,
    *,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    running: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    running_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    momentum: float = 0.0,
    want_coef: bool = True,
    want_combined: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Combine partials (or, with ``partials=None``, read the ``running`` statistics): returns
    mean and rstd (rows, groups), apply coefficients (4, rows, C) if asked (not when the fused
    kernel has written y already), and the combined (3, rows, groups) if asked. With partials and running statistics, the updated running statistics are
    written into ``running_out`` (default: the running buffers themselves, in place)."""
    from_running = partials is None
    running_mean, running_var = running
    update = not from_running and running_mean is not None
    new_mean, new_var = (running_out or running) if update else (None, None)
    device = running_mean.device if from_running else partials.device
    dtype = red.acc_dtype
    mean = torch.empty((red.rows, red.groups), dtype=dtype, device=device)
    rstd = torch.empty_like(mean)
    coef = torch.empty((4, red.rows, red.view.C), dtype=dtype, device=device) if want_coef else None
    combined = torch.empty((3, *mean.shape), dtype=dtype, device=device) if want_combined else None
    grid, blocks = red.finalize_grid(ordered_rows=update)
    _norm_stats_finalize_kernel[grid](
        partial_ptr=partials, num_partials=num_partials,
        partial_stride_k=partials.stride(0) if partials is not None else 0,
        partial_stride_p=partials.stride(1) if partials is not None else 0,
        combined_ptr=combined, mean_ptr=mean, rstd_ptr=rstd, coef_ptr=coef,
        weight_ptr=weight, bias_ptr=bias,
        running_mean_ptr=running_mean, running_var_ptr=running_var,
        new_running_mean_ptr=new_mean, new_running_var_ptr=new_var,
        rows=red.rows, C=red.view.C, K=red.group_size, momentum=momentum, eps=eps,
        FROM_RUNNING=from_running, **blocks, **config.LAUNCH_OPTIONS,
    )  # fmt: skip
    return mean, rstd, coef, combined


def apply(
    out: torch.Tensor,
    red: Reduction,
    coef: torch.Tensor,
    *,
    x: torch.Tensor | None,
    dy: torch.Tensor | None = None,
    dy_view: View | None = None,
    epilogue_args: dict = _NO_EPILOGUE,
    fwd_coef: torch.Tensor | None = None,
    d_residual: torch.Tensor | None = None,
) -> None:
    """out = k_x * (x - mu) + k_dy * dy + k_c with (4, rows, C) coefficients; out has x's
    strides. With an epilogue: y = act(out * scale + shift + residual) (no dy), or (dy given)
    dy first becomes the gradient of x_hat * w + b, the pre-activation recomputed with the
    forward coefficients ``fwd_coef``, and the residual's gradient goes to ``d_residual``."""
    view = red.view
    _apply.launch(
        lambda meta: (
            config.cdiv(view.N, meta["BLOCK_N"])
            * config.cdiv(view.C, meta["BLOCK_C"])
            * config.cdiv(view.S, meta["BLOCK_S"]),
        ),
        config.apply_configs(red.shape, epilogue=epilogue_args["EPILOGUE"]),
        tune_key=(red, dy_view),
        x_ptr=x, dy_ptr=dy, out_ptr=out, coef_ptr=coef,
        N=view.N, C=view.C, S=view.S,
        stride_n=view.stride_n, stride_c=view.stride_c, stride_s=view.stride_s,
        **dict(zip(_DY_KEY, dy_view.strides if dy_view is not None else (0, 0, 0), strict=True)),
        coef_stride_n=0 if red.rows == 1 else view.C, coef_stride_slot=coef.stride(0),
        **epilogue_args, fwd_coef_ptr=fwd_coef, dres_ptr=d_residual,
        HAS_X=x is not None, HAS_DY=dy is not None, INDEX_64=_index_64(view, dy_view),
    )  # fmt: skip


def _fused(red: Reduction, backward: bool = False, epilogue: bool = False) -> bool:
    return config.fused_blocks(red.shape, backward, epilogue) is not None


def _nan_stats(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    shape = norm.stats_shape(x.shape)
    return torch.full(shape, float("nan"), dtype=acc_dtype(x.dtype), device=x.device)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    norm: Norm,
    momentum: float,
    eps: float,
    running_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    epilogue: Epilogue | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mean, rstd for x of shape (N, C, *spatial); mean and rstd are ``norm.stats_shape``
    in the statistics' dtype. With input statistics, the updated running statistics go to
    ``running_out`` (default: in place). An ``epilogue`` is applied where y is written."""
    x, red = plan(x, norm, fold_batch=epilogue is None or epilogue.scale is None)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y, _nan_stats(x, norm), _nan_stats(x, norm)
    extras = _epilogue_args(epilogue, x, red.view)
    running = (running_mean, running_var)
    if not norm.use_input_stats:
        mean, rstd, coef, _ = finalize_stats(
            red, None, 0, weight=weight, bias=bias, eps=eps, running=running
        )
        apply(y, red, coef, x=x, epilogue_args=extras)
        return y, mean, rstd
    fused = _fused(red, epilogue=extras["EPILOGUE"])
    partials, num_partials = stats_partials(
        x, red,
        **(dict(fused_y=y, weight=weight, bias=bias, eps=eps, epilogue_args=extras) if fused else {}),
    )  # fmt: skip
    mean, rstd, coef, _ = finalize_stats(
        red, partials, num_partials, weight=weight, bias=bias, eps=eps, running=running,
        running_out=running_out, momentum=momentum, want_coef=not fused,
    )  # fmt: skip
    if not fused:
        apply(y, red, coef, x=x, epilogue_args=extras)
    return y, mean, rstd


def grad_partials(
    dy: torch.Tensor,
    dy_view: View,
    x: torch.Tensor,
    red: Reduction,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    fused_dx: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    epilogue_args: dict = _NO_EPILOGUE,
    d_residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Per-channel partials (2, P, rows, C) of sum(dy) and sum(dy * x_hat), and P. With
    ``fused_dx`` the reduction must fit one tile and dx is written there too. With an
    epilogue (batch axis kept) the sums are of g = dy * act'(z); fused, dx is that of
    du = g * scale and g goes to ``d_residual``."""
    fused = fused_dx is not None
    candidates = config.reduction_configs(
        red.shape, fused, backward=True, epilogue=epilogue_args["EPILOGUE"]
    )
    max_split = max(c.kwargs["SPLIT"] for c in candidates)
    partials = torch.empty((2, max_split, red.rows, red.view.C), dtype=mean.dtype, device=x.device)
    used = _grad_partial.launch(
        lambda meta: (red.stats_programs(meta), meta["SPLIT"]),
        candidates,
        tune_key=(red, dy_view),
        x_ptr=x, dy_ptr=dy, dx_ptr=fused_dx, mean_ptr=mean, rstd_ptr=rstd, weight_ptr=weight,
        bias_ptr=bias, partial_ptr=partials, **red.kernel_args(), **epilogue_args,
        dres_ptr=d_residual,
        **dict(zip(_DY_KEY, dy_view.strides, strict=True)),
        partial_stride_k=partials.stride(0), partial_stride_p=partials.stride(1),
        REDUCE_BATCH=red.reduce_batch, FUSED=fused, INDEX_64=_index_64(red.view, dy_view),
    )  # fmt: skip
    return partials, used.kwargs["SPLIT"]


def finalize_grad(
    red: Reduction,
    partials: torch.Tensor | None,
    num_partials: int,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    weight: torch.Tensor | None,
    use_input_stats: bool = True,
    want_dx_coef: bool,
    want_param_grads: bool,
    count: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dweight, dbias (C,) and the dx coefficients (4, rows, C) from gradient-sum partials.
    ``count``: elements per statistic, if not this reduction's own (SyncBatchNorm's global
    batch)."""
    C = red.view.C
    device = mean.device
    coef = None
    if want_dx_coef:
        coef = torch.empty((4, red.rows, C), dtype=mean.dtype, device=device)
    param_dtype = weight.dtype if weight is not None else mean.dtype
    dweight = dbias = None
    if want_param_grads:
        dweight = torch.empty(C, dtype=param_dtype, device=device)
        dbias = torch.empty(C, dtype=param_dtype, device=device)
    grid, blocks = red.finalize_grid(ordered_rows=want_param_grads)
    _norm_grad_finalize_kernel[grid](
        partial_ptr=partials, num_partials=num_partials,
        partial_stride_k=partials.stride(0) if partials is not None else 0,
        partial_stride_p=partials.stride(1) if partials is not None else 0,
        mean_ptr=mean, rstd_ptr=rstd, weight_ptr=weight,
        dweight_ptr=dweight, dbias_ptr=dbias, coef_ptr=coef,
        rows=red.rows, C=C, K=red.group_size, count=max(count or red.count, 1),
        USE_INPUT_STATS=use_input_stats, **blocks, **config.LAUNCH_OPTIONS,
    )  # fmt: skip
    return dweight, dbias, coef


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    norm: Norm,
    param_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dx (x's layout), and dweight/dbias (weight's dtype; None unless ``param_grads``)."""
    x, red = plan(x, norm)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        zeros = None
        if param_grads:
            dtype = weight.dtype if weight is not None else mean.dtype
            zeros = torch.zeros(x.shape[1], dtype=dtype, device=x.device)
        return dx, zeros, (zeros.clone() if zeros is not None else None)
    dy, dy_view = grad_view(dy, x, red.view)
    if norm.use_input_stats and _fused(red, backward=True):
        partials, num_partials = grad_partials(
            dy, dy_view, x, red, mean, rstd, fused_dx=dx, weight=weight
        )
        dweight, dbias, _ = finalize_grad(
            red, partials, num_partials, mean, rstd, weight=weight, want_dx_coef=False,
            want_param_grads=param_grads,
        )  # fmt: skip
        return dx, dweight, dbias
    partials, num_partials = None, 0
    if norm.use_input_stats or param_grads:
        partials, num_partials = grad_partials(dy, dy_view, x, red, mean, rstd)
    dweight, dbias, coef = finalize_grad(
        red, partials, num_partials, mean, rstd, weight=weight,
        use_input_stats=norm.use_input_stats, want_dx_coef=True, want_param_grads=param_grads,
    )  # fmt: skip
    apply(dx, red, coef, x=x if norm.use_input_stats else None, dy=dy, dy_view=dy_view)
    return dx, dweight, dbias


def _per_channel(t: torch.Tensor | None, C: int, default: float, dtype, device) -> torch.Tensor:
    if t is None:
        return torch.full((C,), default, dtype=dtype, device=device)
    return t.to(dtype)


def backward_epilogue(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    epilogue: Epilogue,
    *,
    norm: Norm,
    param_grads: bool,
    scale_grads: bool,
    residual_grad: bool,
    z_from_output: bool = False,
) -> tuple[torch.Tensor, ...]:
    """dx, dweight, dbias, dscale, dshift, dresidual (None where not asked) of
    y = act((x_hat * w + b) * scale + shift + residual), recomputing x_hat and the
    pre-activation z from x and the saved (rows, groups) statistics.

    With g = dy * act'(z) and du = g * scale (the gradient of u = x_hat * w + b):
    dresidual = g; dshift[n, c] = sum_s g; dscale[n, c] = w sum_s(g x_hat) + b sum_s g; and
    dx, dweight, dbias are the plain op's formulas applied to du. Passes: per-(sample, channel)
    sums of g and g * x_hat (reads x, dy, and the residual when there is an activation); small
    (N, C) torch ops and the finalize kernel; the apply pass (reads x, dy, the residual; writes dx
    and dresidual). When an instance or group fits one tile (InstanceNorm, GroupNorm), the first
    kernel writes dx and dresidual from registers and there is no apply pass.

    ``z_from_output``: ``epilogue.residual`` is the forward's output y, not the residual, and the
    activation (ReLU, or a leaky ReLU of slope >= 0) has act'(z) = act'(y): z is not rebuilt.
    ``residual_grad`` still asks for the residual's gradient (g)."""
    x, red = plan(x, norm, fold_batch=False)
    view = red.view
    N, C = view.N, view.C
    acc = red.acc_dtype
    dx = torch.empty_like(x)
    d_res = torch.empty_like(x) if residual_grad else None
    param_dtype = weight.dtype if weight is not None else acc
    if x.numel() == 0:
        zeros = torch.zeros(C, dtype=param_dtype, device=x.device) if param_grads else None
        dsc = dsh = None
        if scale_grads:
            dsc = torch.zeros_like(epilogue.scale)
            dsh = torch.zeros_like(epilogue.scale)
        return dx, zeros, None if zeros is None else zeros.clone(), dsc, dsh, d_res
    dy, dy_view = grad_view(dy, x, view)
    # EPILOGUE even when nothing of it is left to read (a residual without activation: g = dy)
    extras = {**_epilogue_args(epilogue, x, view), "EPILOGUE": True}
    if z_from_output:
        assert epilogue.residual is not None
        assert derivative_from_output(epilogue.activation, epilogue.slope)
        extras["Z_FROM_OUTPUT"] = True
    # Gradient sums per (sample, channel) even when the batch axis is reduced: the statistics are
    # repeated for every sample ((N, groups): negligible next to x).
    per_sample = Reduction(view, red.group_size, False, red.dtype)
    mean_rows = mean.expand(N, mean.shape[1]).contiguous()
    rstd_rows = rstd.expand(N, rstd.shape[1]).contiguous()
    # On chip when an instance / group fits one tile (not BatchNorm: its dx needs sums over the
    # batch, its dscale sums per sample): dx and dresidual written by the same kernel.
    fused = (
        norm.use_input_stats and not red.reduce_batch and _fused(red, backward=True, epilogue=True)
    )
    partials, num_partials = grad_partials(
        dy, dy_view, x, per_sample, mean_rows, rstd_rows, weight=weight, bias=bias,
        epilogue_args=extras, fused_dx=dx if fused else None,
        d_residual=d_res if fused else None,
    )  # fmt: skip
    sum_g, sum_g_xhat = partials[:, :num_partials].sum(1)  # (N, C) each, fixed order
    w = _per_channel(weight, C, 1.0, acc, x.device)
    b = _per_channel(bias, C, 0.0, acc, x.device)
    d_scale = d_shift = None
    sum_du, sum_du_xhat = sum_g, sum_g_xhat
    if epilogue.scale is not None:
        if scale_grads:
            d_scale = (w * sum_g_xhat + b * sum_g).to(epilogue.scale.dtype)
            d_shift = sum_g.to(epilogue.scale.dtype, copy=True)
        scale = epilogue.scale.to(acc)
        sum_du, sum_du_xhat = scale * sum_g, scale * sum_g_xhat
    if red.reduce_batch:
        sum_du, sum_du_xhat = sum_du.sum(0, keepdim=True), sum_du_xhat.sum(0, keepdim=True)
    if fused and not param_grads:
        return dx, None, None, d_scale, d_shift, d_res
    dweight, dbias, coef = finalize_grad(
        red, torch.stack([sum_du, sum_du_xhat])[:, None].contiguous(), 1, mean, rstd,
        weight=weight, use_input_stats=norm.use_input_stats, want_dx_coef=not fused,
        want_param_grads=param_grads,
    )  # fmt: skip
    if fused:
        return dx, dweight, dbias, d_scale, d_shift, d_res
    fwd_coef = None
    if epilogue.activation and not z_from_output:  # forward coefficients, as finalize_stats wrote
        mu = mean.repeat_interleave(red.group_size, dim=1)
        k_x = rstd.repeat_interleave(red.group_size, dim=1) * w
        fwd_coef = torch.stack([mu, k_x, torch.zeros_like(k_x), b.expand_as(k_x)]).contiguous()
    apply(
        dx, red, coef, x=x, dy=dy, dy_view=dy_view, epilogue_args=extras, fwd_coef=fwd_coef,
        d_residual=d_res,
    )  # fmt: skip
    return dx, dweight, dbias, d_scale, d_shift, d_res
