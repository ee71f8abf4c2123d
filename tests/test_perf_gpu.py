"""``python -m perf.gpu --dry-run``: every stage runs on the CPU and writes its files, so the GPU
command cannot rot between the rare GPU runs; and a budget that runs out stops stages cleanly.
The report's fused-epilogue rows (their inputs, floors, checks and byte counts), and its CUDA-only
numbers (CUDA-graph time, peak memory): None on the CPU, their bookkeeping checked with stand-ins.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # perf/ is a directory of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from perf import floors, report  # noqa: E402
from perf.bytecount import interpreter_active  # noqa: E402
from perf.ops import OPS  # noqa: E402

STAGES = ("env", "warm", "host", "correctness", "timing", "models", "pytest")
EPILOGUE_OPS = ("gn_silu_fwd", "gn_silu_fwd_bwd", "bn_res_relu_fwd", "bn_res_relu_fwd_bwd")
CUDA_ONLY = ("graph_ms", "graph_frac_of_copy", "peak_mib")


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


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One whole dry run (about 60 s alone on two cores, twice that beside another xdist worker
    compiling), shared by the tests that read its files. Its budget only has to be out of reach:
    what a cut budget does is test_an_exhausted_budget_stops_stages_and_keeps_their_files's."""
    out = tmp_path_factory.mktemp("dry")
    return _dry_run(out, "--budget", "840"), out


def test_dry_run_runs_every_stage_and_writes_every_file(dry):
    proc, tmp_path = dry
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    stages = json.loads((tmp_path / "env.json").read_text())["stages"]
    assert list(stages) == list(STAGES)
    assert stages["warm"]["status"].startswith("skipped: dry run")  # nothing to compile
    for name in ("env", "host", "correctness", "timing", "models", "pytest"):
        assert stages[name]["status"].startswith("ok"), (name, stages[name])
    host = json.loads((tmp_path / "env.json").read_text())["host"]
    assert set(host) == {f"{c} {p}" for c in ("bn_train_fwd_bwd", "bn_eval_fwd", "gn_fwd_bwd")
                         for p in ("tritonnorm", "eager")}  # fmt: skip
    assert all(0 < v["host_us"] <= v["per_call_us"] for v in host.values()), host
    assert "by own time" in (tmp_path / "summary.md").read_text()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(tmp_path).parts) <= 2 for p in files)
    names = {p.name for p in files}
    assert {"env.json", "correctness.csv", "results.csv", "summary.md", "pytest.txt"} <= names
    # The interpreter never autotunes: the tuning log is its header alone (filled on a GPU).
    header = (tmp_path / "tuning.csv").read_text().splitlines()
    assert header == ["kernel,tune_key,config,median_ms,chosen"]
    assert any(n.endswith(".png") for n in names)
    checks = _rows(tmp_path / "correctness.csv")
    assert checks and all(r["status"] == "ok" for r in checks), [
        r for r in checks if r["status"] != "ok"
    ]
    assert {r["case"].split()[0] for r in checks} >= {"bn_train", "bn_eval", "in", "gn"}
    assert {r["path"] for r in checks} == {"auto", "fused", "split", "lanes"}
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


# --- the fused-epilogue rows -----------------------------------------------------------------


def test_dry_run_times_and_checks_every_op_the_fused_epilogues_included(dry):
    proc, out = dry
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = _rows(out / "results.csv")
    assert set(EPILOGUE_OPS) <= set(OPS)
    assert {r["op"] for r in rows} == set(OPS)
    for op in EPILOGUE_OPS:
        mine = [r for r in rows if r["op"] == op]
        assert {(r["provider"], r["layout"]) for r in mine} == {
            (p, lay) for p in ("tritonnorm", "eager", "compile")
            for lay in ("contiguous", "channels_last")
        }, op  # fmt: skip
        bad = [r for r in mine if r["note"].startswith(("MISMATCH", "ERROR")) or not r["ms"]]
        assert not bad, bad
    # the byte count labels each stage with its floor-table key and compares it with its floor
    counted = {r["op"]: _passes(r["passes"]) for r in rows if r["provider"] == "tritonnorm"}
    floor = lambda op: {stage: f for stage, (_, f) in counted[op].items()}
    assert floor("bn_res_relu_fwd") == {"fwd+residual": 4}
    assert floor("bn_res_relu_fwd_bwd") == {"fwd+residual": 4, "bwd+residual": 8}
    assert floor("gn_silu_fwd_bwd") == floor("gn_fwd_bwd") == {"fwd": 2, "bwd": 3}  # on chip


