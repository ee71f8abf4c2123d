"""``python -m perf.soak``: a long training run's host side in the CPU emulation: plan caches,
resident memory and per-call host cost over many calls and many shapes (issue 24, item 1).

How: the emulated CUDA path of perf.hostcost (:func:`perf.hostcost.install`: Triton's real JIT
path and C launcher over a stub driver library, compilation stubbed, glibc keeping freed blocks;
:func:`perf.hostcost.route_cpu_tensors_to_triton`: CPU tensors take tritonnorm's Triton path).
No kernel runs: the inputs are ``torch.empty`` bf16 tensors whose pages are never touched, so
what grows is the host's state (plans, launches, replays, caches), not data.

What runs, in one process (``TRITON_INTERPRET`` unset: :func:`run_subprocess` starts it so):
1. **single shape**: ``tn.BatchNorm2d(16, momentum=None)`` in training mode (cumulative
   averaging: the momentum factor is 1/num_batches_tracked, a new value every step) on one input
   shape, :data:`REPEATED_SHAPE`, for ``--single-calls`` forward+backward calls, plans cleared
   before; the plan counts after it (one of each when momentum is not part of the plan key).
2. **rotation**: plans cleared, then ``--calls`` forward+backward calls of one
   ``tn.BatchNorm2d(16, momentum=None)`` layer, call i on shape i mod K of :func:`shapes`
   (K = ``--shapes``: batch 2-4, spatial sizes from 4x4 up, all distinct; by default more than
   the plan caches' bound, so that, strictly round-robin, every call misses and evicts: the
   most churn a bounded cache can see). Each call allocates its own x and dy, as a step does.
   Forward+backward, not the forward alone: the backward plans are a second cache, keyed per
   shape, and the emulated backward is cheap enough (measured at HEAD e3bbb83, before issue
   24's change, one shape: a cached-plan call ~100 us forward, ~250 us forward+backward; a
   momentum=None call, a new forward plan each, ~1.2 ms either way).
3. **samples**, before the rotation and after every 5% of it (not counted in ``--calls``):
   - ``forward_plans``, ``backward_plans``: ``tritonnorm.kernels.launch.plan_counts()`` (on a
     tritonnorm without it: the sizes of ``launch._forward_plans`` / ``_backward_plans``);
   - ``rss_mb``: resident memory after ``gc.collect()`` (``/proc/self/statm``). glibc keeps freed
     blocks here (hostcost's setting), so the malloc heap never shrinks: RSS reads as a
     high-water mark, and a plan kept per call shows as steady growth;
   - ``us_per_call_repeated``: CPU microseconds (``time.process_time``, gc paused) per
     forward+backward call of the rotating layer (momentum=None) on :data:`REPEATED_SHAPE` (not
     one of the rotation's), best of ``--blocks`` blocks of ``--block-calls`` calls after two
     warm calls (where the rotation evicted its plans, they re-plan);
     ``us_per_call_repeated_momentum`` the same for a second layer with momentum=0.1 (a fixed
     momentum: the cached-plan cost the momentum=None layer should match).
   Both timings add calls of their own; those are not counted in ``--calls``.

The plan caches' bound: ``--plan-cache-size N`` calls ``launch.set_plan_cache_size(N)`` where it
exists (``--quick`` sets 8); ``plan_cache_size`` in the report is the bound in force (from
``launch.PLAN_CACHE_SIZE`` when not set here), or null on a tritonnorm without bounded caches.

Measured on the 2-core machine, loaded (load average 4-6: timings within ~2x of each other):
- HEAD e3bbb83, before issue 24's change (K=64, no bound): 102,142 forward plans (one per call),
  65 backward; RSS 390 -> 918 (half) -> 1461 MB, so a forward plan of this layer holds ~10-20 KB
  (one shape, 2000 calls: 2000 plans, +39 MB); us_per_call_repeated ~1200-2000 against ~240-420
  with momentum 0.1 (every momentum=None call builds a plan); 5 min wall, 3.4 min CPU.
- after it, default (K=1280, bound 1024, every rotation call misses and evicts): 1024 plans each
  way from the first 5% on; RSS 372 -> 452 (5%) -> 470 (half) -> 471 MB (+0.7 MB in the second
  half); us_per_call_repeated equal to the momentum 0.1 layer's at every sample (264-464 us, 385
  first, 403 last); 7.8 min wall, 6 min CPU. With ``--shapes 64`` (no eviction): 65 plans each
  way, RSS +2 MB in all, 55 s.

JSON (``--json FILE``), schema 1::

    {"schema": 1, "tool": "perf.soak", "triton": str, "torch": str, "python": str,
     "plan_api": "plan_counts" | "dict sizes", "plan_cache_size": int | null,
     "calls": int, "shapes": int, "backward": true, "dtype": "bfloat16", "channels": int,
     "repeated_shape": [int], "blocks": int, "block_calls": int, "seconds": float,
     "single_shape": {"shape": [int], "calls": int, "forward_plans": int,
                      "backward_plans": int, "us_per_call": float},
     "samples": [{"call": int, "forward_plans": int, "backward_plans": int, "rss_mb": float,
                  "us_per_call_repeated": float, "us_per_call_repeated_momentum": float}],
     "summary": {"max_plans": int, "max_forward_plans": int, "max_backward_plans": int,
                 "rss_mb_first": float, "rss_mb_half": float, "rss_mb_last": float,
                 "rss_growth_mb_second_half": float, "us_first": float, "us_last": float}}

``call`` is the number of rotation calls made before the sample; ``seconds`` the run's wall
time (all phases). The full default run (100,000 calls) takes minutes: see ``--quick`` (a few
thousand calls, bound 8, 12 shapes) for the test suite's run (tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from perf import hostcost

DTYPE = torch.bfloat16
CHANNELS = 16
REPEATED_SHAPE = (8, CHANNELS, 32, 32)  # batch 8: never one of the rotation's (batch 2-4)
SAMPLES = 20  # one every 5% of the rotation, plus one before it
QUICK = dict(calls=2000, shapes=12, plan_cache_size=8, single_calls=200, blocks=3, block_calls=10)


def shapes(k: int) -> list[tuple[int, int, int, int]]:
    """K distinct (N, C, H, W): batch 2-4, H and W from 4 up (small: the host cost does not
    depend on the size, and untouched pages stay out of the resident set anyway)."""
    return [(2 + i % 3, CHANNELS, 4 + i // 24, 4 + i % 24) for i in range(k)]


def rss_mb() -> float:
    """Resident memory in MB, after a full collection (so that garbage is not counted)."""
    gc.collect()
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # no /proc: the peak instead (KB on Linux)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan_counts() -> dict[str, int]:
    """Cached plans, forward and backward: launch.plan_counts(), or the cache dicts' sizes on
    a tritonnorm from before it (to measure that state too)."""
    from tritonnorm.kernels import launch

    if hasattr(launch, "plan_counts"):
        return dict(launch.plan_counts())
    return {"forward": len(launch._forward_plans), "backward": len(launch._backward_plans)}


def plan_cache_size(requested: int | None) -> int | None:
    """Set the plans' bound where tritonnorm has one (``requested`` None: leave it); the bound
    in force, or None without bounded caches."""
    from tritonnorm.kernels import launch

    setter = getattr(launch, "set_plan_cache_size", None)
    if setter is None:
        if requested is not None:
            print(
                f"perf.soak: launch.set_plan_cache_size is missing: bound {requested} not set",
                file=sys.stderr,
            )
        return None
    if requested is not None:
        setter(requested)
        return requested
    return getattr(launch, "PLAN_CACHE_SIZE", None)


def clear_plans() -> None:
    from tritonnorm.kernels import launch

    launch.clear_plans()


def _layer(momentum: float | None):
    import tritonnorm as tn

    return tn.BatchNorm2d(CHANNELS, momentum=momentum, dtype=DTYPE).train()


def _step(layer, shape) -> None:
    """One training step's normalisation: forward, then the gradients of x, weight and bias
    (fresh x and dy, as a step's batch; ``torch.empty``: the emulation never reads them)."""
    x = torch.empty(shape, dtype=DTYPE, requires_grad=True)
    dy = torch.empty(shape, dtype=DTYPE)
    torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), dy)


