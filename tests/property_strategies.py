"""Hypothesis strategies for tests/test_properties.py: what one differential example is made of.

A :class:`Case` is plain data (printable, and pasteable into ``@example``): the op and its
settings, the logical shape, dtypes, which epilogue extras, a seed for the values, and a
:class:`Layout` (strides and storage offset) for each of x, dy and the residual. The values are
drawn once per case in float64 from the seed, rounded to their dtypes, and then materialised in
each layout, so every layout holds exactly the same logical tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HALF = (torch.float16, torch.bfloat16)
ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu", "gelu_tanh")

MAX_SIZE = 5  # of each spatial axis
MAX_CHANNELS = 9
MAX_BATCH = 4
# Caps on numel drawn per example: the interpreter runs each program in Python, one after the
# other, so most examples stay small and a few reach the largest cap.
NUMEL_CAPS = (48, 160, 600)


# --------------------------------------------------------------------------------------------
# Ops: what the strategies need to know to draw legal inputs


@dataclass(frozen=True)
class Op:
    name: str
    # which values one statistic is computed from, when torch needs more than one of them:
    # "batch" (N x spatial, BN training), "instance" (spatial, IN with input statistics),
    # "group" (torch's group_norm checks N x C/G x spatial), None (no check)
    stat: str | None
    buffers: bool = False  # takes running_mean / running_var
    updates: bool = False  # and updates them (else reads them: must stay bitwise unchanged)
    bias: bool = True
    min_spatial: int = 0  # spatial axes, at least

    def legal(self, shape: tuple[int, ...], groups: int | None) -> bool:
        spatial = math.prod(shape[2:])
        values = {
            "batch": shape[0] * spatial,
            "instance": spatial,
            "group": shape[0] * (shape[1] // (groups or 1)) * spatial,
            None: 2,
        }[self.stat]
        return values > 1

    def legalise(self, shape: tuple[int, ...], groups: int | None) -> tuple[int, ...]:
        """``shape``, or where torch rejects it (one value per statistic) the nearest it takes:
        two spatial values for IN, else a batch of two."""
        if self.legal(shape, groups):
            return shape
        if self.stat == "instance":
            return (*shape[:-1], 2)
        return (2, *shape[1:])


OPS = {
    op.name: op
    for op in (
        Op("bn-train", "batch", buffers=True, updates=True),
        Op("bn-train-nobuf", "batch"),  # track_running_stats=False
        Op("bn-eval", None, buffers=True),
        Op("in", "instance", min_spatial=1),
        Op("in-running", "instance", buffers=True, updates=True, min_spatial=1),
        Op("in-running-eval", None, buffers=True),  # use_input_stats=False
        Op("gn", "group"),
        Op("ln2d", None),
        Op("rms2d", None, bias=False),
    )
}
DEFAULT_EPS = {"ln2d": 1e-6, "rms2d": 1e-6}  # the others: 1e-5


# --------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class Layout:
    """Strides and storage offset of a tensor of a given shape. A stride of 0 on an axis longer
    than 1 is a broadcast (``expand``): the values must be constant along it. ``how`` says how
    the strategy built it (for reading a failure; not used)."""

    strides: tuple[int, ...]
    offset: int = 0
    how: str = ""

    @staticmethod
    def contiguous(shape) -> Layout:
        return Layout.build(shape, tuple(range(len(shape))), how="contiguous")

    @staticmethod
    def channels_last(shape) -> Layout:
        return Layout.build(shape, channels_last_order(len(shape)), how="channels_last")

    @staticmethod
    def build(shape, order, *, steps=None, pads=None, offset=0, broadcast=(), unit_strides=None,
              how="") -> Layout:  # fmt: skip
        """Dense in ``order`` (axes outermost first), then: every ``steps[d]``-th element of an
        axis ``pads[d]`` longer (a slice of a bigger tensor), ``broadcast`` axes with stride 0,
        ``unit_strides`` ({axis: stride}) on axes of size 1, where any stride addresses the same
        elements."""
        rank = len(shape)
        steps = steps or (1,) * rank
        pads = pads or (0,) * rank
        strides = [0] * rank
        extent = 1
        for d in reversed(order):
            if d in broadcast:
                continue
            strides[d] = extent * steps[d]
            extent *= shape[d] * steps[d] + pads[d]
        for d, stride in (unit_strides or {}).items():
            assert shape[d] == 1, "only a size-1 axis can take any stride"
            strides[d] = stride
        return Layout(tuple(strides), offset, how)

    def broadcast_axes(self, shape) -> tuple[int, ...]:
        return tuple(d for d, (n, s) in enumerate(zip(shape, self.strides, strict=True))
                     if s == 0 and n > 1)  # fmt: skip

    def materialise(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` in this layout, in a storage of NaN (a stray read of an element outside the
        view shows as NaN)."""
        shape = values.shape
        extent = self.offset + sum((n - 1) * s for n, s in zip(shape, self.strides, strict=True))
        storage = torch.full((extent + 1,), math.nan, dtype=values.dtype, device=values.device)
        out = storage.as_strided(shape, self.strides, self.offset)
        # write each distinct element once: index 0 along the broadcast axes
        one = tuple(slice(0, 1) if d in self.broadcast_axes(shape) else slice(None)
                    for d in range(len(shape)))  # fmt: skip
        out[one].copy_(values[one])
        assert torch.equal(out, values), f"{self} cannot hold these values (not constant?)"
        return out


