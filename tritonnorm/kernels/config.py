"""Launch configurations: the shape classes, block sizes, the candidate configs of each launch
(with the :class:`Features` that name them across shapes) and test overrides.

Which candidate a launch uses is tuning.py's decision: the committed per-GPU table or the
heuristic by default, a timed choice when autotuning is switched on. Under
``TRITON_INTERPRET=1`` there is no driver to time with: the heuristic choice is launched.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import torch
import triton

if TYPE_CHECKING:  # every ``shape`` here is a geometry.Reduction (which imports this module)
    from .geometry import Reduction

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _index_loop_bounds_as_scalars() -> None:
    """Triton 3.6's interpreter turns a runtime loop bound (``range(t_begin, t_end)``) into an
    int with ``int(array of shape (1,))``, which NumPy 2.4 made an error. Convert it as Triton
    3.7 and later do (``int(array.squeeze())``). Only the interpreter is touched; compiled
    kernels are not affected."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_tritonnorm_fixed", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._tritonnorm_fixed = True
    interpreter._patch_lang_tensor = patched


if INTERPRET and tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
    _index_loop_bounds_as_scalars()

# Elements of one streaming tile, and the most accumulator bytes one program may hold in
# registers when a whole reduction (an instance, or a small BN channel) is normalised on chip.
# Forward: 16384 fp32 values over 16 warps, 32 per thread. The gradient kernel holds two tiles
# (x_hat, dy): half as many. Larger tiles spill on sm_90: `python -m perf.compile_check`.
STREAM_TILES = (1024, 2048, 4096)
FUSED_TILE_BYTES = 65536
FUSED_GRAD_TILE_BYTES = 32768
# Element offsets are int32 (half the registers of int64) while a tensor spans fewer elements
# than this: tiles overhanging the tensor's end stay below 2**31 too.
INT32_SPAN = 2**30
# Warps per program at most: 32 warps leave 64 registers per thread, and fused tiles spill.
MAX_WARPS = 16
# Programs per SM the split reduction aims for: enough waves to hide DRAM latency.
PROGRAMS_PER_SM = 4
MAX_SPLIT = 1024
# The apply pass combines the partials of a split reduction itself (no finalize launch) while
# there are at most this many per statistic: every apply program re-reads its channels' partials.
FOLD_MAX_PARTIALS = 32
# Compiler options of every launch, pinned rather than inherited: Triton 3.10 turns fused
# multiply-add contraction off by default, which would change results between versions.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


class _Overrides(NamedTuple):  # part of every plan key: a tuple hashes in C
    fused: bool | None = None
    split: int | None = None
    index_64: bool | None = None
    lanes: bool | None = None


_overrides = _Overrides()
_chosen: dict[str, triton.Config] = {}


@contextlib.contextmanager
def forced(
    fused: bool | None = None,
    split: int | None = None,
    index_64: bool | None = None,
    lanes: bool | None = None,
) -> Iterator[None]:
    """Force the kernel path (for tests): ``fused=False`` always splits the reduction, ``split=k``
    uses k programs per channel/instance. ``fused=True`` fuses wherever the reduction fits a tile.
    ``index_64=True`` uses int64 element offsets whatever the size. ``lanes`` picks the streamed
    reductions' accumulation (per-element, or per-tile summaries). Forced configs bypass
    autotuning."""
    global _overrides
    previous = _overrides
    _overrides = _Overrides(fused, split, index_64, lanes)
    try:
        yield
    finally:
        _overrides = previous


def index_64(span: int) -> bool:
    """Whether element offsets of a tensor spanning ``span`` elements need int64."""
    return _overrides.index_64 if _overrides.index_64 is not None else span >= INT32_SPAN


def chosen_configs() -> dict[str, str]:
    """The config of the most recent launch of each kernel (for reports)."""
    return {name: describe(config) for name, config in _chosen.items()}


def reset_chosen_configs() -> None:
    _chosen.clear()


