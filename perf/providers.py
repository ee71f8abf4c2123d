"""Who runs an op: tritonnorm, torch eager, torch.compile, and Triton peers when installed.

``Provider.prepare(op)`` returns a function with the op's signature (or None when the provider
has no kernel for that op) and is called once per (op, shape, layout, dtype): torch.compile
compiles once per shape there. ``Provider.context()`` wraps every step (FlagGems routes aten ops
to its kernels inside ``flag_gems.use_gems()``, backward included).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from perf.ops import OpSpec


@dataclass
class Provider:
    name: str
    prepare: Callable[[OpSpec], Callable | None]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    note: str = ""  # why some ops are not covered


def _compiled(op: OpSpec) -> Callable:
    import torch

    # A fresh compilation per shape: without the reset, Dynamo's per-function cache would reach
    # its recompile limit across shapes/dtypes/layouts and silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(op.torch_fn, mode="default", dynamic=False)


def _flag_gems(op: OpSpec) -> Callable:
    return op.peers.get("flag_gems", op.torch_fn)


def _flag_gems_context():
    import flag_gems

    return flag_gems.use_gems()


def available(names: list[str] | None = None, log: Callable[[str], None] = print) -> list[Provider]:
    """The providers to run, printing a line for each one skipped and why."""
    provs = [
        Provider("tritonnorm", lambda op: op.tn_fn),
        Provider("eager", lambda op: op.torch_fn),
        Provider("compile", _compiled),
    ]
    if importlib.util.find_spec("flag_gems") is not None:
        provs.append(
            Provider(
                "flag_gems",
                _flag_gems,
                _flag_gems_context,
                "aten ops routed through flag_gems.use_gems(); an op FlagGems does not "
                "implement runs as aten there",
            )
        )
    else:
        log("flag_gems: not installed, skipped")
    if importlib.util.find_spec("liger_kernel") is not None:
        provs.append(
            Provider(
                "liger_kernel",
                lambda op: op.peers.get("liger_kernel"),
                note="Liger-Kernel has no batch_norm/instance_norm kernels",
            )
        )
        log(
            "liger_kernel: installed, but it has no batch_norm/instance_norm kernels; "
            "it runs only for ops that declare a liger_kernel peer"
        )
    else:
        log("liger_kernel: not installed, skipped (it has no batch_norm/instance_norm anyway)")
    if names:
        unknown = set(names) - {p.name for p in provs}
        for name in sorted(unknown):
            log(f"{name}: not available, skipped")
        provs = [p for p in provs if p.name in names]
    return provs