def channels_last_order(rank: int) -> tuple[int, ...]:
    """N outermost, C innermost, the spatial axes between (any rank; (N, C) is contiguous)."""
    return (0, *range(2, rank), 1)


def dim_orders(rank: int) -> st.SearchStrategy[tuple[int, ...]]:
    """The axes outermost first: contiguous, channels last, or any permutation."""
    return st.one_of(
        st.just(tuple(range(rank))),
        st.just(channels_last_order(rank)),
        st.permutations(range(rank)).map(tuple),
    )


@st.composite
def slicings(draw, shape) -> dict:
    """A view ``big[o0::s0, o1::s1, ...]`` of a bigger tensor: steps, extra length, offset."""
    rank = len(shape)
    steps = draw(st.lists(st.sampled_from((1, 1, 2, 3)), min_size=rank, max_size=rank))
    pads = draw(st.lists(st.integers(0, 2), min_size=rank, max_size=rank))
    offset = draw(st.integers(0, 7))
    return dict(steps=tuple(steps), pads=tuple(pads), offset=offset)


def broadcasts(shape) -> st.SearchStrategy[frozenset[int]]:
    """Axes (longer than 1) to expand from size 1: stride 0."""
    longer = [d for d, n in enumerate(shape) if n > 1]
    return st.frozensets(st.sampled_from(longer), min_size=1) if longer else st.just(frozenset())


def unit_strides(shape) -> st.SearchStrategy[dict[int, int]]:
    """Any stride on the size-1 axes: small, zero or huge (beyond int32)."""
    ones = [d for d, n in enumerate(shape) if n == 1]
    stride = st.one_of(st.integers(0, 64), st.sampled_from((1000, 2**31 - 1, 2**31, 2**40)))
    return st.fixed_dictionaries({d: stride for d in ones})


sometimes = st.sampled_from((False, False, True))  # about one in three


@st.composite
def layouts(draw, shape) -> Layout:
    """A dim order, then sometimes sliced, expanded (x too: torch's forward takes it) and with
    any strides on size-1 axes."""
    rank = len(shape)
    order = draw(dim_orders(rank))
    how = {tuple(range(rank)): "contiguous", channels_last_order(rank): "channels_last"}.get(
        order, "permuted"
    )
    parts = dict(order=order)
    if draw(sometimes):
        parts.update(draw(slicings(shape)))
        how += "+sliced"
    if any(n > 1 for n in shape) and draw(sometimes):
        parts["broadcast"] = draw(broadcasts(shape))
        how += "+expanded"
    if 1 in shape and draw(sometimes):
        parts["unit_strides"] = draw(unit_strides(shape))
        how += "+size1_strides"
    return Layout.build(shape, how=how, **parts)


