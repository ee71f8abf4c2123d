"""The report's outputs: result rows, results.csv, summary.md and env.json."""

from __future__ import annotations

import csv
import datetime
import json
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from perf.floors import floor_table_markdown

CSV_COLUMNS = [
    "op",
    "layout",
    "dtype",
    "shape",
    "provider",
    "ms",
    "gbps",
    "floor_bytes",
    "copy_gbps",
    "frac_of_copy",
    "config",
]
REFERENCE = "tritonnorm"  # speedups are (other provider's ms) / (tritonnorm's ms)


@dataclass
class Row:
    op: str
    layout: str
    dtype: str
    shape: str
    provider: str
    ms: float | None  # None: not timed (mismatch or error)
    gbps: float | None
    floor_bytes: int
    copy_gbps: float
    frac_of_copy: float | None
    config: str  # tritonnorm's chosen kernel configs; "MISMATCH: ..." / "ERROR: ..." if not timed
    shape_class: str = ""

    @property
    def ok(self) -> bool:
        return self.ms is not None


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            d = {k: v for k, v in asdict(r).items() if k in CSV_COLUMNS}
            for k in ("ms", "gbps", "frac_of_copy", "copy_gbps"):
                d[k] = "" if d[k] is None else f"{d[k]:.6g}"
            w.writerow(d)


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment(mode: str, device: str, extra: dict | None = None) -> dict:
    import torch
    import triton

    env = {
        "mode": mode,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "perf", *sys.argv[1:]]),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "driver": _nvidia_smi("driver_version") if device == "cuda" else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }
    env.update(extra or {})
    return env


def write_env(env: dict, path: Path) -> None:
    path.write_text(json.dumps(env, indent=2) + "\n")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def speedups(rows: list[Row]) -> dict[tuple[str, str, str], list[float]]:
    """(op, provider, shape_class) -> speedups of tritonnorm over provider, one per shape/layout/
    dtype where both were timed."""
    ours = {
        (r.op, r.layout, r.dtype, r.shape): r.ms for r in rows if r.provider == REFERENCE and r.ok
    }
    out: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        key = (r.op, r.layout, r.dtype, r.shape)
        if r.provider != REFERENCE and r.ok and ours.get(key):
            out.setdefault((r.op, r.provider, r.shape_class), []).append(r.ms / ours[key])
    return out


def write_summary(
    rows: list[Row], env: dict, path: Path, banner: str = "", op_floors: str = ""
) -> None:
    lines = ["# tritonnorm performance summary", ""]
    if banner:
        lines += [f"**{banner}**", ""]
    lines += [
        f"- mode: {env.get('mode')}; device: {env.get('gpu') or env.get('cpu')}; "
        f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
        f"driver {env.get('driver')}; {env.get('date')}",
        f"- copy bandwidth measured in this run (large copy_, read + write bytes): "
        f"{env.get('copy_gbps', float('nan')):.1f} GB/s",
        f"- command: `{env.get('command')}`",
        "",
    ]
    lines += ["## Byte floors used (passes over the input)", "", floor_table_markdown(), ""]
    if op_floors:
        lines += ["Per op, as used for effective GB/s = floor bytes / time:", "", op_floors, ""]
    if env.get("providers_skipped"):
        lines += [
            "Providers: "
            + ", ".join(env.get("providers", []))
            + ". "
            + " ".join(f"{s}." for s in env["providers_skipped"]),
            "",
        ]

    lines += [
        "## Fraction of copy bandwidth (tritonnorm, effective GB/s at the floor)",
        "",
        "| op | layout | dtype | shapes | worst | median | best GB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        if r.provider == REFERENCE and r.ok:
            groups.setdefault((r.op, r.layout, r.dtype), []).append(r)
    for (op, layout, dtype), rs in sorted(groups.items()):
        fr = [r.frac_of_copy for r in rs]
        lines.append(
            f"| {op} | {layout} | {dtype} | {len(rs)} | {min(fr):.1%} | "
            f"{_median(fr):.1%} | {max(r.gbps for r in rs):.0f} |"
        )

    lines += [
        "",
        "## Speedup of tritonnorm (other provider's time / tritonnorm's time)",
        "",
        "| op | vs provider | shape class | n | median | min |",
        "|---|---|---|---|---|---|",
    ]
    sp = speedups(rows)
    per_op: dict[tuple[str, str], list[float]] = {}
    for (op, prov, cls), xs in sorted(sp.items()):
        per_op.setdefault((op, prov), []).extend(xs)
        lines.append(f"| {op} | {prov} | {cls} | {len(xs)} | {_median(xs):.3g}x | {min(xs):.3g}x |")
    for (op, prov), xs in sorted(per_op.items()):
        lines.append(
            f"| {op} | {prov} | **all** | {len(xs)} | {_median(xs):.3g}x | {min(xs):.3g}x |"
        )

    bad = [r for r in rows if not r.ok]
    lines += ["", "## Correctness mismatches and errors (not timed)", ""]
    if bad:
        lines += [f"- {r.op} {r.layout} {r.dtype} {r.shape} {r.provider}: {r.config}" for r in bad]
    else:
        lines.append("None: every provider matched torch eager before it was timed.")
    path.write_text("\n".join(lines) + "\n")
