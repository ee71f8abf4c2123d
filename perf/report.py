"""The report: every op x shape x layout x dtype x provider, checked, then timed.

Providers: tritonnorm, torch eager, torch.compile of the same torch function (one compiled
function per op, ``dynamic=False``, recompiled per shape), FlagGems when installed. Each
provider's outputs, gradients and running statistics are first checked against torch in float64
by the test suite's rule (tests/tolerances.py); a mismatch is recorded and not timed.

GPU mode: median of ``triton.testing.do_bench``, input sets rotated so the working set is several
times L2: the time per call as a user calls it, the host's launch overhead included when it
exceeds the GPU's time. Besides it, on CUDA only: the time per call replayed from a CUDA graph
(``triton.testing.do_bench_cudagraph``: the GPU's time without the host's overhead; one input
set, see ``graph_timer``) and the peak memory one call allocates (``peak_mib``).

CPU mode (no GPU, ``--cpu``, and ``python -m perf.gpu --dry-run``): tritonnorm through Triton's
interpreter, a perf_counter timer, small shapes: NOT a GPU measurement (no graph time, no peak
memory). It also counts the bytes each tritonnorm stage moves (perf/bytecount.py) against its
floor (PERF.md).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import importlib.util
import itertools
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from perf.ops import OpSpec
from perf.shapes import shape_str

ROOT = Path(__file__).resolve().parents[1]
CPU_BANNER = "CPU MODE (Triton interpreter, perf_counter timer): NOT A GPU MEASUREMENT"
L2_ROTATE_BYTES = 4 * 50 * 2**20  # several times an H100's L2 (50 MB)


@functools.cache
def tolerances():
    """tests/tolerances.py, the suite's one tolerance table, imported by path."""
    spec = importlib.util.spec_from_file_location("tolerances", ROOT / "tests" / "tolerances.py")
    module = sys.modules.setdefault("tolerances", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


def check(got: tuple, ref: tuple, same: tuple) -> str | None:
    """None when ``got`` is as close to the float64 ``ref`` as the suite allows (``same``: torch
    in the input dtype, the half-precision yardstick), else why not."""
    if len(got) != len(ref):
        return f"{len(got)} outputs, expected {len(ref)}"
    for i, (g, r, s) in enumerate(zip(got, ref, same, strict=True)):
        try:
            tolerances().assert_close_to_reference(g, r.to(g.device), torch_same_dtype=s,
                                                   name=f"output {i}")  # fmt: skip
        except AssertionError as e:
            return str(e).splitlines()[0][:200]
    return None


def error(e: BaseException) -> str:
    return f"ERROR: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


# --- providers, timers, environment ----------------------------------------------------------


@functools.cache
def _compiled(op: OpSpec) -> Callable:
    # One compiled function per op: Dynamo recompiles per shape/dtype/layout (dynamic=False);
    # the recompile limit is raised so that it never silently falls back to eager.
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 512))
    return torch.compile(op.torch_fn, dynamic=False)


def providers(names: list[str] | None = None) -> dict[str, Callable]:
    """name -> (op -> (function, context manager factory)); FlagGems only when installed (aten
    ops routed through ``flag_gems.use_gems()``; Liger-Kernel has no BN/IN kernels)."""
    import contextlib

    provs = {
        "tritonnorm": lambda op: (op.tn_fn, contextlib.nullcontext),
        "eager": lambda op: (op.torch_fn, contextlib.nullcontext),
        "compile": lambda op: (_compiled(op), contextlib.nullcontext),
    }
    if importlib.util.find_spec("flag_gems") is not None:
        provs["flag_gems"] = lambda op: (op.torch_fn, __import__("flag_gems").use_gems)
    return {k: v for k, v in provs.items() if not names or k in names}


def gpu_timer(step: Callable) -> float:
    """Median milliseconds of ``triton.testing.do_bench`` (warm-up excluded, L2 flushed): wall
    time between events around each call, so the host's time to issue the launches when it is
    longer than the GPU's."""
    import triton.testing

    return float(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"))


GRAPH_REP_MS = 10  # do_bench_cudagraph's rep: one graph holds ~rep / (ms per eager call) calls,
# replayed 10 times: about 0.1 s per row where the GPU's time dominates


def graph_timer(step: Callable) -> float:
    """Median milliseconds per call of ``step`` replayed from one CUDA graph
    (``triton.testing.do_bench_cudagraph``, same signature in Triton 3.6 and 3.9): the GPU's
    time without the host's launch overhead.

    ``step`` must have run before: autotuning, Triton's JIT and torch.compile's compilation
    cannot happen inside a capture (do_bench_cudagraph runs it six more times on a side stream,
    then captures calls unrolled into one graph; a backward is captured with its forward). One
    input set: a graph replays the same tensors, so the inputs cannot be rotated through L2 as
    ``gpu_timer`` does; a working set under the L2's size is timed warm (the quick set's tensors
    are 42 MB and more, the H100's L2 50 MB)."""
    import gc

    import triton.testing

    # Triton 3.9 turns the garbage collector off during the capture, 3.6 does not: a collected
    # Triton kernel unloads its module, which is illegal while a stream is capturing.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return float(
            triton.testing.do_bench_cudagraph(step, rep=GRAPH_REP_MS, return_mode="median")
        )
    finally:
        if enabled:
            gc.enable()


def peak_mib(step: Callable) -> float:
    """MiB that one call of ``step`` allocates on the GPU at its peak above what was allocated
    before it (outputs, gradients, saved tensors, workspaces; the caching allocator's count)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


def saved_mib(fn: Callable, args: tuple) -> tuple[float, float]:
    """What autograd keeps for the backward of one forward ``fn(*args)``, by distinct storage
    (``torch.autograd.graph.saved_tensors_hooks``; any device): MiB in all, and MiB of storages
    that are neither an argument nor the output (what the op alone keeps alive; the caller holds
    its inputs, and the next layer its output)."""
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(*args)
    own = {t.untyped_storage().data_ptr() for t in (*args, y) if isinstance(t, torch.Tensor)}
    beyond = sum(n for ptr, n in saved.items() if ptr not in own)
    return sum(saved.values()) / 2**20, beyond / 2**20


def _clear_cuda_error() -> None:
    """A failed capture can leave CUDA's last error set, which the next eager launch's check
    would raise: absorb it here, in a launch of our own."""
    with contextlib.suppress(Exception):
        torch.zeros(1, device="cuda").add_(1)
    with contextlib.suppress(Exception):
        torch.cuda.synchronize()


def cpu_timer(step: Callable) -> float:
    """Milliseconds of one CPU run (after the checked one): plumbing only, not a GPU timing."""
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def copy_gbps(device: str, timer: Callable) -> float:
    """GB/s of a large device-to-device ``copy_``, counting the bytes read and written."""
    src = torch.randn((2**28 if device == "cuda" else 2**22), device=device)
    dst = src.clone()
    return 2 * src.numel() * 4 / (timer(lambda: dst.copy_(src)) * 1e-3) / 1e9


def environment(device: str) -> dict:
    import triton

    env = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version()}  # fmt: skip
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        try:
            smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            driver = subprocess.run(smi, capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            driver = ""
        env.update(gpu=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1), driver=driver.strip() or None,
                   l2_bytes=getattr(p, "L2_cache_size", None), cudnn=torch.backends.cudnn.version())  # fmt: skip
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


# --- one case --------------------------------------------------------------------------------


@dataclass
class Row:
    op: str
    layout: str
    dtype: str
    shape: str
    shape_class: str
    provider: str
    ms: float | None = None  # None: not timed (mismatch, error, or out of budget)
    gbps: float | None = None  # floor bytes / time
    frac_of_copy: float | None = None
    # CUDA only (None elsewhere, or with the reason in the note): median ms per call replayed from
    # a CUDA graph (no host overhead; one input set), its fraction of copy bandwidth, and the peak
    # MiB one call allocates above what was allocated before it
    graph_ms: float | None = None
    graph_frac_of_copy: float | None = None
    peak_mib: float | None = None
    # Ops with a backward, any device: MiB autograd keeps for it (distinct storages), and of
    # those neither an input nor the output (saved_mib)
    saved_mib: float | None = None
    saved_extra_mib: float | None = None
    first_call_s: float | None = None  # includes torch.compile's compilation / autotuning
    passes: str = ""  # CPU mode, tritonnorm: passes counted per stage / floor
    over_floor: bool = False
    note: str = ""  # tritonnorm's chosen configs; why the row (or its graph) was not timed


def gpu_extras(row: Row, step: Callable, floor_bytes: float, copy: float,
               graph: Callable = graph_timer, peak: Callable = peak_mib) -> None:  # fmt: skip
    """CUDA only: ``row.peak_mib``, then ``row.graph_ms`` and ``row.graph_frac_of_copy`` of a
    ``step`` that has run already. A failure leaves its field None and says why in the note
    ("peak: ...", "graph: ..."); the row keeps its other numbers."""
    why = lambda e: f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
    notes = []
    try:
        row.peak_mib = peak(step)
    except Exception as e:
        notes.append(f"peak: {why(e)}")
    try:
        row.graph_ms = graph(step)
        row.graph_frac_of_copy = floor_bytes / (row.graph_ms * 1e-3) / 1e9 / copy
    except Exception as e:  # autograd or a host sync under capture, an invalidated capture...
        row.graph_ms = row.graph_frac_of_copy = None
        notes.append(f"graph: {why(e)}")
        _clear_cuda_error()
    row.note = "; ".join([*notes, *([row.note] if row.note else [])])


def _counted(op: OpSpec, shape, inp) -> tuple[tuple, str, bool]:
    """The tritonnorm run of the CPU mode, with each stage's bytes counted (the backward alone)."""
    from perf.bytecount import count_bytes
    from perf.floors import L2_RESIDENT_BYTES, within_floor

    numel = math.prod(shape)
    x = inp.args[0]
    pass_bytes = numel * x.element_size()
    # per-position norms: their statistics (numel / C values) have a floor of their own, and the
    # per-channel vectors every program re-reads are counted once per launch (floors.py)
    stats_numel = numel // shape[1] if op.per_position else -1
    resident = L2_RESIDENT_BYTES if op.per_position else 0
    found, over, grads = [], False, ()
    with torch.set_grad_enabled(op.backward), count_bytes(audit_min_numel=numel) as fwd:
        y = op.tn_fn(*inp.args)
    counted = [(next(s for s in op.stages if s != "bwd"), fwd)]
    if op.backward:
        with count_bytes(audit_min_numel=numel) as bwd:
            grads = torch.autograd.grad(y, inp.grad_inputs, inp.dy)
        counted.append(("bwd", bwd))
    for stage, t in counted:
        floor = op.stage_floor(stage, shape)
        tiers = t.tiers(numel, stats_numel, resident)
        big, small = tiers["input"], tiers["stats"] + tiers["small"]
        allowed = op.small_passes(shape, x.dtype)
        bad = not within_floor(big, small, pass_bytes, floor, allowed) or bool(t.torch_ops)
        over |= bad
        found.append(f"{op.floor_stage(stage)} {t.passes(pass_bytes):.3f}/{floor}"
                     f"{' OVER' if bad else ''}")  # fmt: skip
    return (y, *grads, *inp.state), " ".join(found), over


def run_case(op: OpSpec, cls: str, shape, layout: str, dtype_name: str, device: str, provs: dict,
             copy: float, deadline: float = math.inf) -> list[Row]:  # fmt: skip
    """Check, then time, every provider on one case; none starts after ``deadline``. On CUDA
    also each provider's peak memory and its time under CUDA-graph replay (``gpu_extras``)."""
    from perf.ops import DTYPES

    dtype, timer = DTYPES[dtype_name], gpu_timer if device == "cuda" else cpu_timer
    floor_bytes = op.floor_passes(shape) * math.prod(shape) * dtype.itemsize
    base = op.inputs(shape, layout, dtype, device)
    rows = []
    try:
        ref = base.copy(torch.float64, contiguous=True).step(op.torch_fn, op.backward)()
        same = base.copy(contiguous=True).step(op.torch_fn, op.backward)()
        n_sets = 1 if device != "cuda" else max(1, min(8, math.ceil(L2_ROTATE_BYTES / floor_bytes)))
        sets = [base] + [op.inputs(shape, layout, dtype, device, seed=i) for i in range(1, n_sets)]
    except Exception as e:
        return [Row(op.name, layout, dtype_name, shape_str(shape), cls, p, note=error(e))
                for p in provs]  # fmt: skip
    for name, prepare in provs.items():
        row = Row(op.name, layout, dtype_name, shape_str(shape), cls, name)
        rows.append(row)
        if time.monotonic() > deadline:
            row.note = "not run: out of budget"
            continue
        try:
            fn, context = prepare(op)
            with context():
                if name == "tritonnorm":
                    __import__("tritonnorm.kernels.config").kernels.config.reset_chosen_configs()
                t0 = time.perf_counter()
                inp = base.copy()  # fresh running statistics: the reference's
                if name == "tritonnorm" and device == "cpu":
                    got, row.passes, row.over_floor = _counted(op, shape, inp)
                else:
                    got = inp.step(fn, op.backward)()
                row.first_call_s = time.perf_counter() - t0
                bad = check(got, ref, same)
                if bad:
                    row.note = f"MISMATCH vs float64 torch: {bad}"
                    continue
                steps = [s.copy().step(fn, op.backward) for s in sets]
                turn = itertools.count()  # rotate through the input sets
                row.ms = timer(lambda s=steps, t=turn: s[next(t) % len(s)]())
                if device == "cuda":  # one input set: a graph cannot rotate them
                    gpu_extras(row, steps[0], floor_bytes, copy)
                if op.backward:
                    try:
                        row.saved_mib, row.saved_extra_mib = saved_mib(fn, base.copy().args)
                    except Exception as e:  # e.g. hooks a compiled function refuses
                        row.note = "; ".join(filter(None, [f"saved: {error(e)}", row.note]))
        except Exception as e:
            row.note = error(e)
            continue
        row.gbps = floor_bytes / (row.ms * 1e-3) / 1e9
        row.frac_of_copy = row.gbps / copy
        if name == "tritonnorm":
            from tritonnorm.kernels import config

            chosen = [f"{k}: {v}" for k, v in sorted(config.chosen_configs().items())]
            row.note = "; ".join([*([row.note] if row.note else []), *chosen])
    return rows


# --- outputs ---------------------------------------------------------------------------------


def write_csv(rows: list, path: Path) -> None:
    """Dataclass rows as CSV (floats to 6 significant digits)."""
    with path.open("w", newline="") as f:
        names = [fl.name for fl in dataclasses.fields(rows[0])] if rows else ["empty"]
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v
                        for k, v in dataclasses.asdict(r).items()})  # fmt: skip


def speedups(rows: list[Row]) -> dict[tuple[str, str], list[float]]:
    """(op, provider) -> its time / tritonnorm's time, per case where both were timed."""
    ours = {(r.op, r.layout, r.dtype, r.shape): r.ms for r in rows
            if r.provider == "tritonnorm" and r.ms}  # fmt: skip
    out: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        mine = ours.get((r.op, r.layout, r.dtype, r.shape))
        if r.provider != "tritonnorm" and r.ms and mine:
            out.setdefault((r.op, r.provider), []).append(r.ms / mine)
    return out


def headline(rows: list[Row]) -> dict[str, float | None]:
    """Worst fraction of copy bandwidth (tritonnorm), per call and under CUDA-graph replay
    (None off CUDA), slowest speedup vs eager and vs compile."""
    ours = [r for r in rows if r.provider == "tritonnorm"]
    fracs = [r.frac_of_copy for r in ours if r.frac_of_copy]
    graph_fracs = [r.graph_frac_of_copy for r in ours if r.graph_frac_of_copy]
    sp = speedups(rows)
    slowest = {p: min((x for (_, q), xs in sp.items() if q == p for x in xs), default=None)
               for p in ("eager", "compile")}  # fmt: skip
    return {"worst_frac_of_copy": min(fracs, default=None),
            "worst_graph_frac_of_copy": min(graph_fracs, default=None),
            "min_vs_eager": slowest["eager"], "min_vs_compile": slowest["compile"]}  # fmt: skip


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else float("nan")