# --------------------------------------------------------------------------------------------
# Shapes


def sizes(hi: int) -> st.SearchStrategy[int]:
    """1..hi with 1 frequent (size-1 axes are where layouts are ambiguous)."""
    return st.just(1) if hi <= 1 else st.one_of(st.just(1), st.integers(2, hi))


@st.composite
def shapes(draw, min_spatial: int = 0, max_spatial: int = 3) -> tuple[int, ...]:
    """(N, C, *spatial), numel within a drawn cap."""
    cap = draw(st.sampled_from(NUMEL_CAPS))
    n = draw(sizes(MAX_BATCH))
    c = draw(st.integers(1, min(MAX_CHANNELS, cap // n)))
    shape = [n, c]
    for _ in range(draw(st.integers(min_spatial, max_spatial))):
        shape.append(draw(sizes(min(MAX_SIZE, cap // math.prod(shape)))))
    return tuple(shape)


def divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


# --------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Case:
    """One example of tests/test_properties.py::test_matches_torch."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    param_dtype: torch.dtype | None = None  # weight, bias, running statistics (None: dtype)
    groups: int | None = None  # GroupNorm
    weight: bool = True
    bias: bool = True
    momentum: float = 0.1
    eps: float | None = None  # None: the op's default
    # the epilogue: the dtype of each extra given (None: not given), the activation
    scale: torch.dtype | None = None
    shift: torch.dtype | None = None
    residual: torch.dtype | None = None
    activation: str | tuple | None = None
    # layouts (None: contiguous)
    x_layout: Layout | None = None
    dy_layout: Layout | None = None
    residual_layout: Layout | None = None
    # values: x = randn * x_std + x_mean (per element; constant along x's broadcast axes)
    seed: int = 0
    x_std: float = 1.0
    x_mean: float = 0.0

    @property
    def spec(self) -> Op:
        return OPS[self.op]

    def layout(self, name: str) -> Layout:
        layout = getattr(self, f"{name}_layout")
        return layout if layout is not None else Layout.contiguous(self.shape)

    @property
    def params(self) -> torch.dtype:
        return self.param_dtype or self.dtype

    @property
    def epsilon(self) -> float:
        return self.eps if self.eps is not None else DEFAULT_EPS.get(self.op, 1e-5)

    @property
    def out_dtype(self) -> torch.dtype:
        """torch's composition: the norm in x's dtype, then type promotion with each extra."""
        out = self.dtype
        for extra in (self.scale, self.shift, self.residual):
            if extra is not None:
                out = torch.promote_types(out, extra)
        return out

    @property
    def mixed(self) -> bool:
        return any(e not in (None, self.dtype) for e in (self.scale, self.shift, self.residual))

    def values(self) -> dict[str, torch.Tensor]:
        """The logical values, each rounded to its dtype (CPU)."""
        gen = torch.Generator().manual_seed(self.seed)
        N, C = self.shape[:2]
        randn = lambda shape, layout=None: logical_randn(gen, shape, layout)
        x = randn(self.shape, self.layout("x")) * self.x_std + self.x_mean
        v = {"x": x.to(self.dtype), "dy": randn(self.shape, self.layout("dy")).to(self.out_dtype)}
        pdt = self.params
        if self.weight:
            v["weight"] = (1 + 0.5 * randn((C,))).to(pdt)
        if self.bias and self.spec.bias:
            v["bias"] = randn((C,)).to(pdt)
        if self.spec.buffers:
            v["running_mean"] = (self.x_mean + 0.3 * self.x_std * randn((C,))).to(pdt)
            v["running_var"] = (self.x_std**2 * (0.5 + torch.rand(C, generator=gen))).to(pdt)
        if self.scale is not None:
            v["scale"] = (1 + 0.5 * randn((N, C))).to(self.scale)
        if self.shift is not None:
            v["shift"] = randn((N, C)).to(self.shift)
        if self.residual is not None:
            v["residual"] = randn(self.shape, self.layout("residual")).to(self.residual)
        return v


def logical_randn(gen: torch.Generator, shape, layout: Layout | None = None) -> torch.Tensor:
    """float64 randn of ``shape``, constant along ``layout``'s broadcast axes (so that it fits)."""
    base = list(shape)
    for d in layout.broadcast_axes(shape) if layout else ():
        base[d] = 1
    return torch.randn(base, generator=gen, dtype=torch.float64).expand(shape)


def activations() -> st.SearchStrategy:
    return st.one_of(
        st.none(),
        st.sampled_from(ACTIVATIONS),
        st.tuples(st.just("leaky_relu"), st.sampled_from((0.2, 0.0, -0.5, 1.5))),
    )


@st.composite
def extras(draw, dtype: torch.dtype) -> dict:
    """Epilogue extras: none (often), or any of scale, shift, residual, activation; each tensor
    in x's dtype or, often, another floating dtype."""
    if draw(st.booleans()):
        return {}
    extra_dtype = st.one_of(st.just(dtype), st.sampled_from(FLOATS))
    out = {k: draw(st.none() | extra_dtype) for k in ("scale", "shift", "residual")}
    out["activation"] = draw(activations())
    return out


@st.composite
def cases(draw) -> Case:
    op = draw(st.sampled_from(tuple(OPS)))
    spec = OPS[op]
    shape = draw(shapes(min_spatial=spec.min_spatial))
    groups = draw(st.sampled_from(divisors(shape[1]))) if op == "gn" else None
    shape = spec.legalise(shape, groups)
    dtype = draw(st.sampled_from(FLOATS))
    param_dtype = draw(st.sampled_from((None, torch.float32))) if dtype in HALF else None
    ext = draw(extras(dtype))
    x_std = draw(st.sampled_from((1.0, 0.01, 30.0)))
    return Case(
        op=op,
        shape=shape,
        dtype=dtype,
        param_dtype=param_dtype,
        groups=groups,
        weight=draw(st.booleans()),
        bias=draw(st.booleans()),
        momentum=draw(st.sampled_from((0.1, 0.0, 1.0, 0.3))),
        eps=draw(st.sampled_from((None, 1e-3))),
        x_layout=draw(layouts(shape)),
        dy_layout=draw(layouts(shape)),
        residual_layout=draw(layouts(shape)) if ext.get("residual") else None,
        seed=draw(st.integers(0, 2**32 - 1)),
        x_std=x_std,
        x_mean=x_std * draw(st.sampled_from((0.0, 1.0, -3.0))),
        **ext,
    )


# --------------------------------------------------------------------------------------------
# BatchNorm modules stepped in training (momentum None: cumulative average)


@dataclass(frozen=True)
class Step:
    training: bool
    x_layout: Layout
    dy_layout: Layout


@dataclass(frozen=True)
class ModuleCase:
    """tests/test_properties.py::test_batch_norm_modules: tn.BatchNorm{dims}d against torch's."""

    dims: int  # 1, 2, 3
    shape: tuple[int, ...]
    steps: tuple[Step, ...]
    dtype: torch.dtype = torch.float32
    momentum: float | None = None
    affine: bool = True
    seed: int = 0


@st.composite
def module_cases(draw) -> ModuleCase:
    dims = draw(st.sampled_from((1, 2, 3)))
    spatial = {1: (0, 1), 2: (2, 2), 3: (3, 3)}[dims]  # BatchNorm1d: (N, C) or (N, C, L)
    shape = OPS["bn-train"].legalise(draw(shapes(spatial[0], spatial[1])), None)
    n_train = draw(st.integers(2, 3))
    trainings = [True] * n_train + [draw(st.booleans())]  # then an eval step, or another
    steps = tuple(
        Step(t, draw(layouts(shape)), draw(layouts(shape))) for t in trainings
    )  # fmt: skip
    return ModuleCase(
        dims=dims,
        shape=shape,
        steps=steps,
        dtype=draw(st.sampled_from(FLOATS)),
        momentum=draw(st.sampled_from((None, None, 0.1, 0.5))),
        affine=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )
