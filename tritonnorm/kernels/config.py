"""Launch configurations: the autotune space, the interpreter's fixed choice, and test overrides.

Every tuned kernel goes through :class:`TunedKernel`. On a GPU it is a ``triton.autotune`` whose
candidate list is generated per shape (by ``early_config_prune``), so the split factor and block
sizes are timed and the winner is cached per shape key. Under ``TRITON_INTERPRET=1`` there is no
driver to time with, so the first candidate (the heuristic choice) is launched directly.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Elements of one streaming tile, and the most elements one program may hold in registers when a
# whole reduction (an instance, or a small BN channel) is normalised on chip.
STREAM_TILES = (1024, 2048, 4096)
FUSED_TILE_LIMIT = 32768
# Programs per SM the split reduction aims for: enough waves to hide DRAM latency.
PROGRAMS_PER_SM = 4
MAX_SPLIT = 1024


@dataclass
class _Overrides:
    fused: bool | None = None
    split: int | None = None


_overrides = _Overrides()
_chosen: dict[str, str] = {}


@contextlib.contextmanager
def forced(fused: bool | None = None, split: int | None = None) -> Iterator[None]:
    """Force the kernel path (for tests): ``fused=False`` always splits the reduction, ``split=k``
    uses k programs per channel/instance. ``fused=True`` fuses wherever the reduction fits a tile.
    Forced configs bypass autotuning."""
    previous = _Overrides(_overrides.fused, _overrides.split)
    _overrides.fused, _overrides.split = fused, split
    try:
        yield
    finally:
        _overrides.fused, _overrides.split = previous.fused, previous.split


def chosen_configs() -> dict[str, str]:
    """The config of the most recent launch of each kernel (for reports)."""
    return dict(_chosen)


def reset_chosen_configs() -> None:
    _chosen.clear()


@dataclass(frozen=True)
class Shape:
    """What classifies a launch: the (N, C, S) view, whether channels are the fast axis, and
    whether statistics are per instance (IN) or per channel (BN)."""

    N: int
    C: int
    S: int
    channels_fast: bool
    per_instance: bool


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _warps(tile: int) -> int:
    return 4 if tile <= 2048 else 8 if tile <= 8192 else 16


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs() -> int:
    """How many programs a split reduction should launch in total."""
    if INTERPRET or not torch.cuda.is_available():
        return 4  # interpreted programs run one after another: few, large ones
    return PROGRAMS_PER_SM * _sm_count(torch.cuda.current_device())


def _blocks(shape: Shape, tile: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, BLOCK_S) streaming over a tile of about `tile` elements, laid out so
    the memory-contiguous axis is the tile's long axis."""
    if shape.channels_fast:
        block_c = min(_pow2(shape.C), 64)
        return 1, block_c, max(1, min(_pow2(shape.S), tile // block_c))
    block_s = min(_pow2(shape.S), tile)
    rest = max(1, tile // block_s)
    if shape.per_instance:  # several instances (adjacent rows) per program when S is short
        return 1, min(_pow2(shape.C), rest), block_s
    return min(_pow2(shape.N), rest), 1, block_s


def fused_blocks(shape: Shape) -> tuple[int, int, int] | None:
    """Blocks holding a whole reduction in one tile, or None when it does not fit."""
    if _overrides.fused is False:
        return None
    reduced_n = 1 if shape.per_instance else _pow2(shape.N)
    extent = reduced_n * _pow2(shape.S)
    if extent > FUSED_TILE_LIMIT:
        return None
    block_c = min(_pow2(shape.C), max(1, FUSED_TILE_LIMIT // extent), 64)
    if shape.channels_fast:
        if block_c < min(_pow2(shape.C), 4):
            return None  # under 16-byte channel runs, loads would not coalesce: split instead
    else:
        block_c = min(block_c, max(1, 4096 // extent))  # rows per program: keep some parallelism
    return reduced_n, block_c, _pow2(shape.S)


def _split_candidates(shape: Shape, blocks: tuple[int, int, int]) -> list[int]:
    block_n, block_c, block_s = blocks
    kept = triton.cdiv(shape.C, block_c) * (
        triton.cdiv(shape.N, block_n) if shape.per_instance else 1
    )
    tiles = triton.cdiv(shape.S, block_s) * (
        1 if shape.per_instance else triton.cdiv(shape.N, block_n)
    )
    if _overrides.split is not None:
        return [max(1, _overrides.split)]
    base = max(1, min(tiles, MAX_SPLIT, triton.cdiv(target_programs(), kept)))
    return sorted({base, max(1, base // 2), min(tiles, MAX_SPLIT, base * 2)})


def reduction_configs(shape: Shape, fused: bool) -> list[triton.Config]:
    """Candidates for the statistics / gradient-sum kernels, heuristic choice first."""
    if fused:
        blocks = fused_blocks(shape)
        assert blocks is not None
        tile = blocks[0] * blocks[1] * blocks[2]
        kw = dict(zip(("BLOCK_N", "BLOCK_C", "BLOCK_S"), blocks, strict=True), SPLIT=1)
        return [triton.Config(kw, num_warps=w) for w in sorted({_warps(tile), 2 * _warps(tile)})]
    configs = []
    for tile in (4096, *STREAM_TILES[:-1]) if not INTERPRET else (4096,):
        blocks = _blocks(shape, tile)
        for split in _split_candidates(shape, blocks):
            kw = dict(zip(("BLOCK_N", "BLOCK_C", "BLOCK_S"), blocks, strict=True), SPLIT=split)
            configs.append(triton.Config(kw, num_warps=_warps(tile)))
    return _unique(configs)


def apply_configs(shape: Shape) -> list[triton.Config]:
    """Candidates for the elementwise apply kernel (y or dx), heuristic choice first."""
    tiles = (4096,) if INTERPRET else (2048, 4096, 1024)
    configs = []
    for tile in tiles:
        blocks = _blocks(Shape(shape.N, shape.C, shape.S, shape.channels_fast, True), tile)
        kw = dict(zip(("BLOCK_N", "BLOCK_C", "BLOCK_S"), blocks, strict=True))
        configs.append(triton.Config(kw, num_warps=_warps(tile)))
    return _unique(configs)


def _unique(configs: list[triton.Config]) -> list[triton.Config]:
    seen, out = set(), []
    for cfg in configs:
        ident = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps)
        if ident not in seen:
            seen.add(ident)
            out.append(cfg)
    return out


def describe(config: triton.Config) -> str:
    parts = [f"{k}={v}" for k, v in sorted(config.kwargs.items())]
    return " ".join([*parts, f"warps={config.num_warps}"])


class TunedKernel:
    """A ``@triton.jit`` kernel launched with per-shape candidate configs.

    ``launch(grid, candidates, *args, **kwargs)`` runs the kernel and returns the config used.
    ``grid`` is a function of the config's meta-parameters. The kernel must be idempotent (no
    state updates): autotuning runs every candidate several times.
    """

    # Placeholders: triton.autotune only tunes when it holds more than one config; the real
    # candidates are generated per shape by the prune hook.
    _PLACEHOLDERS: ClassVar[list[triton.Config]] = [
        triton.Config({}, num_warps=4),
        triton.Config({}, num_warps=8),
    ]

    def __init__(self, fn, key: list[str]):
        self.fn = fn
        self.name = fn.__name__
        self._candidates: list[triton.Config] = []
        self.tuned = triton.autotune(
            configs=self._PLACEHOLDERS,
            key=key,
            prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: self._candidates},
        )(fn)

    def launch(
        self, grid: Callable[[dict], tuple[int, ...]], candidates: list[triton.Config], *args, **kw
    ) -> triton.Config:
        self._candidates = candidates
        if INTERPRET or len(candidates) == 1 or _overrides != _Overrides():
            config = candidates[0]
            self.fn[grid](*args, **kw, **config.all_kwargs())
        else:
            self.tuned[grid](*args, **kw)
            config = self.tuned.best_config
        _chosen[self.name] = describe(config)
        return config
