"""The report: every op x shape x layout x dtype x provider, checked, then timed.

Each provider's result is first checked against torch eager run in float32 on a contiguous copy
of the same inputs; a mismatch is recorded (in the row's config column and on the console) and
not timed. Rows go to results.csv, PNGs, summary.md and env.json.

On a GPU it times with ``triton.testing.do_bench``. ``--dry-run`` runs the same orchestration on
the CPU (tritonnorm through Triton's interpreter) with a ``time.perf_counter`` timer and tiny
shapes, to exercise the plumbing: its numbers are NOT GPU measurements and are labelled so.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from perf import bench, plots, providers, results
from perf.ops import DTYPES, LAYOUTS, Inputs, OpSpec, select
from perf.progress import Progress
from perf.shapes import Shape, shape_str, shapes_for

DRY_RUN_BANNER = (
    "DRY RUN on the CPU (tritonnorm through the Triton interpreter, perf_counter timer, tiny "
    "shapes): NOT A GPU MEASUREMENT"
)
PLOT_BANNER = "DRY RUN (CPU): NOT A GPU MEASUREMENT"
RESULTS_ROOT = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    """One op x shape x layout x dtype."""

    op: OpSpec
    shape_class: str
    shape: Shape
    layout: str
    dtype_name: str
    device: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def label(self) -> str:
        return f"{self.op.name} {self.layout} {self.dtype_name} {shape_str(self.shape)}"

    def inputs(self, seed: int = 0) -> Inputs:
        return self.op.inputs(self.shape, self.layout, self.dtype, self.device, seed=seed)


def chosen_configs() -> str:
    """tritonnorm's configs of the latest launch of each kernel, joined compactly."""
    try:
        from tritonnorm.kernels import config
    except ImportError:
        return ""
    return "; ".join(f"{k}: {v}" for k, v in sorted(config.chosen_configs().items()))


def _reset_configs() -> None:
    try:
        from tritonnorm.kernels import config
    except ImportError:
        return
    config.reset_chosen_configs()


def _run_once(fn, inp: Inputs, op: OpSpec) -> tuple:
    """Outputs (and gradients) of one step, plus the state it updated (running statistics)."""
    return (*bench.make_step(fn, inp, op.backward)(), *inp.state)


def _error(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:160]
    return f"ERROR: {type(e).__name__}: {text}"


def _measure(case: Case, prov, fn, sets, ref, timer) -> tuple[float | None, str]:
    """(ms, config) for a provider; ms is None and config says why when it was not timed."""
    try:
        with prov.context():
            if prov.name == "tritonnorm":
                _reset_configs()
            got = _run_once(fn, case.inputs(seed=0), case.op)  # fresh state: seed 0 = ref's
            bad = bench.compare(got, ref, case.dtype)
            del got
            if bad:
                return None, f"MISMATCH vs eager fp32 reference: {bad}"
            ms = timer(bench.rotating([bench.make_step(fn, s, case.op.backward) for s in sets]))
        return ms, chosen_configs() if prov.name == "tritonnorm" else ""
    except Exception as e:  # one failing provider must not stop the report
        if case.device == "cuda":
            torch.cuda.empty_cache()
        return None, _error(e)


