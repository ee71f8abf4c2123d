"""Which candidate config a launch uses (config.py generates the candidates).

**By default nothing is timed.** A launch uses the features its class of launches won on this
GPU architecture in the committed table ``tuned/<arch>.json`` (made by
``python -m perf.tuning_table`` from perf.gpu's tuning.csv: H100 today), and the heuristic
candidate where the table has no entry (other GPUs, other classes). The first call of a new
shape then costs what any call costs, plus compiling kernels Triton has not cached.

**Autotuning is opt-in**: ``TRITONNORM_AUTOTUNE=1``, or ``tritonnorm.autotune(True)`` (also a
context manager). The first launch of each class of shape then times its candidates (5 ms
warm-up and 25 ms each), and the winner's features are kept for the process and written to
``$TRITONNORM_CACHE_DIR`` (default ``~/.cache/tritonnorm``), one JSON file per GPU name and
Triton release, keyed by the kernel's source hash, its flags and a bucketed shape (the batch
rounded up to a power of two: a smaller last batch does not re-tune). Later processes with
autotuning on read that file instead of timing again. Nothing is timed while a CUDA graph is
being captured, nor under the interpreter (no driver to time with).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import triton

from . import config
from .config import Candidates, Features
from .lru import LRU

if TYPE_CHECKING:
    from .geometry import Reduction

# Read once (a call's host path must not scan the environment); autotune() changes it.
_enabled = os.environ.get("TRITONNORM_AUTOTUNE", "0") not in ("", "0")
# (kernel, flags, bucket) -> the winning features, this process (bounded as the plans are;
# the buckets round shapes to powers of two, so a run rarely holds many)
_tuned: LRU = LRU(4096)
_persist = True
# What autotuning measured: (kernel, tune key, config, median ms, chosen), for reports.
_log: list[tuple[str, str, str, float, bool]] = []
_LOG_MAX = 20000
_TABLES = Path(__file__).with_name("tuned")


class autotune(contextlib.ContextDecorator):
    """Switch autotuning on (or off) for the process, or within a ``with`` block:
    ``tritonnorm.autotune(True)``; ``with tritonnorm.autotune(): ...``."""

    def __init__(self, enabled: bool = True):
        global _enabled
        self._previous = _enabled
        self.enabled = bool(enabled)
        _enabled = self.enabled

    def __enter__(self):
        global _enabled
        _enabled = self.enabled
        return self

    def __exit__(self, *exc):
        global _enabled
        _enabled = self._previous
        return False


def enabled() -> bool:
    return _enabled


def tuning_log() -> list[tuple[str, str, str, float, bool]]:
    """Every timed candidate, as (kernel, tune key, config, median ms, chosen)."""
    return list(_log)


@contextlib.contextmanager
def tuning_discarded() -> Iterator[None]:
    """Within the block, timing results are neither kept nor written to disk. For launches that
    only record their specialisations (perf.compile_check, perf.gpu's warm stage): their
    "timings" are of no kernel (on the first H100 run such results became the GPU's choice)."""
    global _persist
    saved, logged, persist = dict(_tuned), len(_log), _persist
    _persist = False
    try:
        yield
    finally:
        _persist = persist
        del _log[logged:]
        _tuned.clear()
        _tuned.update(saved)


# --- the committed tables --------------------------------------------------------------------


def _arch(device: torch.device) -> str | None:
    if device.type != "cuda" or config.INTERPRET:
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@functools.cache
def _table(arch: str | None) -> dict[tuple, Features]:
    """rule class -> features, from tuned/<arch>.json (empty when there is none)."""
    path = _TABLES / f"{arch}.json"
    if arch is None or not path.exists():
        return {}
    rules = json.loads(path.read_text())["rules"]
    return {
        (r["kernel"], r["fused"], r["channels_fast"], r["reduce_batch"]): Features(**r["features"])
        for r in rules
    }


def rule_class(kernel: str, shape: Reduction, fused: bool) -> tuple:
    """The class a table rule applies to."""
    return (kernel, fused, shape.channels_fast, shape.reduce_batch)


# --- the on-disk cache of autotuned winners --------------------------------------------------


def _cache_path(device: torch.device) -> Path:
    name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")
    root = Path(os.environ.get("TRITONNORM_CACHE_DIR", Path.home() / ".cache" / "tritonnorm"))
    return root / f"tuning-{name}-triton{triton.__version__}.json"


@functools.cache
def _disk(path: Path) -> dict[str, dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _disk_key(key: tuple, source: str) -> str:
    return json.dumps([key[0], source, *key[1:]], default=str)


def _save(path: Path, disk_key: str, features: Features) -> None:
    entries = _disk(path)
    entries[disk_key] = asdict(features)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
        tmp.replace(path)  # atomic: concurrent processes never see half a file
    except OSError:
        pass  # a read-only home: the result is still kept for this process


# --- the decision ------------------------------------------------------------------------------


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def choose(
    kernel,
    candidates: Candidates,
    *,
    shape: Reduction,
    fused: bool,
    flags: tuple,
    bucket: tuple,
    device: torch.device,
    bench: Callable[[triton.Config], None] | None = None,
) -> triton.Config:
    """The config of one launch: forced (tests) or single -> the first candidate; else a
    result autotuned in this process; else, with autotuning on, the on-disk result or a new
    timing (``bench(config)`` runs the launch once); else the committed table's rule; else the
    heuristic (first) candidate."""
    configs = candidates.configs
    if len(configs) == 1 or config.INTERPRET or config._overrides != config._Overrides():
        return configs[0]
    key = (kernel.name, flags, bucket)
    features = _tuned.lookup(key)
    if features is None and enabled():
        persist = _persist and device.type == "cuda"
        path = _cache_path(device) if persist else None
        disk_key = _disk_key(key, kernel.fn.cache_key) if persist else None
        stored = _disk(path).get(disk_key) if persist else None
        if stored is not None:
            features = _tuned[key] = Features(**stored)
        elif bench is not None and not _capturing():
            features = _tuned[key] = _time(kernel.name, key, candidates, bench)
            if persist:
                _save(path, disk_key, features)
    if features is None:
        features = _table(_arch(device)).get(rule_class(kernel.name, shape, fused))
    return candidates.pick(features)


def _benchmarker():
    from triton.runtime import driver

    return driver.active.get_benchmarker()


def _time(name: str, key: tuple, candidates: Candidates, bench: Callable) -> Features:
    benchmarker = _benchmarker()
    timings = {}
    for cfg in candidates.configs:
        t = benchmarker(lambda cfg=cfg: bench(cfg), quantiles=None, warmup=5, rep=25)
        timings[cfg] = float(t[0] if isinstance(t, list | tuple) else t)
    best = min(timings, key=timings.get)
    for cfg, ms in timings.items():
        if len(_log) < _LOG_MAX:
            _log.append((name, repr(key), config.describe(cfg), ms, cfg is best))
    return next(f for f, cfg in candidates.features.items() if cfg is best)
