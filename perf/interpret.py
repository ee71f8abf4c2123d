"""The report without a GPU: check each op once through Triton's interpreter and count its bytes.

For every op, each of its small ``check_shapes``, layout and dtype it runs tritonnorm on CPU
tensors, checks the result against torch eager (float32, on a contiguous copy of the inputs),
counts the bytes the Triton kernels moved (``perf/bytecount.py``) stage by stage (the backward
counted alone, torch-side full-size ops audited) and prints passes over the input next to the
floor. No timing is taken.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
from pathlib import Path

import torch

from perf import bench, results
from perf.bytecount import Traffic, count_bytes
from perf.floors import within_floor
from perf.ops import DTYPES, LAYOUTS, OpSpec, select
from perf.shapes import Shape, shape_str

NO_TIMING = "NO TIMING WAS TAKEN (no GPU): interpreter correctness check and byte count only"
OUT_DEFAULT = Path(__file__).resolve().parent / "results" / "interpreter"
COLUMNS = [
    "op",
    "layout",
    "dtype",
    "shape",
    "stage",
    "passes",
    "floor_passes",
    "over_floor",
    "big_bytes",
    "small_bytes",
    "check",
    "kernels",
    "torch_side_full_size_ops",
]


def _kernels(t: Traffic) -> str:
    return "; ".join(f"{k} {(ld + st) / 1024:.0f}KiB" for k, (ld, st) in t.by_kernel().items())


def measure(op: OpSpec, shape: Shape, layout: str, dtype: torch.dtype) -> list[dict]:
    """Rows (one per stage) for one op, shape, layout and dtype."""
    numel = math.prod(shape)
    pass_bytes = numel * dtype.itemsize
    ref_inp = op.inputs(shape, layout, dtype, "cpu").reference()
    ref = (*bench.make_step(op.torch_fn, ref_inp, op.backward)(), *ref_inp.state)

    inp = op.inputs(shape, layout, dtype, "cpu")
    counted: list[tuple[str, Traffic]] = []
    fwd_stage = next(s for s in op.stages if s != "bwd")
    with torch.set_grad_enabled(op.backward), count_bytes(audit_min_numel=numel) as t:
        y = op.tn_fn(*inp.args)
    counted.append((fwd_stage, t))
    got = [y]
    if op.backward:
        with count_bytes(audit_min_numel=numel) as t:
            got += torch.autograd.grad(y, inp.grad_inputs, inp.dy)
        counted.append(("bwd", t))
    check = bench.compare((*got, *inp.state), ref, dtype) or "ok"

    rows = []
    for stage, t in counted:
        floor = op.stage_floor(stage, shape)
        big, small = t.split(numel)
        passes = t.passes(pass_bytes)
        rows.append(
            {
                "op": op.name,
                "layout": layout,
                "dtype": str(dtype).removeprefix("torch."),
                "shape": shape_str(shape),
                "stage": stage,
                "passes": round(passes, 4),
                "floor_passes": floor,
                "over_floor": not within_floor(big, small, pass_bytes, floor),
                "big_bytes": big,
                "small_bytes": small,
                "check": check,
                "kernels": _kernels(t),
                "torch_side_full_size_ops": "; ".join(t.torch_ops),
            }
        )
    return rows


def _print_row(r: dict) -> None:
    flag = "  OVER FLOOR" if r.get("over_floor") else ""
    print(
        f"{r['op']:<17}{r['layout']:<14}{r['dtype']:<9}{r['shape']:<12}{r['stage']:<6}"
        f"{r.get('passes', float('nan')):>7.3f}{r.get('floor_passes', ''):>6}"
        f"{r.get('big_bytes', 0) / 1024:>9.1f}{r.get('small_bytes', 0):>8}  {r['check']}{flag}"
    )
    if r.get("kernels"):
        print(f"{'':<17}kernels: {r['kernels']}")
    if r.get("torch_side_full_size_ops"):
        print(f"{'':<17}torch-side full-size ops: {r['torch_side_full_size_ops']}")


def run(args: argparse.Namespace) -> int:
    ops = select(args.ops)
    print(NO_TIMING)
    out = Path(args.out) if args.out else OUT_DEFAULT
    out.mkdir(parents=True, exist_ok=True)
    layouts = args.layouts.split(",") if args.layouts else list(LAYOUTS)
    dtypes = args.dtypes.split(",") if args.dtypes else list(DTYPES)
    rows: list[dict] = []
    print(
        f"{'op':<17}{'layout':<14}{'dtype':<9}{'shape':<12}{'stage':<6}{'passes':>7}"
        f"{'floor':>6}{'big KiB':>9}{'small B':>8}  check"
    )
    for op in ops:
        for shape, layout, dt in itertools.product(op.check_shapes, layouts, dtypes):
            try:
                new = measure(op, shape, layout, DTYPES[dt])
            except Exception as e:
                new = [
                    {
                        "op": op.name,
                        "layout": layout,
                        "dtype": dt,
                        "shape": shape_str(shape),
                        "stage": "-",
                        "check": f"ERROR: {type(e).__name__}: {e}"[:300],
                    }
                ]
            for r in new:
                _print_row(r)
            rows.extend(new)

    with (out / "bytecount.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    env = results.environment("interpreter (no GPU, no timing)", "cpu")
    results.write_env(env, out / "env.json")
    _write_summary(rows, out / "summary.md")
    over = [r for r in rows if r.get("over_floor")]
    failed = [r for r in rows if r["check"] != "ok"]
    print(f"\nwrote {out / 'bytecount.csv'}, summary.md, env.json")
    print(f"{len(over)} stage(s) above the byte floor; {len(failed)} check failure(s)")
    print(NO_TIMING)
    return 0


def _write_summary(rows: list[dict], path: Path) -> None:
    lines = [
        "# Interpreter pass: byte count per op (no GPU)",
        "",
        f"**{NO_TIMING}**",
        "",
        "Passes = bytes moved by the Triton kernels / (numel x element size of the input).",
        "",
        "| op | layout | dtype | shape | stage | passes | floor | big bytes | "
        "small bytes | check | torch-side full-size ops |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            " | ".join(
                [
                    "",
                    r["op"],
                    r["layout"],
                    r["dtype"],
                    r["shape"],
                    r["stage"],
                    f"{r.get('passes', '')}",
                    f"{r.get('floor_passes', '')}",
                    f"{r.get('big_bytes', '')}",
                    f"{r.get('small_bytes', '')}",
                    r["check"],
                    r.get("torch_side_full_size_ops") or "none",
                    "",
                ]
            ).strip()
        )
    path.write_text("\n".join(lines) + "\n")