def run_case(case: Case, provs, timer, copy_gbps: float, progress: Progress) -> list[results.Row]:
    """Check and time every provider on one case."""
    floor = case.op.floor_bytes(case.shape, case.dtype)
    pass_bytes = math.prod(case.shape) * case.dtype.itemsize
    n_sets = 1
    if case.device == "cuda":
        n_sets = bench.buffers_needed(pass_bytes * (4 if case.op.backward else 2))
    try:
        sets = [case.inputs(seed=i) for i in range(n_sets)]
        ref = _run_once(case.op.torch_fn, case.inputs(seed=0).reference(), case.op)
        setup_error = None
    except Exception as e:
        sets, ref, setup_error = [], (), _error(e)
    rows = []
    for prov in provs:
        progress.step(f"{case.label} {prov.name}")
        fn = None
        ms, config = None, setup_error
        if not setup_error:
            try:
                fn = prov.prepare(case.op)
            except Exception as e:
                config = _error(e)
            else:
                if fn is None:
                    progress.note(f"{prov.name}: no kernel for {case.op.name} ({prov.note})")
                    continue
                ms, config = _measure(case, prov, fn, sets, ref, timer)
        gbps = floor / (ms * 1e-3) / 1e9 if ms else None
        rows.append(
            results.Row(
                op=case.op.name,
                layout=case.layout,
                dtype=case.dtype_name,
                shape=shape_str(case.shape),
                provider=prov.name,
                ms=ms,
                gbps=gbps,
                floor_bytes=floor,
                copy_gbps=copy_gbps,
                frac_of_copy=gbps / copy_gbps if gbps else None,
                config=config,
                shape_class=case.shape_class,
            )
        )
        if ms is None:
            progress.note(f"NOT TIMED: {config}")
        else:
            progress.note(f"{ms:.4f} ms, {gbps:.1f} GB/s = {gbps / copy_gbps:.1%} of copy")
    del sets, ref
    if case.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def floors_markdown(ops: list[OpSpec], shape_set: str) -> str:
    """The floor each op is judged by, per shape class (one table)."""
    lines = ["| op | shape class | floor, passes over the input |", "|---|---|---|"]
    for op in ops:
        by_class: dict[str, set[str]] = {}
        for cls, shape in shapes_for(shape_set, op.shape_classes):
            stages = " + ".join(f"{op.stage_floor(s, shape)} {s}" for s in op.stages)
            by_class.setdefault(cls, set()).add(f"{op.floor_passes(shape)} ({stages})")
        for cls, floors in by_class.items():
            lines.append(f"| {op.name} | {cls} | {'; '.join(sorted(floors))} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    timer = bench.cpu_timer if dry else bench.gpu_timer
    shape_set = "dry-run" if dry else ("full" if args.full else "quick")
    ops = select(args.ops)
    layouts = args.layouts.split(",") if args.layouts else list(LAYOUTS)
    dtypes = args.dtypes.split(",") if args.dtypes else (["float32"] if dry else list(DTYPES))
    banner = DRY_RUN_BANNER if dry else ""
    if banner:
        print(banner)
    skipped: list[str] = []

    def log(line: str) -> None:
        skipped.append(line)
        print(line)

    provs = providers.available(args.providers.split(",") if args.providers else None, log)
    if args.out:
        out = Path(args.out)
    elif dry:
        out = RESULTS_ROOT / "interpreter" / "dry-run"
    else:
        out = RESULTS_ROOT / results.gpu_slug(torch.cuda.get_device_name())
    out.mkdir(parents=True, exist_ok=True)

    copy_bytes = 64 * 2**20 if dry else 2**30
    copy_gbps = bench.copy_bandwidth(timer, device, copy_bytes)
    print(f"copy bandwidth ({device}, copy_ of {copy_bytes >> 20} MiB, read + write): "
          f"{copy_gbps:.1f} GB/s")  # fmt: skip

    cases = [
        Case(op, cls, shape, layout, dt, device)
        for op in ops
        for cls, shape in shapes_for(shape_set, op.shape_classes)
        for layout in layouts
        for dt in dtypes
    ]
    print(f"{len(cases)} op/shape/layout/dtype cases x {len(provs)} providers "
          f"({', '.join(p.name for p in provs)}); shapes: {shape_set}")  # fmt: skip
    progress = Progress(len(cases) * len(provs))
    rows = [row for case in cases for row in run_case(case, provs, timer, copy_gbps, progress)]

    env = results.environment(
        "dry-run (CPU, not a GPU measurement)" if dry else "gpu",
        device,
        {"copy_gbps": copy_gbps, "shape_set": shape_set, "providers": [p.name for p in provs],
         "providers_skipped": skipped},
    )  # fmt: skip
    results.write_csv(rows, out / "results.csv")
    results.write_env(env, out / "env.json")
    results.write_summary(rows, env, out / "summary.md", banner, floors_markdown(ops, shape_set))
    pngs = plots.write_plots(rows, out, PLOT_BANNER if dry else "")
    bad = [r for r in rows if not r.ok]
    print(f"\nwrote {out / 'results.csv'} ({len(rows)} rows), summary.md, env.json, "
          f"{len(pngs)} PNGs")  # fmt: skip
    print(f"{len(bad)} rows not timed (mismatch or error)" if bad else "all rows checked and timed")
    if banner:
        print(banner)
    return 0