def _passes(text: str) -> dict[str, tuple[float, int]]:
    """A row's byte count, "fwd 2.013/2 bwd 3.4/3 OVER", as {stage: (passes, floor)}."""
    words = text.replace(" OVER", "").split()
    return {stage: (float(v.split("/")[0]), int(v.split("/")[1]))
            for stage, v in zip(words[::2], words[1::2], strict=True)}  # fmt: skip


def test_cuda_only_fields_are_in_every_row_and_empty_on_the_cpu(dry):
    proc, out = dry
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = _rows(out / "results.csv")
    assert rows and set(CUDA_ONLY) <= set(rows[0]), list(rows[0])
    assert all(r[f] == "" for r in rows for f in CUDA_ONLY)  # None: measured on CUDA only
    summary = (out / "summary.md").read_text()
    assert "graph: worst / median fraction of copy" in summary
    assert '"worst_graph_frac_of_copy": null' in summary
    assert "(graph replay n/a)" in proc.stdout.strip().splitlines()[-1]


def test_saved_bytes_are_reported_for_every_backward_against_the_composition(dry):
    # saved_tensors_hooks work on the CPU too: every forward+backward row of tritonnorm and
    # eager has them; the fused GN + scale/shift + SiLU keeps nothing beyond its input and
    # output where eager's composition keeps its intermediates.
    proc, out = dry
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [r for r in _rows(out / "results.csv") if r["op"].endswith("_fwd_bwd") and r["ms"]]
    mine = [r for r in rows if r["provider"] in ("tritonnorm", "eager")]
    assert mine and all(r["saved_mib"] and r["saved_extra_mib"] for r in mine), mine
    assert all(r["saved_mib"] == "" for r in _rows(out / "results.csv") if "fwd_bwd" not in r["op"])
    silu = {
        r["provider"]: float(r["saved_extra_mib"]) for r in mine if r["op"] == "gn_silu_fwd_bwd"
    }
    assert silu["tritonnorm"] < silu["eager"], silu
    assert "Saved for the backward" in (out / "summary.md").read_text()


def test_floors_of_the_fused_epilogue_ops_are_the_table_s():
    # scale/shift and the activation add nothing; a residual adds its read (fwd), its reads with
    # x and dy and its gradient's write (bwd)
    assert floors.FLOOR_PASSES["fwd+residual"] == (3, 4)
    assert floors.FLOOR_PASSES["bwd+residual"] == (5, 8)
    bn = (32, 256, 56, 56)  # BatchNorm: streamed, whatever the size
    assert OPS["bn_res_relu_fwd"].stage_floor("fwd", bn) == 4
    assert OPS["bn_res_relu_fwd_bwd"].stage_floor("bwd", bn) == 8
    assert OPS["bn_res_relu_fwd_bwd"].floor_passes(bn) == 4 + 8
    assert OPS["bn_train_fwd_bwd"].floor_passes(bn) == 3 + 5
    # GroupNorm groups of 2 x 64 elements (on chip), 10 x 4096 (streamed)
    for shape, fwd, bwd in (((32, 1280, 8, 8), 2, 3), ((16, 320, 64, 64), 3, 5)):
        assert OPS["gn_silu_fwd"].floor_passes(shape) == OPS["gn_fwd"].floor_passes(shape) == fwd
        assert OPS["gn_silu_fwd_bwd"].floor_passes(shape) == fwd + bwd
        assert OPS["gn_fwd_bwd"].floor_passes(shape) == fwd + bwd


@pytest.mark.skipif(not interpreter_active(), reason="bytes are counted under the interpreter")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "name, shape, floors_",
    [
        # BN channels of 2048 elements: streamed by the floor's rule
        ("bn_res_relu_fwd_bwd", (2, 4, 32, 32), {"fwd+residual": 4, "bwd+residual": 8}),
        # GN groups of 1024 elements: on chip both ways
        ("gn_silu_fwd_bwd", (2, 32, 32, 32), {"fwd": 2, "bwd": 3}),
    ],
)
def test_cpu_mode_counts_the_epilogue_ops_against_their_floors(name, shape, floors_, layout):
    op = OPS[name]
    inp = op.inputs(shape, layout, torch.float32, "cpu")
    got, passes, over = report._counted(op, shape, inp)
    counted = _passes(passes)
    assert {stage: f for stage, (_, f) in counted.items()} == floors_, passes
    # within the floor (the library's kernels meet it on these shapes): input-sized traffic at
    # most the floor, the per-channel rest at most NEGLIGIBLE_PASSES
    assert not over and "OVER" not in passes, passes
    assert all(n <= f + floors.NEGLIGIBLE_PASSES for n, f in counted.values()), passes
    fresh = op.inputs(shape, layout, torch.float32, "cpu")  # the running statistics not updated
    ref = fresh.copy(torch.float64, contiguous=True).step(op.torch_fn, True)()
    same = fresh.copy(contiguous=True).step(op.torch_fn, True)()
    assert report.check(got, ref, same) is None


def test_epilogue_inputs_are_random_extras_copied_cast_and_rotated():
    shape, bf16 = (2, 8, 4, 6), torch.bfloat16
    gn = OPS["gn_silu_fwd_bwd"].inputs(shape, "channels_last", bf16, "cpu")
    plain = OPS["gn_fwd_bwd"].inputs(shape, "channels_last", bf16, "cpu")
    x, rm, rv, w, b, scale, shift = gn.args
    assert rm is None and rv is None
    assert scale.shape == shift.shape == (2, 8) and scale.dtype == shift.dtype == bf16
    assert 0.9 < scale.float().mean() < 1.1 and 0.03 < (scale.float() - 1).std() < 0.3
    assert shift.count_nonzero() == shift.numel() and 0.2 < shift.float().std() < 1.0
    # the gradient is taken with respect to the extras too; the other tensors are as without them
    assert gn.grad_inputs == (x, w, b, scale, shift)
    for a, p in zip((x, w, b, gn.dy), (plain.args[0], *plain.args[3:], plain.dy), strict=True):
        assert torch.equal(a, p)
    bn = OPS["bn_res_relu_fwd_bwd"].inputs(shape, "channels_last", bf16, "cpu")
    x, rm, rv, w, b, residual = bn.args
    assert bn.grad_inputs == (x, w, b, residual) and bn.state == (rm, rv)
    assert residual.shape == x.shape and residual.is_contiguous(memory_format=torch.channels_last)
    assert residual.count_nonzero() == residual.numel() and 0.5 < residual.float().std() < 2
    assert not torch.equal(residual, bn.dy) and not torch.equal(residual, x)
    # copies: fresh tensors, cast, still differentiated; another seed: other extras
    c = bn.copy(torch.float64, contiguous=True)
    assert all(t.dtype == torch.float64 for t in c.args) and c.args[5] is not residual
    assert c.grad_inputs[3] is c.args[5] and c.args[5].requires_grad
    assert torch.equal(c.args[5], residual.double())
    other = OPS["bn_res_relu_fwd_bwd"].inputs(shape, "channels_last", bf16, "cpu", seed=1)
    assert not torch.equal(other.args[5], residual)
    # without a backward nothing requires grad, and the extras are there all the same
    fwd = OPS["gn_silu_fwd"].inputs(shape, "contiguous", bf16, "cpu")
    assert len(fwd.args) == 7 and not any(t.requires_grad for t in fwd.args if t is not None)


@pytest.mark.parametrize("layout, dtype", [("contiguous", torch.float32),
                                           ("channels_last", torch.bfloat16),
                                           ("strided", torch.float16)])  # fmt: skip
def test_a_relu_s_pre_activation_is_kept_off_its_kink(layout, dtype):
    # where z is within rounding of 0, float32 and float64 can take different sides: a gradient
    # off by all of dy (eager float32 on ResNet's (32, 256, 56, 56) did); the residual is moved
    from perf.ops import KINK_CLEARANCE, make_inputs

    op, shape = OPS["bn_res_relu_fwd_bwd"], (8, 16, 32, 32)
    inp = op.inputs(shape, layout, dtype, "cpu")
    raw = make_inputs(shape, layout, dtype, "cpu", running_stats=True, backward=True,
                      epilogue=op.epilogue)  # fmt: skip
    r, r0 = inp.args[-1], raw.args[-1]
    z = OPS["bn_train_fwd"].torch_fn(*inp.copy(torch.float64).args[:5]) + r.double()
    z0 = OPS["bn_train_fwd"].torch_fn(*raw.copy(torch.float64).args[:5]) + r0.double()
    near = z0.abs() < KINK_CLEARANCE
    assert near.sum() > 10  # the shape is large enough to have some
    assert z.abs().min() >= KINK_CLEARANCE
    moved = r != r0
    assert torch.equal(moved, near) and moved.sum() < 1e-3 * r.numel()
    assert (r.double() - r0.double()).abs().max() < 0.1
    for a, b in zip(inp.args[:5], raw.args[:5], strict=True):  # nothing else changes
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(inp.dy, raw.dy)


class _DoubleGrad(torch.autograd.Function):
    """Identity forward, twice the gradient backward: one wrong gradient, the rest right."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


@pytest.mark.parametrize(
    "name, extra", [("gn_silu_fwd_bwd", 0), ("gn_silu_fwd_bwd", 1), ("bn_res_relu_fwd_bwd", 0)]
)
def test_the_check_covers_each_extra_s_gradient(name, extra):
    op = OPS[name]
    shape = (2, 64, 4, 4) if name.startswith("gn") else (2, 16, 8, 8)

    def wrong(x, rm, rv, w, b, *extras):
        extras = list(extras)
        extras[extra] = _DoubleGrad.apply(extras[extra])
        return op.torch_fn(x, rm, rv, w, b, *extras)

    provs = {"right": lambda op: (op.torch_fn, contextlib.nullcontext),
             "wrong": lambda op: (wrong, contextlib.nullcontext)}  # fmt: skip
    right, bad = report.run_case(op, "c", shape, "contiguous", "float32", "cpu", provs, 1.0)
    outputs = op.inputs(shape, "contiguous", torch.float32, "cpu").step(op.torch_fn, True)()
    assert len(outputs) == 1 + 3 + len(op.epilogue.extras) + 2 * name.startswith("bn")
    assert right.ms is not None and not right.note, right.note
    # y, dx, dweight, dbias, then the extras' gradients: the doubled one is caught
    assert bad.ms is None and bad.note.startswith(f"MISMATCH vs float64 torch: output {4 + extra}")


def test_the_composition_is_the_one_tritonnorm_fuses():
    x, w, b = torch.randn(2, 8, 3, 5, dtype=torch.float64), torch.rand(8) + 0.5, torch.randn(8)
    scale, shift = 1 + 0.1 * torch.randn(2, 8), torch.randn(2, 8)
    w, b, scale, shift = (t.double() for t in (w, b, scale, shift))
    got = OPS["gn_silu_fwd"].torch_fn(x, None, None, w, b, scale, shift)
    want = F.silu(
        F.group_norm(x, 8, w, b, 1e-5) * scale[:, :, None, None] + shift[:, :, None, None]
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    rm, rv, r = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), x.flip(0)
    got = OPS["bn_res_relu_fwd"].torch_fn(x, rm.clone(), rv.clone(), w, b, r)
    want = F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5) + r)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- CUDA-only numbers: their bookkeeping ------------------------------------------------------


def _row(op="gn_silu_fwd", provider="tritonnorm", **kw) -> report.Row:
    return report.Row(op, "contiguous", "bfloat16", "16x320x64x64", "diffusion_gn", provider, **kw)


def test_a_failed_capture_keeps_the_row_and_says_why():
    row = _row(ms=0.3, note="_norm_apply_kernel: BLOCK_S=64")

    def capture(step):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\n...")

    report.gpu_extras(row, lambda: None, 1e9, 2000.0, graph=capture, peak=lambda step: 48.0)
    assert (row.ms, row.graph_ms, row.graph_frac_of_copy, row.peak_mib) == (0.3, None, None, 48.0)
    assert row.note == ("graph: RuntimeError: CUDA error: operation not permitted when stream is "
                        "capturing; _norm_apply_kernel: BLOCK_S=64")  # fmt: skip

    def no_peak(step):
        raise torch.OutOfMemoryError("CUDA out of memory")

    row = _row(ms=0.3)
    report.gpu_extras(row, lambda: None, 1e9, 2000.0, graph=lambda step: 0.8, peak=no_peak)
    assert row.graph_ms == 0.8 and row.peak_mib is None
    assert math.isclose(row.graph_frac_of_copy, 1e9 / 0.8e-3 / 1e9 / 2000.0)
    assert row.note == "peak: OutOfMemoryError: CUDA out of memory"


def test_summary_and_headline_show_graph_time_host_overhead_and_peak(tmp_path):
    rows = [_row(provider=p, ms=ms, frac_of_copy=f, graph_ms=g, graph_frac_of_copy=gf, peak_mib=m)
            for p, ms, f, g, gf, m in [("tritonnorm", 0.30, 0.10, 0.05, 0.60, 40.0),
                                       ("tritonnorm", 0.32, 0.09, 0.04, 0.75, 40.0),
                                       ("tritonnorm", 0.50, 0.06, 0.10, 0.30, 80.0),
                                       ("eager", 0.09, 0.3, 0.08, 0.40, 120.0),
                                       ("eager", 0.10, 0.3, 0.09, 0.35, 130.0),
                                       ("eager", 0.11, 0.2, None, None, 100.0)]]  # fmt: skip
    for i, r in enumerate(rows):
        r.shape = ("16x320x64x64", "1x128x512x512", "8x128x128x128")[i % 3]
    head = report.headline(rows)
    assert head["worst_graph_frac_of_copy"] == 0.30 and head["worst_frac_of_copy"] == 0.06
    lines = report.summary_lines(rows)
    assert "| gn_silu_fwd | 6.0% / 9.0% | 30.0% / 60.0% | eager | 3 |" in "\n".join(lines)
    per_prov = {line.split(" | ")[1]: line for line in lines if line.startswith("| gn_silu_fwd |")}
    # medians: ms; graph ms; ms - graph ms per case (0.25, 0.28, 0.40); peak
    assert per_prov["tritonnorm"] == "| gn_silu_fwd | tritonnorm | 3 | 0.32 | 0.05 | 0.28 | 40.0 |"
    assert per_prov["eager"] == "| gn_silu_fwd | eager | 3 | 0.1 | 0.09 | 0.01 | 120.0 |"
    cpu = report.summary_lines([_row(ms=40.0, frac_of_copy=1e-6)])
    assert not any("host overhead" in line for line in cpu)
    assert "| gn_silu_fwd | 0.0% / 0.0% | - | - | 0 |" in "\n".join(cpu)
    assert [p.name for p in report.write_plots(rows, tmp_path)] == [
        "fraction_of_copy.png",
        "speedup.png",
    ]


# --- LayerNorm2d / RMSNorm2d rows --------------------------------------------------------------

POSITION_OPS = ("ln2d_fwd", "ln2d_fwd_bwd", "rms2d_fwd", "rms2d_fwd_bwd")


def test_dry_run_times_and_checks_the_position_norms_against_timm_s_composition(dry):
    proc, out = dry
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [r for r in _rows(out / "results.csv") if r["op"] in POSITION_OPS]
    assert {(r["op"], r["provider"], r["layout"]) for r in rows} == {
        (op, p, lay) for op in POSITION_OPS for p in ("tritonnorm", "eager", "compile")
        for lay in ("contiguous", "channels_last")
    }  # fmt: skip
    bad = [r for r in rows if r["note"].startswith(("MISMATCH", "ERROR")) or not r["ms"]]
    assert not bad, bad
    counted = {r["op"]: _passes(r["passes"]) for r in rows if r["provider"] == "tritonnorm"}
    assert {s: f for s, (_, f) in counted["ln2d_fwd_bwd"].items()} == {"fwd": 2, "bwd": 3}
    assert not any("OVER" in r["passes"] for r in rows), [r["passes"] for r in rows]
    checks = _rows(out / "correctness.csv")
    for norm in ("ln2d", "rms2d"):
        mine = [r for r in checks if r["case"].split()[0] == norm]
        # no fused / lanes paths across channels (the main cases come before the budget ends)
        assert {r["path"] for r in mine} == {"auto", "split"}, norm
        assert all(r["status"] == "ok" for r in mine), mine


def test_floors_of_the_position_norm_ops_are_the_table_s():
    # a row is one position's C channels: on chip, whatever the spatial size
    for shape in ((32, 96, 56, 56), (32, 768, 7, 7), (2, 8192, 4, 4)):
        for op in ("ln2d", "rms2d"):
            assert OPS[f"{op}_fwd"].group_numel(shape) == shape[1]
            assert OPS[f"{op}_fwd"].floor_passes(shape) == 2
            assert OPS[f"{op}_fwd_bwd"].floor_passes(shape) == 2 + 3
    # besides: the statistics, one float32 per (sample, position) each way (2 for LayerNorm)
    bf16, shape = torch.bfloat16, (32, 96, 56, 56)
    assert OPS["ln2d_fwd"].small_passes(shape, bf16) == floors.NEGLIGIBLE_PASSES + 2 * 4 / 192
    assert OPS["rms2d_fwd"].small_passes(shape, bf16) == floors.NEGLIGIBLE_PASSES + 4 / 192
    assert OPS["bn_train_fwd"].small_passes(shape, bf16) == floors.NEGLIGIBLE_PASSES


@pytest.mark.skipif(not interpreter_active(), reason="bytes are counted under the interpreter")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", ["ln2d_fwd_bwd", "rms2d_fwd_bwd"])
def test_cpu_mode_counts_the_position_norms_against_their_floors(name, layout):
    op, shape = OPS[name], (2, 96, 32, 32)
    inp = op.inputs(shape, layout, torch.bfloat16, "cpu")
    assert (inp.args[4] is None) == name.startswith("rms")  # RMSNorm2d has no bias
    got, passes, over = report._counted(op, shape, inp)
    assert {stage: f for stage, (_, f) in _passes(passes).items()} == {"fwd": 2, "bwd": 3}
    assert not over and "OVER" not in passes, passes
    fresh = op.inputs(shape, layout, torch.bfloat16, "cpu")
    ref = fresh.copy(torch.float64, contiguous=True).step(op.torch_fn, True)()
    same = fresh.copy(contiguous=True).step(op.torch_fn, True)()
    assert report.check(got, ref, same) is None


def test_the_position_norm_anchors_are_timm_s_compositions():
    # timm's LayerNorm2d: permute to NHWC, F.layer_norm over C, permute back; its RmsNorm2d
    # (default, no apex): x * rsqrt(mean over dim 1 of x^2 + eps) * weight; eps 1e-6
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    w, b = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64)
    for layout in ("contiguous", "channels_last"):
        xl = x.contiguous(memory_format=torch.channels_last) if layout != "contiguous" else x
        got = OPS["ln2d_fwd"].torch_fn(xl, None, None, w, b)
        want = F.layer_norm(xl.permute(0, 2, 3, 1), (8,), w, b, 1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got.stride() == want.stride()  # the composition's own output layout
        got = OPS["rms2d_fwd"].torch_fn(xl, None, None, w, None)
        want = xl * torch.rsqrt(xl.pow(2).mean(dim=1, keepdim=True) + 1e-6) * w.reshape(1, -1, 1, 1)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
