"""The report: every op x shape x layout x dtype x provider, checked, then timed.

Providers: tritonnorm, torch eager, torch.compile of the same torch function (one compiled
function per op, ``dynamic=False``, recompiled per shape), FlagGems when installed. Each
provider's outputs, gradients and running statistics are first checked against torch in float64
by the test suite's rule (tests/tolerances.py); a mismatch is recorded and not timed.

GPU mode: median of ``triton.testing.do_bench``, input sets rotated so the working set is several
times L2. CPU mode (no GPU, ``--cpu``, and ``python -m perf.gpu --dry-run``): tritonnorm through
Triton's interpreter, a perf_counter timer, small shapes: NOT a GPU measurement. It also counts
the bytes each tritonnorm stage moves (perf/bytecount.py) against its floor (PERF.md).
"""

from __future__ import annotations

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
    """Median milliseconds of ``triton.testing.do_bench`` (warm-up excluded, L2 flushed)."""
    import triton.testing

    return float(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"))


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
    first_call_s: float | None = None  # includes torch.compile's compilation / autotuning
    passes: str = ""  # CPU mode, tritonnorm: passes counted per stage / floor
    over_floor: bool = False
    note: str = ""  # tritonnorm's chosen configs; or why the row was not timed


def _counted(op: OpSpec, shape, inp) -> tuple[tuple, str, bool]:
    """The tritonnorm run of the CPU mode, with each stage's bytes counted (the backward alone)."""
    from perf.bytecount import count_bytes
    from perf.floors import within_floor

    numel = math.prod(shape)
    pass_bytes = numel * inp.args[0].element_size()
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
        big, small = t.split(numel)
        bad = not within_floor(big, small, pass_bytes, floor) or bool(t.torch_ops)
        over |= bad
        found.append(f"{stage} {t.passes(pass_bytes):.3f}/{floor}{' OVER' if bad else ''}")
    return (y, *grads, *inp.state), " ".join(found), over


def run_case(op: OpSpec, cls: str, shape, layout: str, dtype_name: str, device: str, provs: dict,
             copy: float, deadline: float = math.inf) -> list[Row]:  # fmt: skip
    """Check, then time, every provider on one case; none starts after ``deadline``."""
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
        except Exception as e:
            row.note = error(e)
            continue
        row.gbps = floor_bytes / (row.ms * 1e-3) / 1e9
        row.frac_of_copy = row.gbps / copy
        if name == "tritonnorm":
            from tritonnorm.kernels import config

            row.note = "; ".join(f"{k}: {v}" for k, v in sorted(config.chosen_configs().items()))
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
    """Worst fraction of copy bandwidth (tritonnorm), slowest speedup vs eager and vs compile."""
    fracs = [r.frac_of_copy for r in rows if r.provider == "tritonnorm" and r.frac_of_copy]
    sp = speedups(rows)
    slowest = {p: min((x for (_, q), xs in sp.items() if q == p for x in xs), default=None)
               for p in ("eager", "compile")}  # fmt: skip
    return {"worst_frac_of_copy": min(fracs, default=None), "min_vs_eager": slowest["eager"],
            "min_vs_compile": slowest["compile"]}  # fmt: skip


def summary_lines(rows: list[Row]) -> list[str]:
    """Per op: tritonnorm's fraction of copy bandwidth, speedups, byte counts, failures."""
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")
    lines = ["| op | tritonnorm: worst / median fraction of copy | vs provider | n | min | "
             "median speedup |", "|---|---|---|---|---|---|"]  # fmt: skip
    sp = speedups(rows)
    for op in dict.fromkeys(r.op for r in rows):
        fr = [r.frac_of_copy for r in rows if r.op == op and r.provider == "tritonnorm" and r.ms]
        frac = f"{min(fr):.1%} / {med(fr):.1%}" if fr else "-"
        for prov, xs in [(p, xs) for (o, p), xs in sp.items() if o == op] or [("-", [])]:
            lines.append(f"| {op} | {frac} | {prov} | {len(xs)} | "
                         f"{min(xs, default=float('nan')):.3g}x | {med(xs):.3g}x |")  # fmt: skip
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
            pts = [(math.prod(map(int, r.shape.split("x"))), r.frac_of_copy)
                   for r in rows if r.op == op and r.provider == prov and r.ms]  # fmt: skip
            if pts:
                ax.scatter(*zip(*pts, strict=True), label=prov, s=14)
        ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
        ax.set(xscale="log", title=op, xlabel="elements")
    axes[0][0].set_ylabel("fraction of copy bandwidth")
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