def summary_lines(rows: list[Row]) -> list[str]:
    """Per op: tritonnorm's fraction of copy bandwidth (per call, and under CUDA-graph replay),
    speedups; per op and provider (CUDA): times, host overhead and peak memory; byte counts,
    failures."""
    med = _median
    worst_med = lambda xs: f"{min(xs):.1%} / {med(xs):.1%}" if xs else "-"
    lines = ["| op | tritonnorm: worst / median fraction of copy | graph: worst / median "
             "fraction of copy | vs provider | n | min | median speedup |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    sp = speedups(rows)
    for op in dict.fromkeys(r.op for r in rows):
        ours = [r for r in rows if r.op == op and r.provider == "tritonnorm" and r.ms]
        frac = worst_med([r.frac_of_copy for r in ours])
        graph = worst_med([r.graph_frac_of_copy for r in ours if r.graph_frac_of_copy])
        for prov, xs in [(p, xs) for (o, p), xs in sp.items() if o == op] or [("-", [])]:
            lines.append(f"| {op} | {frac} | {graph} | {prov} | {len(xs)} | "
                         f"{min(xs, default=float('nan')):.3g}x | {med(xs):.3g}x |")  # fmt: skip
    gpu = [r for r in rows if r.ms and (r.graph_ms is not None or r.peak_mib is not None)]
    if gpu:
        lines += ["", "Per op and provider, medians over its timed cases: ms per call (do_bench, "
                  "as a user calls it), graph ms (CUDA-graph replay: the GPU's time), host "
                  "overhead (ms - graph ms, per case), peak MiB one call allocates.", "",
                  "| op | provider | n | ms | graph ms | host overhead ms | peak MiB |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        fmt = lambda xs, f: format(med(xs), f) if xs else "-"
        for op, prov in dict.fromkeys((r.op, r.provider) for r in gpu):
            mine = [r for r in gpu if r.op == op and r.provider == prov]
            timed = [r for r in mine if r.graph_ms is not None]
            lines.append(
                f"| {op} | {prov} | {len(mine)} | {fmt([r.ms for r in mine], '.4g')} | "
                f"{fmt([r.graph_ms for r in timed], '.4g')} | "
                f"{fmt([r.ms - r.graph_ms for r in timed], '.4g')} | "
                f"{fmt([r.peak_mib for r in mine if r.peak_mib is not None], '.1f')} |"
            )
    saved = [r for r in rows if r.saved_mib is not None]
    if saved:
        lines += ["", "Saved for the backward (saved_tensors_hooks, distinct storages), median "
                  "MiB per op and provider: in all / beyond the op's inputs and output.", "",
                  "| op | provider | n | saved MiB | beyond inputs and output MiB |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for op, prov in dict.fromkeys((r.op, r.provider) for r in saved):
            mine = [r for r in saved if r.op == op and r.provider == prov]
            lines.append(f"| {op} | {prov} | {len(mine)} | {med([r.saved_mib for r in mine]):.3g}"
                         f" | {med([r.saved_extra_mib for r in mine]):.3g} |")  # fmt: skip
    counted = [r for r in rows if r.passes]
    if counted:
        over = [r for r in counted if r.over_floor]
        lines += ["", f"Bytes counted under the interpreter (passes counted/floor per stage): "
                  f"{len(counted)} cases, {len(over)} over the floor."]  # fmt: skip
        lines += [f"- {r.op} {r.layout} {r.dtype} {r.shape}: {r.passes}" for r in counted]
    bad = [r for r in rows if r.ms is None]
    lines += ["", f"Not timed (mismatch, error or budget): {len(bad)}"]
    lines += [f"- {r.op} {r.layout} {r.dtype} {r.shape} {r.provider}: {r.note}" for r in bad]
    return lines


def write_plots(rows: list[Row], out: Path, banner: str = "") -> list[Path]:
    """fraction_of_copy.png (per op, against floor bytes) and speedup.png; none without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ops = list(dict.fromkeys(r.op for r in rows if r.ms))
    if not ops:
        return []
    fig, axes = plt.subplots(1, len(ops), figsize=(3.2 * len(ops), 3.4), squeeze=False)
    for ax, op in zip(axes[0], ops, strict=True):
        for prov in dict.fromkeys(r.provider for r in rows):
            mine = [r for r in rows if r.op == op and r.provider == prov and r.ms]
            numel = lambda r: math.prod(map(int, r.shape.split("x")))
            if not mine:
                continue
            dots = ax.scatter([numel(r) for r in mine], [r.frac_of_copy for r in mine],
                              label=prov, s=14)  # fmt: skip
            graph = [(numel(r), r.graph_frac_of_copy) for r in mine if r.graph_frac_of_copy]
            if graph:  # hollow, in the provider's colour: the same case without host overhead
                ax.scatter(*zip(*graph, strict=True), s=30, facecolors="none",
                           edgecolors=dots.get_facecolor()[:1], label=f"{prov} (graph)")  # fmt: skip
        ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
        ax.set(xscale="log", title=op, xlabel="elements")
    axes[0][0].set_ylabel("fraction of copy bandwidth\n(hollow: CUDA-graph replay)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(banner or "effective bandwidth at the byte floor / measured copy bandwidth")
    fig.tight_layout()
    paths = [out / "fraction_of_copy.png", out / "speedup.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    sp = speedups(rows)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(sp), 3.6))
    for i, xs in enumerate(sp.values()):
        ax.scatter([i] * len(xs), xs, s=12)
    ax.axhline(1.0, color="k", linewidth=1)
    ax.set_xticks(range(len(sp)), [f"{o}\nvs {p}" for o, p in sp], fontsize=6)
    ax.set(yscale="log", ylabel="speedup of tritonnorm (x)", title=banner or "speedup per case")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def cases(ops: list[OpSpec], shape_set: str, layouts, dtypes) -> list[tuple]:
    from perf.shapes import shapes_for

    return [(op, cls, shape, layout, dt) for op in ops
            for cls, shape in shapes_for(shape_set, op.shape_classes)
            for layout in layouts for dt in dtypes]  # fmt: skip
