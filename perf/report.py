"""The report: every op x shape x layout x dtype x provider, checked against torch eager, then
timed; rows written to results.csv, plots, summary.md and env.json.

On a GPU it times with ``triton.testing.do_bench``. ``--dry-run`` runs the same orchestration on
the CPU (tritonnorm through Triton's interpreter) with a ``time.perf_counter`` timer and tiny
shapes, to exercise the plumbing: its numbers are NOT GPU measurements and are labelled so.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from perf import bench, plots, providers, results
from perf.ops import DTYPES, LAYOUTS, Inputs, OpSpec, select
from perf.progress import Progress
from perf.shapes import shape_str, shapes_for

DRY_RUN_BANNER = ("DRY RUN on the CPU (tritonnorm through the Triton interpreter, perf_counter "
                  "timer, tiny shapes): NOT A GPU MEASUREMENT")  # fmt: skip
RESULTS_ROOT = Path(__file__).resolve().parent / "results"


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
    return f"ERROR: {type(e).__name__}: {text}".replace("\n", " ")


def _measure(op, prov, fn, shape, layout, dtype, device, sets, ref, timer) -> tuple[float | None,
                                                                                  str]:
    """(ms, config) for a provider; ms is None and config says why when it was not timed."""
    try:
        with prov.context():
            if prov.name == "tritonnorm":
                _reset_configs()
            got = _run_once(fn, op.inputs(shape, layout, dtype, device, seed=0), op)
            bad = bench.compare(got, ref, dtype)
            del got
            if bad:
                return None, f"MISMATCH vs eager: {bad}"
            step = bench.rotating([bench.make_step(fn, s, op.backward) for s in sets])
            ms = timer(step)
        return ms, chosen_configs() if prov.name == "tritonnorm" else ""
    except Exception as e:  # one failing provider must not stop the report
        if device == "cuda":
            torch.cuda.empty_cache()
        return None, _error(e)


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

    provs = providers.available(args.providers.split(",") if args.providers else None)
    if dry:
        out = Path(args.out) if args.out else RESULTS_ROOT / "interpreter" / "dry-run"
    else:
        slug = results.gpu_slug(torch.cuda.get_device_name())
        out = Path(args.out) if args.out else RESULTS_ROOT / slug
    out.mkdir(parents=True, exist_ok=True)

    copy_gbps = bench.copy_bandwidth(timer, device, 64 * 2**20 if dry else 2**30)
    print(f"copy bandwidth ({device}, copy_ of {'64 MiB' if dry else '1 GiB'}, read + write): "
          f"{copy_gbps:.1f} GB/s")

    plan = [(op, cls, shape, layout, dt) for op in ops
            for cls, shape in shapes_for(shape_set, op.shape_classes)
            for layout in layouts for dt in dtypes]  # fmt: skip
    progress = Progress(len(plan) * len(provs))
    print(f"{len(plan)} op/shape/layout/dtype combinations x {len(provs)} providers "
          f"({', '.join(p.name for p in provs)}); shapes: {shape_set}")
    rows: list[results.Row] = []
    for op, cls, shape, layout, dt in plan:
        dtype = DTYPES[dt]
        floor = op.floor_bytes(shape, dtype)
        numel_bytes = math.prod(shape) * dtype.itemsize
        n_sets = 1 if dry else bench.buffers_needed(numel_bytes * (4 if op.backward else 2))
        label = f"{op.name} {layout} {dt} {shape_str(shape)}"
        try:
            sets = [op.inputs(shape, layout, dtype, device, seed=i) for i in range(n_sets)]
            ref = _run_once(op.torch_fn, op.inputs(shape, layout, dtype, device, seed=0), op)
            setup_error = None
        except Exception as e:
            sets, ref, setup_error = [], (), _error(e)
        for prov in provs:
            progress.step(f"{label} {prov.name}")
            if setup_error:
                ms, config = None, setup_error
            else:
                try:
                    fn = prov.prepare(op)
                except Exception as e:
                    fn, ms, config = None, None, _error(e)
                else:
                    if fn is None:
                        progress.note(f"{prov.name}: no kernel for {op.name} ({prov.note})")
                        continue
                    ms, config = _measure(op, prov, fn, shape, layout, dtype, device, sets, ref,
                                          timer)
            gbps = floor / (ms * 1e-3) / 1e9 if ms else None
            rows.append(results.Row(op.name, layout, dt, shape_str(shape), prov.name, ms, gbps,
                                    floor, copy_gbps, gbps / copy_gbps if gbps else None, config,
                                    cls))
            if ms is None:
                progress.note(f"NOT TIMED: {config}")
            else:
                progress.note(f"{ms:.4f} ms, {gbps:.1f} GB/s = {gbps / copy_gbps:.1%} of copy")
        del sets, ref
        if device == "cuda":
            torch.cuda.empty_cache()

    env = results.environment("dry-run (CPU, not a GPU measurement)" if dry else "gpu", device,
                              {"copy_gbps": copy_gbps, "shape_set": shape_set,
                               "providers": [p.name for p in provs]})
    results.write_csv(rows, out / "results.csv")
    results.write_env(env, out / "env.json")
    results.write_summary(rows, env, out / "summary.md", banner)
    pngs = plots.write_plots(rows, out, banner)
    bad = [r for r in rows if not r.ok]
    print(f"\nwrote {out / 'results.csv'} ({len(rows)} rows), summary.md, env.json, "
          f"{len(pngs)} PNGs")
    print(f"{len(bad)} rows not timed (mismatch or error)" if bad else "all rows checked and timed")
    if banner:
        print(banner)
    return 0
