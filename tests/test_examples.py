"""The BN-vs-IN study (examples/bn_vs_in.py) in its --quick form: every experiment at tiny sizes,
through the real kernels (the Triton interpreter without a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

import tritonnorm as tn

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "bn_vs_in.py"
OUTPUTS = (
    "results.json",
    "results.md",
    "accuracy_vs_batch_size.png",
    "loss_curves.png",
    "generative_dependence.png",
    "regularisation_and_intensity.png",
)


def test_quick_study(tmp_path: Path):
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    for name in OUTPUTS:
        assert (tmp_path / name).stat().st_size > 0, name

    results = json.loads((tmp_path / "results.json").read_text())
    expected = (
        "Triton kernels on CUDA" if torch.cuda.is_available() else "Triton interpreter on CPU"
    )
    assert results["backend"] == expected
    dependence = results["batch_dependence"]
    assert dependence["batch_norm"] > 0
    assert dependence["instance_norm"] == 0.0
    if hasattr(tn, "GroupNorm"):
        assert dependence["group_norm"] == 0.0
    else:
        assert dependence["group_norm"] is None
        assert "not available yet" in results["norms"]["group_norm"]
        assert "not available yet" in (tmp_path / "results.md").read_text()