def cdiv(a: int, b: int) -> int:
    # Plain integer arithmetic, as _pow2: triton.cdiv is a jit-aware function, slow on the host.
    return -(-a // b)


def _pow2(n: int) -> int:
    # Plain bit arithmetic: triton.next_power_of_2 is a jit-aware function, ~10x slower per call
    # on the host, and the launchers call this dozens of times per op.
    return 1 << (max(int(n), 1) - 1).bit_length()


def _warps(tile: int) -> int:
    return 4 if tile <= 2048 else 8 if tile <= 8192 else MAX_WARPS


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs() -> int:
    """How many programs a split reduction should launch in total."""
    if INTERPRET or not torch.cuda.is_available():
        return 4  # interpreted programs run one after another: few, large ones
    return PROGRAMS_PER_SM * _sm_count(torch.cuda.current_device())


Blocks = tuple[int, int, int, int]  # (BLOCK_N, BLOCK_G, BLOCK_K, BLOCK_S)


def _blocks(shape: Reduction, tile: int) -> Blocks:
    """Blocks streaming over a tile of about ``tile`` elements (whole groups of channels), laid
    out so the memory-contiguous axis is the tile's long axis."""
    block_k = _pow2(shape.group_size)
    if shape.channels_fast:
        block_g = max(1, min(_pow2(shape.groups), 64 // block_k))
        return 1, block_g, block_k, max(1, min(_pow2(shape.S), tile // (block_g * block_k)))
    block_s = min(_pow2(shape.S), max(1, tile // block_k))
    rest = max(1, tile // (block_s * block_k))
    if shape.reduce_batch:
        return min(_pow2(shape.N), rest), 1, block_k, block_s
    # several statistics (adjacent groups) per program when groups are short
    return 1, min(_pow2(shape.groups), rest), block_k, block_s


def fused_blocks(shape: Reduction, backward: bool = False, epilogue: bool = False) -> Blocks | None:
    """Blocks holding whole reductions in one tile (for the statistics kernel, or for the
    gradient kernel when ``backward``), or None when one does not fit. An ``epilogue``
    (residual tile, activation) takes the gradient kernel's smaller limit: at the forward's, an
    erf GELU spilled on sm_90."""
    if _overrides.fused is False:
        return None
    return _fused_blocks(shape, backward, epilogue)


@functools.lru_cache(maxsize=4096)
def _fused_blocks(shape: Reduction, backward: bool, epilogue: bool) -> Blocks | None:
    small = backward or epilogue
    limit = (FUSED_GRAD_TILE_BYTES if small else FUSED_TILE_BYTES) // shape.acc_bytes
    if backward and epilogue:  # x, dy, the residual, z, g and du live together: half again
        limit //= 2
    block_k = _pow2(shape.group_size)
    reduced_n = _pow2(shape.N) if shape.reduce_batch else 1
    extent = reduced_n * block_k * _pow2(shape.S)  # one statistic's elements, padded
    if extent > limit:
        return None
    block_g = min(_pow2(shape.groups), max(1, limit // extent), max(1, 64 // block_k))
    if shape.channels_fast:
        # Each position's run of channels must be read whole (4 channels, 16 bytes in fp32, or
        # all of them) or shared by two adjacent programs, which run together and meet in L2.
        # Narrower slices would fetch each sector several times: split instead.
        block_c = block_g * block_k
        if block_c < min(_pow2(shape.C), 4) and 2 * block_c < _pow2(shape.C):
            return None
    else:
        block_g = min(block_g, max(1, 4096 // extent))  # statistics per program: keep parallelism
    return reduced_n, block_g, block_k, _pow2(shape.S)


def _split_candidates(
    shape: Reduction, blocks: Blocks, programs: int, forced_split: int | None
) -> list[tuple[str, int]]:
    """(rank, split) of the split factors to try: the heuristic's, half and twice it."""
    block_n, block_g, _, block_s = blocks
    s_tiles = cdiv(shape.S, block_s)
    n_blocks = cdiv(shape.N, block_n)
    kept = cdiv(shape.groups, block_g) * (1 if shape.reduce_batch else n_blocks)
    tiles = s_tiles * (n_blocks if shape.reduce_batch else 1)
    if forced_split is not None:
        return [("base", max(1, forced_split))]
    base = max(1, min(tiles, MAX_SPLIT, cdiv(programs, kept)))
    return [("base", base), ("low", max(1, base // 2)), ("high", min(tiles, MAX_SPLIT, base * 2))]


_BLOCK_NAMES = ("BLOCK_N", "BLOCK_G", "BLOCK_K", "BLOCK_S")


@dataclass(frozen=True)
class Features:
    """What distinguishes the candidates of one launch, whatever its shape: the nominal tile
    (elements per program and step; 0 when a whole reduction is one tile), per-element
    accumulation (``lanes``), the split relative to the heuristic's (``"low"``: half,
    ``"base"``, ``"high"``: twice) and the warps (``"low"`` or ``"high"`` of two options).
    Measured winners are stored as features (the committed tables, the autotune cache), so a
    winner applies to every shape of its class."""

    tile: int
    lanes: bool = False
    split: str = "base"
    warps: str = "low"


@dataclass(frozen=True, eq=False)
class Candidates:
    """A launch's candidate configs, the rule-less heuristic choice first, and the features of
    each (several features may name one config when candidates coincide)."""

    configs: tuple[triton.Config, ...]
    features: dict[Features, triton.Config]

    def pick(self, features: Features | None) -> triton.Config:
        if features is None:
            return self.configs[0]
        return self.features.get(features, self.configs[0])


def _candidates(pairs: list[tuple[Features, triton.Config]]) -> Candidates:
    seen: dict[tuple, triton.Config] = {}
    features = {}
    for feat, cfg in pairs:
        ident = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps)
        cfg = seen.setdefault(ident, cfg)
        features.setdefault(feat, cfg)
    return Candidates(tuple(seen.values()), features)


def reduction_configs(
    shape: Reduction, fused: bool, backward: bool = False, epilogue: bool = False
) -> Candidates:
    """Candidates for the statistics / gradient-sum kernels, heuristic choice first. With an
    ``epilogue`` the streamed gradient-sum tiles are halved, quartered for float64 (recomputing
    the pre-activation and a GELU's derivative spilled on sm_90 at the plain tiles). Cached per
    shape (and test override and device size)."""
    return _reduction_configs(shape, fused, backward, epilogue, _overrides, target_programs())


@functools.lru_cache(maxsize=4096)
def _reduction_configs(
    shape: Reduction,
    fused: bool,
    backward: bool,
    epilogue: bool,
    overrides: _Overrides,
    programs: int,
) -> Candidates:
    if fused:
        blocks = fused_blocks(shape, backward, epilogue)
        assert blocks is not None
        words = math.prod(blocks) * shape.acc_bytes // 4  # 32-bit registers
        kw = dict(zip(_BLOCK_NAMES, blocks, strict=True), SPLIT=1, LANES=False)
        low, high = _warps(words), min(2 * _warps(words), MAX_WARPS)
        return _candidates(
            [(Features(0, warps=rank), triton.Config(kw, num_warps=w))
             for rank, w in (("low", low), ("high", high))]
        )  # fmt: skip
    pairs = []
    tiles = (4096, *STREAM_TILES[:-1]) if not INTERPRET else (4096,)
    # Both accumulations (per-tile summaries; per-element lanes, LANES) for the two largest
    # tiles: the first H100 run left channels_last statistics at a quarter of copy bandwidth with
    # per-tile summaries, which reduce across threads on every tile.
    # float64 lanes take a quarter of the tile: three accumulators of two registers per value
    # spilled at 4096 and 2048 values per program on sm_90 (16 values per thread).
    lanes_options = (False, True) if overrides.lanes is None else (overrides.lanes,)
    for i, nominal in enumerate(tiles):
        tile = nominal
        if epilogue:  # float64 values take two registers each: a quarter
            tile = nominal // (2 * shape.acc_bytes // 4)
        for lanes in lanes_options if i < 2 else lanes_options[:1]:
            blocks = _blocks(shape, tile // 4 if lanes and shape.acc_bytes == 8 else tile)
            warps = _warps(math.prod(blocks))
            for rank, split in _split_candidates(shape, blocks, programs, overrides.split):
                kw = dict(zip(_BLOCK_NAMES, blocks, strict=True), SPLIT=split, LANES=lanes)
                pairs.append((Features(nominal, lanes, rank), triton.Config(kw, num_warps=warps)))
    return _candidates(pairs)


@functools.lru_cache(maxsize=4096)
def apply_configs(shape: Reduction, epilogue: bool = False) -> Candidates:
    """Candidates for the elementwise apply kernel (y or dx), heuristic choice first. It reads
    per-(sample, channel) coefficients: tiles as for one-channel statistics of each sample. With
    an ``epilogue``, float64 tiles are halved (a GELU's recomputed derivative spilled)."""
    per_channel = replace(shape, group_size=1, reduce_batch=False)
    pairs = []
    for nominal in (4096,) if INTERPRET else (2048, 4096, 1024):
        tile = nominal // (shape.acc_bytes // 4) if epilogue else nominal
        block_n, block_c, _, block_s = _blocks(per_channel, tile)
        kw = {"BLOCK_N": block_n, "BLOCK_C": block_c, "BLOCK_S": block_s}
        pairs.append((Features(nominal), triton.Config(kw, num_warps=_warps(tile))))
    return _candidates(pairs)


def max_split(shape: Reduction, fused: bool, backward: bool = False, epilogue: bool = False) -> int:
    """The largest split among a reduction's candidates (its partials buffer's size)."""
    candidates = reduction_configs(shape, fused, backward, epilogue)
    return max(c.kwargs["SPLIT"] for c in candidates.configs)


# Statistics across the channels at each position (positions.py): a program holds whole channel
# vectors for BLOCK_S positions, at most this many 32-bit words of them (float64: half as many
# values). Set by the static sm_90 check (perf/results/sm90-static): the backward with partial
# sums spilled on contiguous tensors at 8192 (BLOCK_C >= 512), not at 4096; float64 with an
# epilogue spilled (2048 channels backward, an erf GELU forward), so it takes half again; the
# forward with an epilogue takes half its tile (a GELU spilled 4 B at 16384 words, 16 warps).
POSITION_TILE_WORDS = {"forward": 16384, "backward": 4096, "backward_epilogue": 4096}
# Partial sums of the backward (dweight, dbias) may cost at most this fraction of one pass over
# the input (read and written once each); the split is capped accordingly.
POSITION_PARTIAL_PASSES = 0.05


def _position_values(backward: bool, epilogue: bool, acc_bytes: int) -> int:
    """Values of the statistics' dtype one program of the kernels across channels holds."""
    kind = "forward" if not backward else "backward_epilogue" if epilogue else "backward"
    values = POSITION_TILE_WORDS[kind] * 4 // acc_bytes
    if epilogue and not backward:  # an erf GELU forward spilled at the full tile (96 channels)
        values //= 2
    if acc_bytes == 8 and epilogue:
        values //= 2
    return values


def position_max_channels(acc_bytes: int, epilogue: bool) -> int:
    """The most channels the kernels across channels hold in one program, forward and backward
    (more than these go to torch's composition: functional.layer_norm_2d)."""
    return _position_values(True, epilogue, acc_bytes)


def position_configs(
    shape: Reduction, backward: bool, epilogue: bool = False, sums: bool = False,
    per_sample: bool = False,
) -> Candidates:  # fmt: skip
    """Candidates for the kernels across channels (positions.py), heuristic choice first:
    BLOCK_S positions of whole channel vectors (BLOCK_S halved as an alternative), and for a
    backward with partial sums the programs per row of partials (``SPLIT``; 0: one program per
    tile, no sums), capped so the partials stay within POSITION_PARTIAL_PASSES of a pass."""
    return _position_configs(
        shape, backward, epilogue, sums, per_sample, _overrides, target_programs()
    )


def _position_split(shape: Reduction, block_s: int, per_sample: bool, programs: int,
                    forced_split: int | None) -> list:  # fmt: skip
    if forced_split is not None:
        return [("base", max(1, forced_split))]
    tiles = cdiv(shape.S, block_s) * (1 if per_sample else shape.N)
    rows = shape.N if per_sample else 1
    # a pass over the smallest input these statistics serve (half types for fp32 ones)
    pass_bytes = shape.N * shape.C * shape.S * shape.acc_bytes // 2
    partial_bytes = 4 * rows * shape.C * shape.acc_bytes  # two sums, written and read
    cap = max(1, int(POSITION_PARTIAL_PASSES * pass_bytes) // partial_bytes)
    base = max(1, min(tiles, cdiv(programs, rows), cap))
    return [("base", base), ("high", min(tiles, MAX_SPLIT, 4 * base))]


@functools.lru_cache(maxsize=4096)
def _position_configs(
    shape: Reduction, backward: bool, epilogue: bool, sums: bool, per_sample: bool,
    overrides: _Overrides, programs: int,
) -> Candidates:  # fmt: skip
    values = _position_values(backward, epilogue, shape.acc_bytes)
    block_c = _pow2(shape.C)
    block_s = max(1, min(_pow2(shape.S), values // block_c))
    pairs = []
    for nominal, bs in ((values, block_s), (values // 2, max(1, block_s // 2))):
        tile = block_c * bs * shape.acc_bytes // 4
        # the epilogue backward holds x, dy, the residual, z, g and du: warps for twice the tile
        # (a float64 GELU at 1024 channels spilled at 4 warps)
        warps = _warps(2 * tile if backward and epilogue else tile)
        splits = [("base", 0)]  # no sums: one program per tile
        if sums:
            splits = _position_split(shape, bs, per_sample, programs, overrides.split)
        for rank, split in splits:
            kw = {"BLOCK_C": block_c, "BLOCK_S": bs}
            if backward:  # the forward kernel has no split (compiled, an unknown keyword fails)
                kw["SPLIT"] = split
            for w_rank, w in (("low", warps), ("high", min(2 * warps, MAX_WARPS))):
                pairs.append((Features(nominal, split=rank, warps=w_rank),
                              triton.Config(kw, num_warps=w)))  # fmt: skip
    return _candidates(pairs)


# The finalize kernels: one small tile of (rows, groups, channels of a group) per program.
FINALIZE_TILE = 1024
FINALIZE_CHANNELS = 128


@functools.lru_cache(maxsize=4096)
def finalize_blocks(rows: int, groups: int, group_size: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_G, BLOCK_K) of the finalize kernels."""
    block_k = _pow2(group_size)
    block_g = min(_pow2(groups), max(1, FINALIZE_CHANNELS // block_k))
    block_r = min(_pow2(rows), max(1, FINALIZE_TILE // (block_g * block_k)))
    return block_r, block_g, block_k


def describe(config: triton.Config) -> str:
    parts = [f"{k}={v}" for k, v in sorted(config.kwargs.items())]
    return " ".join([*parts, f"warps={config.num_warps}"])
