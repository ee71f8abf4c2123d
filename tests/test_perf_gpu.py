"""``python -m perf.gpu --dry-run``: every stage runs on the CPU and writes its files, so the GPU
command cannot rot between the rare GPU runs; and a budget that runs out stops stages cleanly."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "warm", "correctness", "timing", "pytest")


def _dry_run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "perf.gpu", "--dry-run", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_dry_run_runs_every_stage_and_writes_every_file(tmp_path):
    proc = _dry_run(tmp_path, "--budget", "240")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    stages = json.loads((tmp_path / "env.json").read_text())["stages"]
    assert list(stages) == list(STAGES)
    assert stages["warm"]["status"].startswith("skipped: dry run")  # nothing to compile
    for name in ("env", "correctness", "timing", "pytest"):
        assert stages[name]["status"].startswith("ok"), (name, stages[name])
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(tmp_path).parts) <= 2 for p in files)
    names = {p.name for p in files}
    assert {"env.json", "correctness.csv", "results.csv", "summary.md", "pytest.txt"} <= names
    assert any(n.endswith(".png") for n in names)
    checks = _rows(tmp_path / "correctness.csv")
    assert checks and all(r["status"] == "ok" for r in checks), [
        r for r in checks if r["status"] != "ok"
    ]
    assert {r["case"].split()[0] for r in checks} >= {"bn_train", "bn_eval", "in", "gn"}
    assert {r["path"] for r in checks} == {"auto", "fused", "split"}
    timed = _rows(tmp_path / "results.csv")
    assert {r["provider"] for r in timed} >= {"tritonnorm", "eager", "compile"}
    assert all(r["ms"] for r in timed if r["provider"] == "tritonnorm")
    # the last lines: the banner, the table's header, one line per stage, the headline
    tail = proc.stdout.strip().splitlines()[-(len(STAGES) + 3) :]
    assert "NOT A GPU MEASUREMENT" in "\n".join(tail) and tail[-1].startswith("worst fraction")
    assert "NOT A GPU MEASUREMENT" in (tmp_path / "summary.md").read_text()


def test_an_exhausted_budget_stops_stages_and_keeps_their_files(tmp_path):
    proc = _dry_run(tmp_path, "--budget", "14", "--stages", "env,warm,correctness,timing")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    stages = json.loads((tmp_path / "env.json").read_text())["stages"]
    assert "stopped at budget" in stages["correctness"]["status"], stages
    assert stages["pytest"]["status"].startswith("skipped"), stages
    assert _rows(tmp_path / "correctness.csv")  # what ran before the deadline is kept
    assert (tmp_path / "results.csv").exists() and (tmp_path / "summary.md").exists()