def _repeated_us(layer, blocks: int, block_calls: int) -> float:
    """Best CPU microseconds per call on REPEATED_SHAPE (two warm calls first)."""
    _step(layer, REPEATED_SHAPE)
    _step(layer, REPEATED_SHAPE)
    call = lambda: _step(layer, REPEATED_SHAPE)
    return min(hostcost._block_us(call, block_calls) for _ in range(blocks))


def measure(
    calls: int = 100_000,
    k: int | None = None,
    bound: int | None = None,
    single_calls: int = 1000,
    blocks: int = 5,
    block_calls: int = 20,
    progress: bool = False,
) -> dict:
    """Run the soak (module docstring) in this process and return its report."""
    import triton

    from tritonnorm.kernels import launch

    start = time.perf_counter()
    hostcost.install()
    hostcost.route_cpu_tensors_to_triton()
    torch.set_num_threads(1)  # a host path is one thread; process_time counts every thread
    bound = plan_cache_size(bound)
    if k is None:  # more shapes than the bound holds, so that the rotation evicts
        k = 64 if bound is None else max(64, bound + max(16, bound // 4))
    rotation = shapes(k)

    clear_plans()
    single = _layer(None)
    t0 = time.process_time()
    for _ in range(single_calls):
        _step(single, REPEATED_SHAPE)
    single_us = (time.process_time() - t0) / max(single_calls, 1) * 1e6
    counts = plan_counts()
    single_report = {
        "shape": list(REPEATED_SHAPE),
        "calls": single_calls,
        "forward_plans": counts["forward"],
        "backward_plans": counts["backward"],
        "us_per_call": single_us,
    }
    del single

    clear_plans()
    layer, fixed = _layer(None), _layer(0.1)
    marks = sorted({round(calls * j / SAMPLES) for j in range(SAMPLES + 1)})
    samples = []
    done = 0
    for mark in marks:
        for i in range(done, mark):
            _step(layer, rotation[i % k])
        done = mark
        us = _repeated_us(layer, blocks, block_calls)
        us_fixed = _repeated_us(fixed, blocks, block_calls)
        counts = plan_counts()  # after the timing calls: their plans count too
        samples.append(
            {
                "call": mark,
                "forward_plans": counts["forward"],
                "backward_plans": counts["backward"],
                "rss_mb": rss_mb(),
                "us_per_call_repeated": us,
                "us_per_call_repeated_momentum": us_fixed,
            }
        )
        if progress:
            print(_row(samples[-1]), file=sys.stderr, flush=True)

    half = min(samples, key=lambda s: abs(s["call"] - calls / 2))
    summary = {
        "max_forward_plans": max(s["forward_plans"] for s in samples),
        "max_backward_plans": max(s["backward_plans"] for s in samples),
        "rss_mb_first": samples[0]["rss_mb"],
        "rss_mb_half": half["rss_mb"],
        "rss_mb_last": samples[-1]["rss_mb"],
        "rss_growth_mb_second_half": samples[-1]["rss_mb"] - half["rss_mb"],
        "us_first": samples[0]["us_per_call_repeated"],
        "us_last": samples[-1]["us_per_call_repeated"],
    }
    summary["max_plans"] = max(summary["max_forward_plans"], summary["max_backward_plans"])
    return {
        "schema": 1,
        "tool": "perf.soak",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "plan_api": "plan_counts" if hasattr(launch, "plan_counts") else "dict sizes",
        "plan_cache_size": bound,
        "calls": calls,
        "shapes": k,
        "backward": True,
        "dtype": str(DTYPE).removeprefix("torch."),
        "channels": CHANNELS,
        "repeated_shape": list(REPEATED_SHAPE),
        "blocks": blocks,
        "block_calls": block_calls,
        "seconds": time.perf_counter() - start,
        "single_shape": single_report,
        "samples": samples,
        "summary": summary,
    }


def _row(s: dict) -> str:
    return (
        f"{s['call']:>9d} {s['forward_plans']:>9d} {s['backward_plans']:>9d} "
        f"{s['rss_mb']:>9.1f} {s['us_per_call_repeated']:>10.1f} "
        f"{s['us_per_call_repeated_momentum']:>10.1f}"
    )


def format_table(report: dict) -> str:
    single, summary = report["single_shape"], report["summary"]
    bound = report["plan_cache_size"]
    lines = [
        f"perf.soak: Triton {report['triton']}, torch {report['torch']}; BatchNorm2d("
        f"{report['channels']}, momentum=None) forward+backward, {report['calls']} calls over "
        f"{report['shapes']} shapes; plan bound {bound if bound is not None else 'none'} "
        f"({report['plan_api']}); {report['seconds']:.0f} s",
        f"single shape {tuple(single['shape'])}, {single['calls']} calls: "
        f"{single['forward_plans']} forward / {single['backward_plans']} backward plans, "
        f"{single['us_per_call']:.1f} us/call",
        f"{'call':>9s} {'fwd plans':>9s} {'bwd plans':>9s} {'rss MB':>9s} "
        f"{'us (None)':>10s} {'us (0.1)':>10s}",
        *(_row(s) for s in report["samples"]),
        f"max plans {summary['max_plans']}; RSS {summary['rss_mb_first']:.1f} -> "
        f"{summary['rss_mb_half']:.1f} (half) -> {summary['rss_mb_last']:.1f} MB, second half "
        f"{summary['rss_growth_mb_second_half']:+.1f} MB; us per repeated call "
        f"{summary['us_first']:.1f} -> {summary['us_last']:.1f}",
        f"us: CPU time per forward+backward call on {tuple(report['repeated_shape'])}, best of "
        f"{report['blocks']} x {report['block_calls']}; (None) the rotating momentum=None "
        "layer, (0.1) a layer with a fixed momentum",
    ]
    return "\n".join(lines)


def run_subprocess(
    json_path: Path, *args: str, python: str = sys.executable, timeout: float = 600
) -> dict:
    """``python -m perf.soak --json json_path *args`` in a fresh process with the interpreter
    off (for callers whose process has it on, e.g. the test suite); the report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [python, "-m", "perf.soak", "--json", str(json_path), *args]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(Path(json_path).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perf.soak",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--calls", type=int, help="rotation calls (default 100000)")
    parser.add_argument("--shapes", type=int, help="K, shapes in the rotation (default: bound+)")
    parser.add_argument("--plan-cache-size", type=int, help="set the plans' bound first")
    parser.add_argument("--single-calls", type=int, help="calls on one shape (default 1000)")
    parser.add_argument("--blocks", type=int, help="timed blocks per sample (default 5)")
    parser.add_argument("--block-calls", type=int, help="calls per timed block (default 20)")
    parser.add_argument("--quick", action="store_true", help=f"the test's run: {QUICK}")
    parser.add_argument("--progress", action="store_true", help="each sample to stderr")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if reason := hostcost.unavailable():
        print(f"perf.soak: cannot emulate here: {reason}", file=sys.stderr)
        return 2
    given = {
        "calls": args.calls, "shapes": args.shapes, "plan_cache_size": args.plan_cache_size,
        "single_calls": args.single_calls, "blocks": args.blocks, "block_calls": args.block_calls,
    }  # fmt: skip
    defaults = dict(QUICK) if args.quick else dict(calls=100_000, single_calls=1000)
    opts = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    report = measure(
        calls=opts["calls"],
        k=opts.get("shapes"),
        bound=opts.get("plan_cache_size"),
        single_calls=opts["single_calls"],
        blocks=opts.get("blocks", 5),
        block_calls=opts.get("block_calls", 20),
        progress=args.progress,
    )
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
