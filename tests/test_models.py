"""``perf.models`` on the CPU: the training step of each real model (tiny configurations) through
the interpreter beside torch, its check, and tritonnorm's host figures per step on
perf.hostcost's emulated launch path. The GPU measurements themselves cannot run here: their
bookkeeping (budget order, speed-ups, the check's verdicts) is tested on stand-ins.

Kept under a minute on the 2-core CI machine: one converted variant (the fused one) stepped per
model but efficientnet_b0 (the dry run steps it), the emulation's steps cut to 3. Models whose package does not import are skipped rows,
and their assertions skip with the reason.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # perf/ is a directory of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from perf import models as pm  # noqa: E402

TESTED = ["resnet50", "convnext_tiny", "efficientnet_b0", "unet2d"]
# through the interpreter: efficientnet_b0's 22 norms cost 9 s there, over this file's minute
# (the dry run steps it; here its host figures alone)
STEPPED = ["resnet50", "convnext_tiny", "unet2d"]
VARIANTS = ["torch", "tn_fused", "graph_torch", "compile"]


@pytest.fixture(scope="module")
def stepped() -> dict[tuple[str, str], pm.Row]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the dry run: the convolutions beside other jobs
    try:
        rows = pm.run(STEPPED, VARIANTS, pm.Settings(device="cpu", tiny=True), math.inf,
                      log=lambda line: None)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return {(r.model, r.variant): r for r in rows}


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> dict[tuple[str, str], pm.HostRow]:
    from perf import hostcost

    if reason := hostcost.unavailable(interpreter=False):
        pytest.skip(f"no emulation here: {reason}")
    path = tmp_path_factory.mktemp("host") / "host.json"
    rows = pm.host_emulation_subprocess(TESTED, path, steps=3)
    return {(r.model, r.variant): r for r in rows}


def _available(row) -> None:
    if row.status.startswith("skipped: cannot import"):
        pytest.skip(row.status)


@pytest.mark.parametrize("model", STEPPED)
def test_the_fused_conversion_steps_like_torch(stepped, model):
    _available(stepped[model, "torch"])
    for variant in ("torch", "tn_fused"):
        row = stepped[model, variant]
        assert row.status == "ok", (variant, row.status, row.check)
        assert "allowed 1.0e-06" in row.check and row.first_step_s > 0
    # on the CPU nothing is timed: those cells stay empty, never a CPU time posing as a GPU's
    assert stepped[model, "tn_fused"].step_ms is None


def test_captured_and_compiled_variants_are_skipped_on_the_cpu_saying_why(stepped):
    for model in STEPPED:
        assert stepped[model, "graph_torch"].status == "skipped: CUDA graphs need a GPU"
        assert stepped[model, "compile"].status.startswith("skipped: inductor on the CPU")


@pytest.mark.parametrize("model", TESTED)
def test_host_figures_count_every_norm_forward_and_backward(host, model):
    for variant in ("tn", "tn_fused"):
        row = host[model, variant]
        if row.status.startswith("skipped"):
            pytest.skip(row.status)
        assert row.status == "ok" and row.norm_modules > 0
        assert row.norm_calls == 2 * row.norm_modules  # one forward, one backward node each
        assert row.launches >= row.norm_calls  # every call launches at least one kernel
        assert 0 < row.forward_us < row.host_us and 0 < row.backward_us < row.host_us
        assert row.recompiles == 0  # the warm-up steps planned and compiled everything


def test_host_figures_count_resnet_s_batch_norms(host):
    row = host["resnet50", "tn_fused"]
    if row.status.startswith("skipped"):
        pytest.skip(row.status)
    model = pm.MODELS["resnet50"].build(True)
    assert row.norm_modules == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_the_check_fails_a_gradient_off_by_more_than_allowed():
    grads = {"w": torch.ones(4), "tiny": torch.full((4,), 1e-9)}
    ref = pm.Grads(1.0, grads)
    allowed = dict.fromkeys(["loss", "w", "tiny"], 1e-6)
    assert pm.judge(pm.relative_errors(ref, ref), allowed).ok
    off = pm.Grads(1.0, {**grads, "w": torch.tensor([1.0, 1.0, 1.0, 1.001])})
    verdict = pm.judge(pm.relative_errors(off, ref), allowed)
    assert not verdict.ok and verdict.worst == "w"
    # a gradient that is rounding alone is judged against the largest one's norm
    noisy = pm.Grads(1.0, {**grads, "tiny": torch.full((4,), 2e-9)})
    assert pm.judge(pm.relative_errors(noisy, ref), allowed).ok
    missing = pm.Grads(1.0, {"w": grads["w"]})
    assert not pm.judge(pm.relative_errors(missing, ref), allowed).ok
    assert not pm.judge(pm.relative_errors(pm.Grads(1.1, grads), ref), allowed).ok


def test_an_exhausted_budget_keeps_a_row_per_model_and_variant_saying_so():
    seen = []
    rows = pm.run(["resnet50", "unet2d"], ["torch", "compile"], pm.Settings(device="cpu", tiny=True),
                  deadline=0.0, on_rows=seen.append, log=lambda line: None)  # fmt: skip
    assert [(r.model, r.variant) for r in rows] == [
        ("resnet50", "torch"), ("resnet50", "compile"), ("unet2d", "torch"), ("unet2d", "compile")
    ]  # fmt: skip
    assert all(r.status == "skipped: out of budget" for r in rows)
    assert len(seen) == 4  # rows handed on after each model of each phase


def test_eager_variants_of_every_model_come_before_compiled_ones():
    phases = [pm.VARIANTS[v].phase for v in pm.VARIANTS]
    assert phases == sorted(phases) and pm.VARIANTS["tn_fused"].phase == 0
    assert {v.name for v in pm.VARIANTS.values() if v.phase == 0} == {"torch", "tn", "tn_fused"}


def test_speedups_are_against_eager_and_compile_of_the_same_model(tmp_path):
    row = lambda m, v, ms: pm.Row(m, v, "cuda", 8, 224, "bfloat16", status="ok", step_ms=ms)
    rows = [row("a", "torch", 10.0), row("a", "tn", 8.0), row("a", "compile", 5.0),
            row("b", "tn", 4.0)]  # fmt: skip
    pm.fill_speedups(rows)
    assert (rows[1].vs_eager, rows[1].vs_compile) == (1.25, 0.625)
    assert rows[3].vs_eager is None and rows[3].vs_compile is None
    pm.write_csv(rows, tmp_path / "models.csv")
    assert (tmp_path / "models.csv").read_text().count("\n") == 5
    assert len(pm.markdown_table(rows)) == 2 + len(rows)
