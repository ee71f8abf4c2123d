"""How a normalisation sees its input: which statistics (:class:`Norm`), the tensor as (N, C, S)
(:class:`View`), and the two together (:class:`Reduction`), from which every launch's grid and
every config choice (config.py) is made. Plans (launch.py) build them once per kind of call."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import config


class Norm(NamedTuple):
    """Which statistics a normalisation uses: BatchNorm reduces the batch and spatial axes per
    channel (``Norm(reduce_batch=True)``), InstanceNorm the spatial axes per sample and channel
    (``Norm(reduce_batch=False)``), GroupNorm the spatial axes and C / ``num_groups`` channels per
    sample (``Norm(reduce_batch=False, num_groups=G)``; LayerNorm over (C, *spatial) is G = 1).
    ``num_groups=0`` means one statistic per channel. Without input statistics the running
    statistics are used: per channel, shared by the whole batch. (A named tuple: every call
    hashes one in its plan key.)"""

    reduce_batch: bool
    num_groups: int = 0
    use_input_stats: bool = True
    # One statistic per (sample, position) over all C channels (LayerNorm2d; positions.py),
    # centred, or with ``centred=False`` the root mean square (RMSNorm2d).
    per_position: bool = False
    centred: bool = True

    @property
    def batch_reduced(self) -> bool:
        """Whether one statistic serves every sample."""
        return self.reduce_batch or not self.use_input_stats

    def stats_shape(self, input_shape: Sequence[int]) -> tuple[int, int]:
        """(rows, groups) of the saved mean and rstd for an input of ``input_shape``: (N,
        positions) across channels."""
        if self.per_position:
            return (input_shape[0], math.prod(input_shape[2:]))
        groups = self.num_groups if self.num_groups and self.use_input_stats else input_shape[1]
        return (1 if self.batch_reduced else input_shape[0], groups)


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
class Reduction:
    """One normalisation of one tensor, as every launch and every config choice sees it: the
    (N, C, S) view (for a reduced batch axis possibly folded into S), ``group_size``
    consecutive channels per statistic, whether the batch axis is reduced too, and statistics
    arrays of ``rows`` x ``groups``. config.py chooses blocks and candidates from it (its sizes,
    ``channels_fast``, ``acc_bytes``)."""

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

    # What config.py classifies a launch by (read through these names).
    @property
    def N(self) -> int:
        return self.view.N

    @property
    def C(self) -> int:
        return self.view.C

    @property
    def S(self) -> int:
        return self.view.S

    @property
    def channels_fast(self) -> bool:
        return self.view.channels_fast

    @property
    def acc_bytes(self) -> int:
        """Bytes of the accumulator (4, or 8 for float64 input): what a program can hold in
        registers depends on it."""
        return self.acc_dtype.itemsize

    @classmethod
    def of(cls, N: int, C: int, S: int, group_size: int = 1, reduce_batch: bool = False,
           channels_fast: bool = False, dtype: torch.dtype = torch.float32) -> Reduction:  # fmt: skip
        """The reduction of a dense (N, C, S) tensor, contiguous or channels last (tests, the
        tuning table)."""
        strides = (S * C, 1, C) if channels_fast else (C * S, S, 1)
        return cls(View(N, C, S, *strides), group_size, reduce_batch, dtype)

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
def reduction_of(
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
    if norm.per_position:  # one group of every channel, statistics per position
        return Reduction(view, view.C, False, dtype)
    groups = norm.stats_shape(sizes)[1]
    return Reduction(view, view.C // max(groups, 1), norm.batch_reduced, dtype)


def plan(x: torch.Tensor, norm: Norm, fold_batch: bool = True) -> tuple[torch.Tensor, Reduction]:
    """x (densified if needed: one copy, documented) and the :class:`Reduction` of ``norm`` over
    it. ``fold_batch=False`` keeps the sample axis even when the batch is reduced (per-sample
    scale/shift need it)."""
    if not is_dense(x):
        x = x.contiguous()
    fold = norm.batch_reduced and fold_batch
    return x, reduction_of(tuple(x.shape), x.stride(), x.dtype, norm, fold)


def _other_view(t: torch.Tensor, x_view: View) -> View | None:
    """A tensor of x's shape (dy, a residual) seen with x's (N, C, S) geometry through its own
    strides, or None when they cannot express it (it is then copied into x's layout)."""
    view = _flat_view(tuple(t.shape), t.stride())
    if view is not None and (view.N, view.S) == (x_view.N, x_view.S):
        return view
    # x's batch axis may have been folded into S: t must fold the same way.
    foldable = view is not None and (view.S == 1 or view.stride_n == view.S * view.stride_s)
    if foldable and x_view.N == 1:
        stride_s = view.stride_n if view.S == 1 else view.stride_s
        return View(1, view.C, view.N * view.S, 0, view.stride_c, stride_s)
    return None


def same_offsets(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one shape place every element at the same offset (the strides of
    size-1 axes never matter, as to torch)."""
    return all(
        n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True)
    )


def view_or_copy(t: torch.Tensor, x_view: View) -> tuple[View, bool]:
    """A tensor of x's shape (dy, a residual) seen with x's geometry, and whether it must be
    copied into x's layout first (then it is seen as x is)."""
    view = _other_view(t, x_view)
    return (x_view, True) if view is None else (view, False)


def grad_view(dy: torch.Tensor, x: torch.Tensor, x_view: View) -> tuple[torch.Tensor, View]:
    """dy seen with x's (N, C, S) geometry: its own strides where possible, else a copy in x's
    layout."""
    view = _other_view(dy, x_view)
    if view is not None:
        return dy, view
    dy = torch.empty_like(x, dtype=dy.dtype).copy_(dy)
    return dy, View(x_view.N, x_view.C, x_view.S, *x_view.strides)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are fp32 for every input dtype but float64, which keeps fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def result_dtype(dtype: torch.dtype, *extras: torch.Tensor | None) -> torch.dtype:
    """The output's dtype for input of ``dtype`` with epilogue tensors ``extras`` (scale, shift,
    residual; None where absent): promoted as torch's composition ``norm(x) * scale + shift +
    residual`` promotes."""
    for t in extras:
        if t is not None and t.dtype != dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype
