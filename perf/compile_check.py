"""``python -m perf.compile_check``: compile every kernel specialisation for a GPU, without one.

Only a GPU can time the kernels, but the compiler runs anywhere: Triton lowers a kernel to PTX
and its bundled ``ptxas`` assembles it for any NVIDIA architecture with no driver present. This
tool drives the real launchers (``tritonnorm.kernels.launch``) on ``meta`` tensors of the
report's shapes, with a stand-in driver that reports the target GPU, and records what each
launch would compile, every autotune candidate included (the candidates are generated exactly
as on that GPU: the split factors follow its SM count). Each distinct specialisation is then
compiled for the target, and ``ptxas -v`` reports its resources: registers, spilled bytes and
the stack frame; with Triton's shared memory they bound the warps one SM can hold.

What it shows: that every kernel the report (and the library's other paths: eval, no affine
parameters, IN with running statistics, SyncBatchNorm, float64) would launch compiles natively,
and which candidates spill or starve an SM of warps. What it cannot show: time. Results go to
``perf/results/<arch>-static/`` (kernels.csv, summary.md). Exit status 1 when a kernel fails to
compile or spills at the register cap.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.driver import driver

from perf.ops import DTYPES
from perf.shapes import SETS, Shape, shape_str

# Hopper (H100/H200): SM count, and the per-SM limits that bound occupancy.
TARGETS = {
    90: dict(sms=132, regs_per_sm=65536, max_warps_per_sm=64, smem_per_sm=228 * 1024),
    80: dict(sms=108, regs_per_sm=65536, max_warps_per_sm=64, smem_per_sm=164 * 1024),
}
# Below this many resident warps per SM a streaming kernel keeps too few loads in flight.
MIN_RESIDENT_WARPS = 16


# --- recording what would be compiled --------------------------------------------------------


class _TargetDriver:
    """Stands in for the CUDA driver: reports the target and 'times' every autotune candidate
    equally (the first then wins), so launchers and the autotuner run unchanged."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")

    def get_benchmarker(self) -> Callable:
        def bench(kernel_call, quantiles=None, **_):
            kernel_call()
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench


@dataclass
class Spec:
    """One specialisation as Triton's JIT would compile it."""

    kernel: str
    signature: dict
    constants: dict
    attrs: dict
    options: dict
    scenario: str  # the first scenario that launched it

    def source(self) -> ASTSource:
        from importlib import import_module

        module, name = self.kernel.rsplit(".", 1)
        fn = getattr(import_module(module), name)
        return ASTSource(fn, self.signature, self.constants, self.attrs)

    def config(self) -> str:
        names = list(self.signature)
        meta = {
            names[i]: v
            for (i,), v in sorted(self.constants.items())
            if names[i].isupper() and names[i].startswith(("BLOCK", "SPLIT"))
        }
        parts = [f"{k}={v}" for k, v in sorted(meta.items())]
        return " ".join([*parts, f"warps={self.options['num_warps']}"])

    def flags(self) -> str:
        names = list(self.signature)
        out = []
        for (i,), v in sorted(self.constants.items()):
            name = names[i]
            if name.isupper() and not name.startswith(("BLOCK", "SPLIT")):
                out.append(f"{name}={int(v)}")
            elif v is None:
                out.append(f"{name}=None")
        return " ".join(out)

    def dtypes(self) -> str:
        return ",".join(
            sorted({t.lstrip("*") for t in self.signature.values() if t.startswith("*")})
        )


@contextlib.contextmanager
def recording(arch: int, heuristic: bool = False) -> Iterator[tuple[list[Spec], list[str]]]:
    """Within the block, kernel launches record their specialisation instead of compiling or
    running. Yields (specs, scenario) where ``scenario[0]`` labels the launches that follow.
    ``heuristic`` keeps only each launch's first candidate (what a forced config launches)
    instead of the whole autotune space."""
    from tritonnorm.kernels import config

    specs: list[Spec] = []
    seen: set[str] = set()
    scenario = ["?"]

    def hook(*, key, fn, compile, **_):
        ident = f"{fn.module}.{fn.name}:{key}"
        if ident not in seen:
            seen.add(ident)
            data = json.loads(compile["specialization_data"])
            options = {
                k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()
            }
            specs.append(
                Spec(
                    kernel=f"{fn.module}.{fn.name}",
                    signature=dict(compile["signature"]),
                    constants=dict(compile["constants"]),
                    attrs=dict(compile["configs"][0]),
                    options=options,
                    scenario=scenario[0],
                )
            )
        return True  # skip compiling and launching: this is only a recording

    limits = TARGETS[arch]
    saved_programs = config.target_programs
    saved_hook = knobs.runtime.jit_cache_hook
    saved_driver = driver._active  # None without a GPU: reset_active() would raise
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    knobs.runtime.jit_cache_hook = hook
    config.target_programs = lambda: config.PROGRAMS_PER_SM * limits["sms"]
    saved_launch = config.TunedKernel.launch
    if heuristic:
        config.TunedKernel.launch = lambda self, grid, candidates, *a, **kw: saved_launch(
            self, grid, candidates[:1], *a, **kw
        )
    try:
        yield specs, scenario
    finally:
        config.TunedKernel.launch = saved_launch
        config.target_programs = saved_programs
        knobs.runtime.jit_cache_hook = saved_hook
        driver._active = saved_driver


# --- scenarios: the launches each public path makes ------------------------------------------


def _meta(shape: Shape, dtype: torch.dtype, layout: str) -> torch.Tensor:
    fmt = torch.contiguous_format
    if layout == "channels_last" and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def _vec(c: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(c, dtype=dtype, device="meta")


def _run_norm(x, per_instance, use_input_stats, affine, running, param_dtype, backward):
    from tritonnorm.kernels import launch

    c = x.shape[1]
    w = _vec(c, param_dtype) if affine else None
    b = _vec(c, param_dtype) if affine else None
    rm = _vec(c, param_dtype) if running else None
    rv = _vec(c, param_dtype) if running else None
    _, mean, rstd = launch.forward(x, w, b, rm, rv, use_input_stats, per_instance, 0.1, 1e-5)
    if backward:
        launch.backward(
            torch.empty_like(x), x, w, mean, rstd, use_input_stats, per_instance, affine
        )


def _run_sync(x, param_dtype, world=2):
    """SyncBatchNorm's launches (tritonnorm/sync.py), the all-gathers replaced by buffers."""
    from tritonnorm.kernels import launch

    c = x.shape[1]
    acc = launch.acc_dtype(x.dtype)
    w, b, rm, rv = (_vec(c, param_dtype) for _ in range(4))
    x, view = launch.input_view(x, per_instance=False)
    partials, num = launch.stats_partials(x, view, False)
    launch.finalize_stats(partials, num, c, 1, None, None, None, None, 0.0, 1e-5, acc, x.device,
                          want_combined=True)  # fmt: skip
    gathered = torch.empty((3, world, 1, c), dtype=acc, device="meta")
    mean, rstd, coef, _ = launch.finalize_stats(
        gathered, world, c, 1, w, b, rm, rv, 0.1, 1e-5, acc, x.device
    )
    launch.apply(torch.empty_like(x), view, coef, False, x)
    dy, dy_view = launch.grad_view(torch.empty_like(x), x, view)
    partials, num = launch.grad_partials(dy, dy_view, x, view, mean, rstd, False)
    launch.finalize_grad(partials, num, mean, rstd, None, view.N * view.S, True, False, True)
    gathered = torch.empty((2, world, 1, c), dtype=acc, device="meta")
    _, _, coef = launch.finalize_grad(gathered, world, mean, rstd, w, 10, True, True, False)
    launch.apply(torch.empty_like(x), view, coef, False, x, dy, dy_view)


# Shapes beyond the report's: on-chip (fused) reductions, 1-D and 3-D inputs, odd sizes.
EXTRA_SHAPES: dict[str, list[Shape]] = {
    "bn": [(8, 16, 32, 32), (64, 512), (16, 96, 127), (2, 3, 64, 128), (4, 40, 9, 9)],
    "in": [(4, 64, 64, 64), (8, 32, 127), (2, 8, 16, 16, 16), (2, 3, 5, 7), (2, 4, 160, 256)],
}


def scenarios(shape_set: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """(label, thunk) for every launch path the library has, over the report's shapes."""
    table = SETS[shape_set]
    bn_shapes = [s for cls in ("resnet50_bn", "small_c_bn") for s in table[cls]]
    in_shapes = [s for cls in ("style_in", "medical3d_in") for s in table[cls]]
    bn_shapes += EXTRA_SHAPES["bn"]
    in_shapes += EXTRA_SHAPES["in"]
    layouts = ("contiguous", "channels_last")
    for dname, dtype in DTYPES.items():
        for layout in layouts:
            for shape in bn_shapes:
                x = _meta(shape, dtype, layout)
                tag = f"{shape_str(shape)} {layout} {dname}"
                yield (
                    f"bn train {tag}",
                    lambda x=x, d=dtype: _run_norm(x, False, True, True, True, d, True),
                )
                yield (
                    f"bn eval {tag}",
                    lambda x=x, d=dtype: _run_norm(x, False, False, True, True, d, True),
                )
            for shape in in_shapes:
                x = _meta(shape, dtype, layout)
                tag = f"{shape_str(shape)} {layout} {dname}"
                yield (
                    f"in {tag}",
                    lambda x=x, d=dtype: _run_norm(x, True, True, True, False, d, True),
                )
    # The less travelled paths, on a few shapes: no affine parameters, fp32 parameters with
    # half inputs (mixed precision), IN tracking running statistics, SyncBatchNorm, float64.
    few = [(32, 256, 56, 56), (8, 16, 32, 32), (4, 64, 64, 64)]
    for shape in few:
        for dname, dtype in DTYPES.items():
            for layout in layouts:
                x = _meta(shape, dtype, layout)
                tag = f"{shape_str(shape)} {layout} {dname}"
                for per_instance in (False, True):
                    kind = "in" if per_instance else "bn"
                    yield (
                        f"{kind} no-affine {tag}",
                        lambda x=x, p=per_instance, d=dtype: _run_norm(
                            x, p, True, False, False, d, True
                        ),
                    )
                    yield (
                        f"{kind} fp32-params {tag}",
                        lambda x=x, p=per_instance: _run_norm(
                            x, p, True, True, True, torch.float32, True
                        ),
                    )
                yield (
                    f"in eval-running {tag}",
                    lambda x=x, d=dtype: _run_norm(x, True, False, True, True, d, True),
                )
                yield f"sync-bn {tag}", lambda x=x, d=dtype: _run_sync(x, d)
        x = _meta(shape, torch.float64, "contiguous")
        for per_instance in (False, True):
            yield (
                f"{'in' if per_instance else 'bn'} float64 {shape}",
                lambda x=x, p=per_instance: _run_norm(x, p, True, True, True, torch.float64, True),
            )


def record(arch: int, shape_set: str, heuristic: bool = False) -> list[Spec]:
    # Compiling needs real JIT functions: under the interpreter the kernels are not compilable.
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("perf.compile_check compiles kernels: run it without TRITON_INTERPRET=1")
    with recording(arch, heuristic) as (specs, scenario):
        for label, thunk in scenarios(shape_set):
            scenario[0] = label
            thunk()
    return specs


# --- compiling and reading resources ---------------------------------------------------------


@dataclass
class Compiled:
    spec: Spec
    seconds: float
    regs: int | None = None
    spill_bytes: int | None = None  # per thread: registers spilled to local memory
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    load_bits: int | None = None  # widest global load per thread (128: fully vectorised)
    store_bits: int | None = None
    error: str | None = None
    occupancy_warps: int | None = field(default=None)


def ptxas_report(ptx: str, arch: int, fp_fusion: bool) -> dict[str, int]:
    """Registers, spill stores and stack frame (bytes per thread) that ptxas reports for the PTX,
    assembled with the options Triton itself uses (its bundled ptxas, -lineinfo, register
    allocation level 2)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", *([] if fp_fusion else ["--fmad=false"]),
               str(src), "-o", str(Path(tmp, "kernel.cubin"))]  # fmt: skip
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", log)
    if not (regs and frame):
        raise RuntimeError(f"ptxas -v printed no resource usage:\n{log}")
    return {"regs": int(regs[1]), "stack": int(frame[1]), "spill": int(frame[2])}


_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global[.\w:]*?(?:\.v(\d))?\.[bfus](\d+)\b")


def widest_access(ptx: str) -> dict[str, int]:
    """Widest global load and store in bits per thread and instruction: 128-bit vectors are what
    a streaming kernel needs to approach copy bandwidth."""
    widest = {"ld": 0, "st": 0}
    for op, vec, bits in _GLOBAL_ACCESS.findall(ptx):
        widest[op] = max(widest[op], int(vec or 1) * int(bits))
    return widest


def resident_warps(arch: int, regs: int, warps: int, shared: int) -> int:
    """Warps one SM can hold of this kernel: registers are allocated per warp in 256-register
    units, shared memory per block."""
    limits = TARGETS[arch]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    blocks = min(
        limits["regs_per_sm"] // (regs_per_warp * warps),
        limits["max_warps_per_sm"] // warps,
        limits["smem_per_sm"] // shared if shared else 1 << 30,
    )
    return blocks * warps


def compile_one(spec: Spec, arch: int) -> Compiled:
    start = time.perf_counter()
    try:
        kernel = triton.compile(spec.source(), target=GPUTarget("cuda", arch, 32),
                                options=spec.options)  # fmt: skip
        res = ptxas_report(kernel.asm["ptx"], arch, spec.options.get("enable_fp_fusion", True))
    except Exception as exc:  # a compile error is a finding, reported with the spec
        message = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return Compiled(spec, time.perf_counter() - start, error=" | ".join(message[-3:])[:400])
    shared = int(getattr(kernel.metadata, "shared", 0) or 0)
    access = widest_access(kernel.asm["ptx"])
    result = Compiled(
        spec, time.perf_counter() - start, regs=res["regs"], spill_bytes=res["spill"],
        stack_bytes=res["stack"], shared_bytes=shared, load_bits=access["ld"],
        store_bits=access["st"],
    )  # fmt: skip
    result.occupancy_warps = resident_warps(arch, res["regs"], spec.options["num_warps"], shared)
    return result


def _compile_index(args: tuple[int, int]) -> Compiled:
    index, arch = args
    return compile_one(_SPECS[index], arch)


_SPECS: list[Spec] = []  # inherited by forked workers


def compile_all(specs: list[Spec], arch: int, jobs: int, progress: bool = True) -> list[Compiled]:
    global _SPECS
    _SPECS = specs
    results: list[Compiled] = []
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for i, res in enumerate(pool.map(_compile_index, [(i, arch) for i in range(len(specs))])):
            results.append(res)
            done = i + 1
            if progress and (sys.stderr.isatty() or done % 250 == 0 or done == len(specs)):
                end = "" if sys.stderr.isatty() else "\n"
                print(f"\rcompiled {done}/{len(specs)}", end=end, file=sys.stderr, flush=True)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    return results


# --- report ----------------------------------------------------------------------------------

COLUMNS = ("kernel", "flags", "dtypes", "config", "regs", "spill_bytes", "stack_bytes", "shared_bytes",
           "resident_warps", "load_bits", "store_bits", "compile_s", "error", "scenario")  # fmt: skip


def _row(r: Compiled) -> dict:
    return dict(
        kernel=r.spec.kernel.rsplit(".", 1)[1],
        flags=r.spec.flags(),
        dtypes=r.spec.dtypes(),
        config=r.spec.config(),
        regs=r.regs,
        spill_bytes=r.spill_bytes,
        stack_bytes=r.stack_bytes,
        shared_bytes=r.shared_bytes,
        resident_warps=r.occupancy_warps,
        load_bits=r.load_bits,
        store_bits=r.store_bits,
        compile_s=round(r.seconds, 2),
        error=r.error or "",
        scenario=r.spec.scenario,
    )


def register_cap(arch: int, warps: int) -> int:
    """The most registers a thread of a ``warps``-warp program may use (allocated by 8)."""
    return min(255, TARGETS[arch]["regs_per_sm"] // (warps * 32) // 8 * 8)


def pressure_spill(r: Compiled, arch: int) -> bool:
    """Spills forced by the register cap: the tile does not fit. ptxas also spills a few bytes
    well below the cap under Triton's ``--regAllocOptLevel=2`` (a ptxas 13 workaround): those
    are listed in the CSV but are not a problem of the tile."""
    return bool(r.spill_bytes) and r.regs >= register_cap(arch, r.spec.options["num_warps"])


def problems(results: list[Compiled], arch: int) -> list[str]:
    out = []
    for r in results:
        where = f"{_row(r)['kernel']} [{r.spec.flags()}] {r.spec.config()} ({r.spec.scenario})"
        if r.error:
            out.append(f"compile error: {where}: {r.error}")
        elif pressure_spill(r, arch):
            out.append(f"spills {r.spill_bytes} B/thread at {r.regs} registers: {where}")
    return out


def summary(results: list[Compiled], arch: int, shape_set: str, heuristic: bool) -> str:
    by_kernel: dict[str, list[Compiled]] = {}
    for r in results:
        by_kernel.setdefault(_row(r)["kernel"], []).append(r)
    lines = [
        f"# Static compile check for sm_{arch} (no GPU: nothing here is a timing)",
        "",
        f"triton {triton.__version__}, torch {torch.__version__}; shapes: `{shape_set}` set "
        "plus the extra and less-travelled paths in `perf/compile_check.py`.",
        f"{len(results)} specialisations "
        f"({'first candidate of each launch' if heuristic else 'every autotune candidate'}) "
        "compiled with Triton's bundled ptxas; resources as `ptxas -v` reports them. `resident warps`: "
        "what one SM can hold given registers and shared memory (64 at most).",
        "",
        "| kernel | variants | errors | spilling at the register cap | spilling below it "
        "| regs min-max | fewest resident warps/SM |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rs in by_kernel.items():
        ok = [r for r in rs if not r.error]
        regs = [r.regs for r in ok]
        warps = [r.occupancy_warps for r in ok]
        lines.append(
            f"| {name} | {len(rs)} | {len(rs) - len(ok)} "
            f"| {sum(1 for r in ok if pressure_spill(r, arch))} "
            f"| {sum(1 for r in ok if r.spill_bytes and not pressure_spill(r, arch))} "
            f"| {min(regs, default=0)}-{max(regs, default=0)} | {min(warps, default=0)} |"
        )
    low = [r for r in results if not r.error and r.occupancy_warps < MIN_RESIDENT_WARPS]
    lines += [
        "",
        f"Variants with fewer than {MIN_RESIDENT_WARPS} resident warps per SM: {len(low)}",
    ]
    for r in low[:20]:
        lines.append(f"- {_row(r)['kernel']} {r.spec.config()} regs={r.regs} ({r.spec.scenario})")
    found = problems(results, arch)
    lines += ["", f"Problems (compile errors, spills at the register cap): {len(found) or 'none'}"]
    lines += [f"- {p}" for p in found[:50]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.compile_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--arch", type=int, default=90, choices=sorted(TARGETS))
    p.add_argument("--set", default="full", choices=sorted(SETS), help="report shapes to cover")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", help="output directory (default perf/results/sm<arch>-static/)")
    p.add_argument("--limit", type=int, help="compile only the first N specialisations")
    p.add_argument(
        "--heuristic",
        action="store_true",
        help="only each launch's first (heuristic) candidate, not every autotune one",
    )
    args = p.parse_args(argv)

    start = time.perf_counter()
    specs = record(args.arch, args.set, args.heuristic)
    if args.limit:
        specs = specs[: args.limit]
    print(f"{len(specs)} distinct specialisations recorded in {time.perf_counter() - start:.1f} s")
    results = compile_all(specs, args.arch, args.jobs)
    out = Path(args.out or Path(__file__).parent / "results" / f"sm{args.arch}-static")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(_row(r) for r in results)
    text = summary(results, args.arch, args.set, args.heuristic)
    (out / "summary.md").write_text(text)
    print(text)
    print(f"wrote {out}/kernels.csv, summary.md in {time.perf_counter() - start:.0f} s")
    return 1 if problems(results, args.arch) else 0


if __name__ == "__main__":
    sys.exit(main())
