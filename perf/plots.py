"""Matplotlib figures: effective bandwidth vs size per op, speedup per shape class per op."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from perf.results import REFERENCE, Row, speedups

matplotlib.use("Agg")  # no display needed; pyplot picks the backend on the first figure

_MARKERS = {"tritonnorm": "o", "eager": "s", "compile": "^", "flag_gems": "D", "liger_kernel": "v"}


def bandwidth_plot(rows: list[Row], op: str, path: Path, banner: str = "") -> None:
    """Effective GB/s (floor bytes / time) vs floor bytes, a panel per layout x dtype."""
    ok = [r for r in rows if r.op == op and r.ok]
    layouts = sorted({r.layout for r in ok})
    dtypes = sorted({r.dtype for r in ok})
    if not ok:
        return
    fig, axes = plt.subplots(
        len(layouts),
        len(dtypes),
        squeeze=False,
        sharey=True,
        figsize=(4.5 * len(dtypes), 3.6 * len(layouts)),
    )
    for i, layout in enumerate(layouts):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            cell = [r for r in ok if r.layout == layout and r.dtype == dtype]
            for prov in sorted({r.provider for r in cell}, key=lambda p: p != REFERENCE):
                pts = sorted((r.floor_bytes / 2**20, r.gbps) for r in cell if r.provider == prov)
                ax.plot(
                    *zip(*pts, strict=True),
                    marker=_MARKERS.get(prov, "x"),
                    label=prov,
                    linewidth=2 if prov == REFERENCE else 1,
                )
            copy = cell[0].copy_gbps if cell else 0
            ax.axhline(copy, color="k", linestyle="--", linewidth=1, label="copy_ bandwidth")
            ax.axhline(0.9 * copy, color="grey", linestyle=":", linewidth=1, label="90% of copy")
            ax.set_xscale("log")
            ax.set_title(f"{layout}, {dtype}", fontsize=9)
            ax.set_xlabel("floor bytes (MiB)")
            if j == 0:
                ax.set_ylabel("effective GB/s")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"{op}: effective bandwidth at the byte floor" + (f"\n{banner}" if banner else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speedup_plot(rows: list[Row], op: str, path: Path, banner: str = "") -> None:
    """Median (bar) and min (tick) speedup of tritonnorm over each provider, per shape class."""
    sp = {k: v for k, v in speedups(rows).items() if k[0] == op}
    if not sp:
        return
    classes = sorted({k[2] for k in sp})
    provs = sorted({k[1] for k in sp})
    width = 0.8 / len(provs)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(classes), 3.8))
    for k, prov in enumerate(provs):
        xs, med, low = [], [], []
        for i, cls in enumerate(classes):
            vals = sorted(sp.get((op, prov, cls), []))
            if vals:
                xs.append(i + (k - (len(provs) - 1) / 2) * width)
                med.append(statistics.median(vals))
                low.append(vals[0])
        ax.bar(xs, med, width, label=f"vs {prov} (median)")
        ax.scatter(xs, low, marker="_", s=200, color="k", zorder=3)
    ax.axhline(1.0, color="k", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(classes)), classes, fontsize=8)
    ax.set_ylabel("speedup of tritonnorm (x)")
    ax.set_title(
        f"{op}: speedup per shape class (bar: median, tick: min)"
        + (f"\n{banner}" if banner else ""),
        fontsize=10,
    )
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(rows: list[Row], out: Path, banner: str = "") -> list[Path]:
    paths = []
    for op in sorted({r.op for r in rows}):
        for kind, fn in (("bandwidth", bandwidth_plot), ("speedup", speedup_plot)):
            p = out / f"{kind}_{op}.png"
            p.unlink(missing_ok=True)
            fn(rows, op, p, banner)
            if p.exists():
                paths.append(p)
    return paths
