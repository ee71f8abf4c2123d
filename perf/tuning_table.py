"""``python -m perf.tuning_table TUNING_CSV [...] --arch sm90``: the committed default configs.

perf.gpu's ``tuning.csv`` holds every autotune candidate's median time per launch. This turns
one or more of them into ``tritonnorm/kernels/tuned/<arch>.json``: per class of launch (kernel,
on-chip or streamed, channels-fast layout, batch reduced), the candidate :class:`Features`
(tile, per-element lanes, split relative to the heuristic's, warps) that cost least over every
measured launch of the class (the sum of log(time / best time), a candidate missing from a
launch counted at that launch's first candidate). tuning.py uses the table by default, so no
call is timed; with autotuning on, measurements replace it.

The candidates of each logged launch are rebuilt from its tune key (the reduction's view) with
the H100's program count, and each logged config is matched to the features that name it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch

_VIEW = re.compile(
    r"View\(N=(\d+), C=(\d+), S=(\d+), stride_n=(-?\d+), stride_c=(-?\d+), stride_s=(-?\d+)\), "
    r"group_size=(\d+), reduce_batch=(True|False), dtype=torch\.(\w+)"
)
_CONFIG = re.compile(r"(\w+)=(\w+)")
SMS = {"sm90": 132}
OUT = Path(__file__).resolve().parent.parent / "tritonnorm" / "kernels" / "tuned"


def _shape(key: str):
    from tritonnorm.kernels.geometry import Reduction

    m = _VIEW.search(key)
    if m is None:
        return None
    n, c, s, _, stride_c, _, k, rb, dtype = m.groups()
    n, c, s, k = int(n), int(c), int(s), int(k)
    acc_dtype = torch.float64 if dtype == "float64" else torch.float32
    channels_fast = s == 1 or (int(stride_c) == 1 and c > 1)
    return Reduction.of(n, c, s, k, rb == "True", channels_fast, acc_dtype)


def _parse(cfg: str, kernel: str) -> tuple:
    d = dict(_CONFIG.findall(cfg))
    warps = int(d.pop("warps"))
    if "apply" not in kernel:
        d.setdefault("LANES", "False")  # logged before per-element accumulation existed
    kw = {k: (v == "True" if v in ("True", "False") else int(v)) for k, v in d.items()}
    return tuple(sorted(kw.items())), warps


def _features_of(kernel: str, shape, logged: set) -> tuple[bool, dict] | None:
    """(fused, {config identity: features}) of the candidate set holding every logged config."""
    from tritonnorm.kernels import config

    options = []
    if "apply" in kernel:
        options = [(False, config.apply_configs(shape, epilogue=e)) for e in (False, True)]
    else:
        backward = "grad" in kernel
        for fused in (True, False):
            for e in (False, True):
                if fused and config.fused_blocks(shape, backward, e) is None:
                    continue
                options.append((fused, config.reduction_configs(shape, fused, backward, e)))
    for fused, cands in options:
        ident = {}
        for feat, cfg in cands.features.items():
            ident.setdefault((tuple(sorted(cfg.kwargs.items())), cfg.num_warps), feat)
        if logged <= set(ident):
            return fused, ident
    return None


def _clear_candidate_caches() -> None:
    from tritonnorm.kernels import config

    config._reduction_configs.cache_clear()
    config.apply_configs.cache_clear()
    config._fused_blocks.cache_clear()


def build(paths: list[Path], arch: str) -> dict:
    from tritonnorm.kernels import config

    rows = [r for p in paths for r in csv.DictReader(p.open())]
    launches = defaultdict(list)
    for r in rows:
        launches[r["kernel"], r["tune_key"]].append(r)
    # The GPU's candidate lists (the interpreter's are shorter), cached apart from this run's.
    saved, interpret = config.target_programs, config.INTERPRET
    config.target_programs = lambda: config.PROGRAMS_PER_SM * SMS[arch]
    config.INTERPRET = False
    _clear_candidate_caches()
    # class -> features -> list of log slowdowns; class -> launches seen
    scores: dict[tuple, dict] = defaultdict(lambda: defaultdict(float))
    counts: dict[tuple, int] = defaultdict(int)
    heuristic: dict[tuple, float] = defaultdict(float)  # the first candidate's log slowdowns
    skipped = 0
    try:
        for (kernel, key), cands in launches.items():
            shape = _shape(key)
            logged = {_parse(r["config"], kernel): float(r["median_ms"]) for r in cands}
            found = _features_of(kernel, shape, set(logged)) if shape is not None else None
            if found is None:
                skipped += 1
                continue
            fused, ident = found
            best = min(logged.values())
            first = logged[next(iter(logged))]
            cls = (kernel, fused, shape.channels_fast, shape.reduce_batch)
            counts[cls] += 1
            heuristic[cls] += math.log(first / best)
            by_features = {ident[i]: t for i, t in logged.items()}
            for feat in {f for c in scores[cls] for f in [c]} | set(by_features):
                scores[cls][feat] += 0.0  # every features ever seen in the class
            for feat in scores[cls]:
                scores[cls][feat] += math.log(by_features.get(feat, first) / best)
    finally:
        config.target_programs, config.INTERPRET = saved, interpret
        _clear_candidate_caches()
    rules = []
    for cls, by_feat in sorted(scores.items(), key=lambda kv: str(kv[0])):
        feat, loss = min(by_feat.items(), key=lambda kv: (kv[1], str(kv[0])))
        n = counts[cls]
        kernel, fused, channels_fast, reduce_batch = cls
        rules.append({
            "kernel": kernel, "fused": fused, "channels_fast": channels_fast,
            "reduce_batch": reduce_batch, "features": asdict(feat),
            "launches": n, "mean_slowdown_vs_best": round(math.exp(loss / n), 4),
            "heuristic_slowdown_vs_best": round(math.exp(heuristic[cls] / n), 4),
        })  # fmt: skip
    return {
        "arch": arch,
        "made_from": [str(p) for p in paths],
        "made_by": "python -m perf.tuning_table",
        "launches_skipped": skipped,
        "rules": rules,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.tuning_table", description=__doc__)
    parser.add_argument("csv", nargs="+", type=Path)
    parser.add_argument("--arch", default="sm90", choices=sorted(SMS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    table = build(args.csv, args.arch)
    out = args.out or OUT / f"{args.arch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    for r in table["rules"]:
        print(f"{r['kernel']:28s} fused={r['fused']!s:5s} channels_fast={r['channels_fast']!s:5s} "
              f"reduce_batch={r['reduce_batch']!s:5s} {r['features']} over {r['launches']} "
              f"launches: {r['mean_slowdown_vs_best']}x the best (heuristic "
              f"{r['heuristic_slowdown_vs_best']}x)")  # fmt: skip
    print(f"wrote {out} ({table['launches_skipped']} launches not matched)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
