"""``python -m perf.gpu``: one budgeted command that turns a short GPU loan into verified results.

Written for a lent machine (one H100 or H200, no network, its own python3 with torch and triton,
10 minutes per command), from a plain checkout::

    PYTHONPATH=. python3 -m perf.gpu --out perf/results/gpu-run      # --budget 480 (seconds)

Stages, in priority order; each gets at most its share of the budget (``SHARES``), what earlier
ones leave goes to the later ones, and each stops cleanly at its deadline and writes its files as
soon as it ends (a later crash loses nothing). Every case's exception is recorded as a failure.

1. env: GPU, SM count, L2, driver, torch, triton; device-to-device copy bandwidth (read + write).
2. warm: compile what stages 3-4 launch (the fused epilogues' kernels included), one process per
   core, into Triton's cache (on a fresh machine the JIT would otherwise compile some 2500
   specialisations one after another).
2b. host: where a call's host time goes (host time to issue a call against the time per call,
   tritonnorm and eager, on three cases; cProfile of tritonnorm's calls into summary.md).
3. correctness: every kernel path (BN train / eval, IN with and without running statistics, GN,
   LayerNorm2d / RMSNorm2d; fused and split forced both ways; forward + backward) x contiguous /
   channels_last / strided x float32 / bfloat16 / float16 / float64 x odd shapes, the
   large-offset and long-reduction numerics, the widest rows across channels, and (GPU only) one
   bf16 tensor of more than 2**31 elements; against torch in float64 by the suite's tolerances,
   outputs poisoned with NaN first, a second call bitwise equal.
4. timing: the report's quick set (perf/report.py): tritonnorm vs eager vs torch.compile, the
   fused epilogues (GroupNorm + scale/shift + SiLU, BatchNorm + residual + ReLU) against the same
   composition in torch, LayerNorm2d / RMSNorm2d against timm's composition (perf.ops.Timm). Per
   case and provider: the time per call (do_bench, host overhead included), the time under
   CUDA-graph replay (the GPU's alone) and the peak memory of a call.
4b. models: perf.models, a training step of real models (resnet50, convnext_tiny,
   efficientnet_b0, diffusers' UNet2DModel where it imports) with and without tritonnorm: the
   eager variants of every model first, then the CUDA-graph captures, then torch.compile; rows
   into env.json ("models") and a table into summary.md as each model's rows exist (the 8-file
   limit: ``python -m perf.models --out DIR`` writes models.csv and models.png instead). Dry
   run: resnet50's tiny configuration, eager variants, through the interpreter.
5. pytest: the suite natively with what is left (SyncBatchNorm's multi-process tests and the
   CPU-side tools excluded), in a subprocess with a wall-clock limit.

Output under --out (at most 8 files): env.json, correctness.csv, results.csv, tuning.csv (every
autotune candidate's time), pytest.txt, fraction_of_copy.png, speedup.png, summary.md. The last lines printed are the stage table.
``--dry-run`` runs every stage but warm on the CPU through Triton's interpreter with tiny shapes
and a CPU timer: NOT a GPU measurement (CI runs it: tests/test_perf_gpu.py).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

# Of the budget, at most (plus what earlier stages left): compiling dominates a fresh machine.
SHARES = {
    "env": 0.03,
    "warm": 0.25,
    "host": 0.05,
    "correctness": 0.25,
    "timing": 0.45,
    "models": 0.6,
    "pytest": 1.0,
}
FORCED = {
    "auto": {},
    "fused": {"fused": True},
    "split": {"fused": False, "split": 3},
    "lanes": {"fused": False, "split": 3, "lanes": True},
}
MARGIN_S = 10  # kept back for writing the outputs
BIG_SHAPE = "1x3x32768x22000"  # 2.16e9 > 2**31 elements: 4.3 GB in bfloat16
DRY_BANNER = "CPU MODE (Triton interpreter, perf_counter timer): NOT A GPU MEASUREMENT"


@dataclasses.dataclass
class Check:
    case: str
    path: str
    layout: str
    dtype: str
    shape: str
    status: str = "ok"  # ok / FAIL / ERROR
    detail: str = ""
    seconds: float = 0.0


class Run:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args, self.dry, self.out = args, args.dry_run, Path(args.out)
        self.device = "cpu" if self.dry else "cuda"
        self.end = time.monotonic() + args.budget - MARGIN_S
        self.status: dict[str, tuple[str, float]] = {}
        self.env: dict = {"mode": DRY_BANNER if self.dry else "gpu", "budget_s": args.budget}
        self.checks: list[Check] = []
        self.rows: list = []
        self.host_profile = ""
        self.models_table: list[str] = []
        self.pytest_tail = ""
        self.torch = torch

    # --- stage 1 ----------------------------------------------------------------------------
    def env_stage(self, deadline: float) -> str:
        from perf import report

        self.env.update(report.environment(self.device))
        timer = report.cpu_timer if self.dry else report.gpu_timer
        self.env["copy_gbps"] = report.copy_gbps(self.device, timer)
        self.write("env.json", json.dumps(self.env, indent=2) + "\n")
        return f"ok, copy {self.env['copy_gbps']:.1f} GB/s"

    # --- stage 1b ---------------------------------------------------------------------------
    def warm_stage(self, deadline: float) -> str:
        """Compile what the next stages launch (each path of the correctness sweep, every
        autotune candidate of the timing set: many hundreds of specialisations, each about a
        second) into Triton's cache, one process per core: the JIT then loads them instead of
        compiling one after another on first launch."""
        if self.dry:
            return "skipped: dry run (the interpreter compiles nothing)"
        from perf import compile_check as cc
        from perf.ops import DTYPES, NORMS, has_bias, launch_norm
        from perf.shapes import SETS, shape_str
        from tritonnorm.kernels import config

        dtypes = {**DTYPES, "float64": self.torch.float64}

        def sweep(norm, path, layout, dt, shape, _offset):
            x = cc._meta(shape, dtypes[dt], "contiguous" if layout == "strided" else layout)
            with config.forced(**FORCED[path]):
                cc._run_norm(x, launch_norm(norm, shape[1]), running=NORMS[norm][2],
                             bias=has_bias(norm))  # fmt: skip

        def safe(fn, *a):
            with contextlib.suppress(Exception):  # a launch not recorded is compiled lazily
                fn(*a)

        shape_set = self.args.set or "quick"
        timed = {shape_str(s) for ss in SETS[shape_set].values() for s in ss}
        todo = [
            ("sweep", functools.partial(safe, sweep, *c)) for c in self.cases() if c != ("big",)
        ]
        scenarios = itertools.chain(cc.scenarios(shape_set), cc.epilogue_scenarios(shape_set))
        todo += [(label, functools.partial(safe, fn)) for label, fn in scenarios
                 if label.split()[-3] in timed]  # fmt: skip
        arch = int(self.env["capability"].replace(".", ""))
        specs = cc.record(arch, shape_set, sms=self.env["sm_count"], todo=todo)
        done, errors = cc.warm_cache(specs, arch, os.cpu_count() or 1, deadline)
        self.env["warm"] = {"specialisations": len(specs), "compiled": done, "errors": errors[:5]}
        cut = "" if done == len(specs) else f", stopped at budget after {done}/{len(specs)}"
        return f"{'FAIL' if errors else 'ok'}: {done} compiled, {len(errors)} errors{cut}"

    # --- stage 1c ---------------------------------------------------------------------------
    def host_stage(self, deadline: float) -> str:
        """Where a call's host time goes. The first H100 runs found each call costing far more
        host (Python) time than GPU time, more than the library's own Python accounts for on a
        CPU (perf.hostcost): per case, the host time to issue a call (no synchronisation) and
        the time per call including the GPU's, for tritonnorm and eager; then cProfile of
        tritonnorm's calls of the first case (the top of the table goes to summary.md)."""
        import cProfile
        import io
        import pstats

        from perf.ops import DTYPES, make_inputs, norm_fn

        torch = self.torch
        dtype = DTYPES["bfloat16"] if not self.dry else torch.float32
        shapes = {
            "bn_train": (32, 256, 56, 56),
            "bn_eval": (32, 256, 56, 56),
            "gn": (16, 320, 64, 64),
        }
        if self.dry:
            shapes = {k: (2, 8, 4, 4) for k in shapes}
        calls = 5 if self.dry else 50
        sync = (lambda: None) if self.dry else torch.cuda.synchronize
        found, text = {}, ""
        for norm, shape in shapes.items():
            backward = norm != "bn_eval"
            inp = make_inputs(shape, "contiguous", dtype, self.device, running_stats=norm != "gn",
                              backward=backward)  # fmt: skip
            for provider in ("tritonnorm", "eager"):
                if time.monotonic() > deadline:
                    break
                step = inp.copy().step(norm_fn(norm, provider == "tritonnorm"), backward)
                for _ in range(3):
                    step()
                sync()
                t0 = time.perf_counter()
                for _ in range(calls):
                    step()
                issued = time.perf_counter()
                sync()
                done = time.perf_counter()
                key = f"{norm}{'_fwd_bwd' if backward else '_fwd'} {provider}"
                found[key] = {"host_us": round((issued - t0) / calls * 1e6, 1),
                              "per_call_us": round((done - t0) / calls * 1e6, 1)}  # fmt: skip
                if provider == "tritonnorm" and not text:
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(calls):
                        step()
                    sync()
                    prof.disable()
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
                    text = f"{key}, {calls} calls, by own time:\n{buf.getvalue()}"
        self.env["host"] = found
        self.host_profile = text
        if not found:
            return "stopped at budget"
        first = next(iter(found))
        return f"ok: {first} {found[first]['host_us']} us host / call" + "".join(
            f"; {k} {v['host_us']}" for k, v in list(found.items())[1:]
        )

    # --- stage 2 ----------------------------------------------------------------------------
    def cases(self):
        """(case, path, layout, dtype, shape, offset), most important first."""
        from perf.ops import NORMS, PER_POSITION

        dtypes = ("float32", "bfloat16", "float16", "float64")
        layouts = ("contiguous", "channels_last", "strided")
        main = (2, 3, 5, 7) if self.dry else (8, 64, 32, 32)
        for dt in dtypes[:1] if self.dry else dtypes:
            for i, (norm, path) in enumerate(itertools.product(NORMS, FORCED)):
                if norm in PER_POSITION and path in ("fused", "lanes"):
                    continue  # no such paths across channels: "auto" again
                for layout in layouts[i % 3 :][:1] if self.dry else layouts:  # dry: one each
                    yield norm, path, layout, dt, main, 0.5
        if not self.dry:
            yield ("big",)  # the int64 path, on the GPU only
        # primes; N=1; C=1; spatial 1; (N, C, L); 5-D; (N, C); an instance above on-chip limits
        odd = [(3, 7, 13, 17), (1, 5, 11, 7), (4, 1, 9, 9), (16, 24, 1, 1), (8, 12, 37),
               (2, 4, 6, 10, 14), (64, 96), (2, 3, 160, 256)]  # fmt: skip
        for shape in odd[:2] if self.dry else odd:
            for norm in ("bn_train", "gn") if self.dry else NORMS:
                for dt in ("float32", "bfloat16"):
                    for path in ("auto", "split"):
                        yield norm, path, "channels_last", dt, shape, 0.5
        # numerics: a large common offset (cancellation); long reductions (~1e6 values)
        for norm in ("bn_train", "in", "gn"):
            for path in ("fused", "split", "lanes"):
                yield norm, path, "contiguous", "float32", (4, 3, 16, 32), 1e4
            yield norm, "auto", "contiguous", "float32", (2, 2, 64, 64) if self.dry else (
                4, 2, 512, 512), 0.5  # fmt: skip
        # across channels: a large offset (the mean over C subtracted in registers), and the
        # kernels' widest rows (8192 channels in float32, 4096 with an epilogue)
        for path in ("auto",) if self.dry else ("auto", "split"):
            yield "ln2d", path, "contiguous", "float32", (4, 96, 8, 8), 1e4
        if not self.dry:
            yield "ln2d", "auto", "channels_last", "float32", (2, 8192, 4, 4), 0.5
            yield "rms2d", "auto", "contiguous", "bfloat16", (2, 8192, 4, 4), 0.5

    def check_one(self, norm, path, layout, dtype_name, shape, offset) -> str | None:
        from perf import report
        from perf.ops import DTYPES, NORMS, has_bias, make_inputs, norm_fn
        from tritonnorm.kernels import config

        dtype = {**DTYPES, "float64": self.torch.float64}[dtype_name]
        inp = make_inputs(shape, layout, dtype, self.device, running_stats=NORMS[norm][2],
                          backward=True, offset=offset, bias=has_bias(norm))  # fmt: skip
        try:
            ref = inp.copy(self.torch.float64, contiguous=True).step(norm_fn(norm, False), True)()
            same = inp.copy(contiguous=True).step(norm_fn(norm, False), True)()
        except Exception as e:
            try:
                inp.copy().step(norm_fn(norm, True), True)()
            except type(e):
                return None  # refused alike
            return f"torch raises {type(e).__name__}: {e}; tritonnorm does not"
        runs = []
        with config.forced(**FORCED[path]):
            for _ in range(2):
                mine = inp.copy()
                self.poison([math.prod(shape) * dtype.itemsize] * 3)
                runs.append(mine.step(norm_fn(norm, True), True)())
        if offset > 1 or math.prod(shape) > 10**6:  # tests/test_accuracy.py's numerics rules
            tol = report.tolerances()
            atol = 8 * 2.0**-10 if offset > 1 else 2e-4  # 8 float32 ulps at 1e4; LONG_Y_ATOL
            for i, (g, r, s) in enumerate(zip(runs[0], ref, same, strict=True)):
                err, theirs = tol._max_abs_err(g, r), tol._max_abs_err(s, r)
                if not err <= max(2 * theirs, atol * tol._scale(r)):
                    return f"output {i}: max abs err {err:.3g} (torch's {theirs:.3g})"
        elif bad := report.check(runs[0], ref, same):
            return bad
        for i, (a, b) in enumerate(zip(*runs, strict=True)):
            try:
                report.tolerances().assert_bitwise_equal(a, b, f"output {i}")
            except AssertionError as e:
                return f"not deterministic: {e}"
        return None

    def poison(self, sizes: list[int]) -> None:
        """Fill blocks of CUDA's caching allocator with NaN bits (all ones) and free them: outputs
        of these sizes allocated next reuse them, so an element the kernels do not write shows
        up as NaN in the comparison."""
        if self.device == "cuda":
            blocks = [self.torch.full((n,), 255, dtype=self.torch.uint8, device="cuda")
                      for n in [*sizes, *[2**16] * 8]]  # fmt: skip
            del blocks

    def big_tensor(self) -> str | None:
        """BN training forward and IN forward on a bf16 tensor of more than 2**31 elements,
        checked on each channel's last 2**20 elements against float64 statistics summed in
        chunks (an fp64 copy would not fit)."""
        import tritonnorm as tn
        from perf.report import check

        torch = self.torch
        x = torch.randn(
            tuple(map(int, BIG_SHAPE.split("x"))), dtype=torch.bfloat16, device=self.device
        )
        w, b = torch.rand(3, device=self.device) + 0.5, torch.randn(3, device=self.device)
        rows = x[0].flatten(1)  # (C, S), a view
        n = rows.shape[1]
        s1 = sum(c.double().sum(1) for c in rows.split(2**22, 1))
        mean = s1 / n
        s2 = sum(((c.double() - mean[:, None]) ** 2).sum(1) for c in rows.split(2**22, 1))
        rstd = (s2 / n + 1e-5).rsqrt()
        tail = slice(n - 2**20, n)
        ref = (rows[:, tail].double() - mean[:, None]) * rstd[:, None] * w[:, None] + b[:, None]
        same = ((rows[:, tail].float() - mean[:, None].float()) * rstd[:, None].float()
                * w[:, None] + b[:, None]).bfloat16()  # fmt: skip
        for fn in (lambda: tn.batch_norm(x, None, None, w, b, training=True),
                   lambda: tn.instance_norm(x, None, None, w, b)):  # fmt: skip
            self.poison([x.numel() * 2])
            y = fn()
            got = y[0].flatten(1)[:, tail]
            if bad := check((got,), (ref,), (same,)):
                return bad
            if torch.isnan(y).any():
                return "NaN in the output (an element not written?)"
            del y, got
        return None

    def correctness_stage(self, deadline: float) -> str:
        todo = list(self.cases())
        for case in todo:
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            if case == ("big",):
                row = Check("bn_train+in >2**31", "auto", "contiguous", "bfloat16", BIG_SHAPE)
            else:
                row = Check(case[0], case[1], case[2], case[3], "x".join(map(str, case[4])))
                row.case += "" if case[5] < 1 else " offset 1e4"
            try:
                bad = self.big_tensor() if case == ("big",) else self.check_one(*case)
                row.status, row.detail = ("FAIL", bad) if bad else ("ok", "")
            except Exception as e:
                row.status, row.detail = "ERROR", f"{type(e).__name__}: {str(e)[:200]}"
            if case == ("big",):
                self.torch.cuda.empty_cache()
            row.seconds = time.perf_counter() - t0
            self.checks.append(row)
        from perf.report import write_csv

        write_csv(self.checks, self.out / "correctness.csv")
        failed, done = sum(r.status != "ok" for r in self.checks), len(self.checks)
        cut = f", stopped at budget after {done}/{len(todo)}" if done < len(todo) else ""
        return f"{'FAIL' if failed else 'ok'}: {failed} of {done} failed{cut}"

    # --- stage 3 ----------------------------------------------------------------------------
    def timing_stage(self, deadline: float) -> str:
        from perf import report
        from perf.ops import DTYPES, select

        a = self.args
        dtypes = a.dtypes.split(",") if a.dtypes else ["float32"] if self.dry else list(DTYPES)
        shape_set = a.set or ("dry-run" if self.dry else "quick")
        todo = [c for dt in dtypes  # one dtype after the other: a cut budget leaves whole sets
                for c in report.cases(select(a.ops), shape_set, a.layouts.split(","), (dt,))]  # fmt: skip
        provs = report.providers(a.providers.split(",") if a.providers else None)
        if self.dry and "compile" in provs:
            # The plumbing only: Dynamo traces and guards as on a GPU, with its eager backend
            # (inductor's CPU code generation took 105 of this stage's 127 s in the suite)
            provs["compile"] = lambda op: (
                self.torch.compile(op.torch_fn, dynamic=False, backend="eager"),
                contextlib.nullcontext,
            )
        from tritonnorm.kernels import tuning

        with tuning.autotune(True):  # the report and the tuning table are made by autotuning
            for case in todo:
                if time.monotonic() > deadline:
                    break
                self.rows += report.run_case(
                    *case, self.device, provs, self.env["copy_gbps"], deadline
                )
        report.write_csv(self.rows, self.out / "results.csv")
        report.write_plots(self.rows, self.out, DRY_BANNER if self.dry else "")
        self.write_tuning()
        first = {p: sum(r.first_call_s or 0 for r in self.rows if r.provider == p) for p in provs}
        self.env["first_call_s"] = {p: round(s, 1) for p, s in first.items()}
        timed = sum(r.ms is not None for r in self.rows)
        bad = [r.provider for r in self.rows if r.note.startswith(("MISMATCH", "ERROR"))]
        ours = bad.count("tritonnorm")
        return (f"{'FAIL' if ours else 'ok'}: {timed}/{len(todo) * len(provs)} timed; mismatch/"
                f"error: {ours} tritonnorm, {len(bad) - ours} others; first calls (s): "
                f"{self.env['first_call_s']}")  # fmt: skip

    def write_tuning(self) -> None:
        """tuning.csv: every candidate the autotuner timed (median ms), the chosen one marked:
        what a later session needs to revise the candidate lists without a GPU."""
        from tritonnorm.kernels import tuning

        with (self.out / "tuning.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["kernel", "tune_key", "config", "median_ms", "chosen"])
            w.writerows(
                (k, key, cfg, f"{ms:.6g}", int(best))
                for k, key, cfg, ms, best in tuning.tuning_log()
            )

    # --- stage 4b ---------------------------------------------------------------------------
    def models_stage(self, deadline: float) -> str:
        from perf import models

        names = ["resnet50"] if self.dry else [m for m in models.MODELS if m != "monai_unet3d"]
        if self.args.models:
            names = self.args.models.split(",")
        variants = ["torch", "tn_fused"] if self.dry else list(models.VARIANTS)
        settings = models.Settings(device=self.device, tiny=self.dry)
        threads = self.torch.get_num_threads()
        if self.dry:  # as perf.models' dry run: one thread beside other jobs
            self.torch.set_num_threads(1)

        def keep(rows):
            self.env["models"] = [dataclasses.asdict(r) for r in rows]
            self.models_table = models.markdown_table(rows)
            self.write("env.json", json.dumps(self.env, indent=2) + "\n")

        try:
            rows = models.run(names, variants, settings, deadline, keep,
                              log=lambda line: print("   " + line, flush=True))  # fmt: skip
        finally:
            self.torch.set_num_threads(threads)
        keep(rows)
        bad = [f"{r.model}/{r.variant}" for r in rows if r.status.startswith(("FAIL", "ERROR"))]
        done = sum(r.status == "ok" for r in rows)
        cut = sum(r.status == "skipped: out of budget" for r in rows)
        return (f"{'FAIL' if bad else 'ok'}: {done}/{len(rows)} model x variant rows ok"
                f"{f', {cut} out of budget' if cut else ''}{f'; failed: {bad}' if bad else ''}")  # fmt: skip

    # --- stage 4 ----------------------------------------------------------------------------
    def pytest_stage(self, deadline: float) -> str:
        import importlib.util

        if importlib.util.find_spec("pytest") is None:
            return "skipped: pytest is not installed"
        # test_models.py is the CPU emulation of the models stage: on a GPU that stage runs
        root = Path(__file__).resolve().parents[1]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
               "--ignore=tests/test_sync_batch_norm.py", "--ignore=tests/test_gpu_compile.py",
               "--ignore=tests/test_perf_gpu.py",
               "--ignore=tests/test_models.py"]  # fmt: skip
        if self.dry:  # the plumbing only: the suite itself runs in CI on the CPU
            cmd[-5:] = ["tests/test_byte_budget.py", "-k", "floor_table or masked_copy"]
        limit = deadline - time.monotonic()
        if limit < 5:
            return "skipped: out of budget"
        if not self.dry:  # the suite's process needs the memory this one cached
            self.torch.cuda.empty_cache()
        try:
            p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=limit)
            text, code = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            text, code = (e.stdout or b"").decode(errors="replace"), None
        self.pytest_tail = "\n".join(text.strip().splitlines()[-40:])
        self.write("pytest.txt", text)
        last = (text.strip().splitlines() or ["no output"])[-1].strip("= ")
        if code is None:
            return f"stopped at budget ({limit:.0f} s): {last[:80]}"
        return f"{'ok' if code == 0 else 'FAIL'}: {last[:100]}{' (subset: dry run)' * self.dry}"

    # --- driver -----------------------------------------------------------------------------
    def write(self, name: str, text: str) -> None:
        (self.out / name).write_text(text)

    def summary(self) -> None:
        from perf.report import headline, summary_lines

        ran = {k for k, (st, _) in self.status.items() if not st.startswith("skipped (--")}
        lines = ["# tritonnorm on " + (DRY_BANNER if self.dry else str(self.env.get("gpu"))), "",
                 f"`{json.dumps(self.env)}`", "", "| stage | status | seconds |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {s} | {st} | {sec:.1f} |" for s, (st, sec) in self.status.items()]
        lines += ["", f"Headline: `{json.dumps(headline(self.rows))}`"]
        if "correctness" in ran:
            lines += ["", "## Correctness failures", ""]
            lines += [f"- {c.case} {c.path} {c.layout} {c.dtype} {c.shape}: {c.detail}"
                      for c in self.checks if c.status != "ok"] or ["none"]  # fmt: skip
        if "host" in ran:
            lines += [
                "",
                "## Host time per call (us)",
                "",
                "| case | host | per call |",
                "|---|---|---|",
            ]
            lines += [f"| {k} | {v['host_us']} | {v['per_call_us']} |"
                      for k, v in self.env.get("host", {}).items()]  # fmt: skip
            lines += ["", "```", self.host_profile.strip()[-6000:], "```"]
        if "timing" in ran:
            lines += ["", "## Timing", "", *summary_lines(self.rows)]
        if "models" in ran:
            lines += ["", "## Training steps of real models (perf.models)", "",
                      *self.models_table]  # fmt: skip
        if "pytest" in ran:
            lines += ["", "## pytest (tail)", "", "```", self.pytest_tail, "```"]
        self.write("summary.md", "\n".join(lines) + "\n")

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        budget = self.end - start
        stages = {"env": self.env_stage, "warm": self.warm_stage, "host": self.host_stage,
                  "correctness": self.correctness_stage, "timing": self.timing_stage,
                  "models": self.models_stage, "pytest": self.pytest_stage}  # fmt: skip
        only = self.args.stages.split(",") if self.args.stages else list(stages)
        for name, fn in stages.items():
            t0 = time.monotonic()
            if name not in only:
                self.status[name] = ("skipped (--stages)", 0.0)
                continue
            deadline = min(self.end, t0 + SHARES[name] * budget)
            print(f"== {name}: up to {deadline - t0:.0f} s", flush=True)
            try:
                status = fn(deadline)  # past its deadline a stage still writes its (empty) files
            except Exception as e:
                status = f"CRASHED: {type(e).__name__}: {str(e)[:150]}"
            self.status[name] = (status, time.monotonic() - t0)
            self.env["stages"] = {k: {"status": v, "seconds": round(s, 1)}
                                  for k, (v, s) in self.status.items()}  # fmt: skip
            self.summary()
            print(f"   {status} ({self.status[name][1]:.1f} s)", flush=True)
        if "copy_gbps" in self.env:  # the stage table and timings, alongside the environment
            self.env["stages"] = {k: {"status": v, "seconds": round(sec, 1)}
                                  for k, (v, sec) in self.status.items()}  # fmt: skip
            self.write("env.json", json.dumps(self.env, indent=2) + "\n")
        from perf.report import headline

        head = {k: f"{v:.3g}" if v is not None else "n/a" for k, v in headline(self.rows).items()}
        print(f"\n{DRY_BANNER}" if self.dry else "")
        print(f"{'stage':<12} {'seconds':>7}  status")
        for name, (status, sec) in self.status.items():
            print(f"{name:<12} {sec:>7.1f}  {status[:110]}")
        print(f"worst fraction of copy {head['worst_frac_of_copy']} (graph replay "
              f"{head['worst_graph_frac_of_copy']}); slowest speedup (x) vs eager "
              f"{head['min_vs_eager']}, vs compile {head['min_vs_compile']}; out: {self.out}")  # fmt: skip
        return 1 if any(s.startswith(("FAIL", "CRASHED")) for s, _ in self.status.values()) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="perf/results/gpu-run")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all stages")
    p.add_argument("--dry-run", action="store_true", help="on the CPU: NOT a GPU measurement")
    p.add_argument(
        "--stages",
        help="comma-separated subset of env,warm,host,correctness,timing,models,pytest",
    )
    p.add_argument("--models", help="models stage: comma-separated perf.models names")
    t = p.add_argument_group("timing stage (the report)")
    t.add_argument(
        "--set", choices=("quick", "full", "cpu", "dry-run"), help="shapes (perf/shapes.py)"
    )
    t.add_argument("--ops", help="comma-separated op names or globs, e.g. 'bn_*,in_fwd'")
    t.add_argument("--layouts", default="contiguous,channels_last")
    t.add_argument("--dtypes", help="default: bfloat16,float32,float16 (CPU: float32)")
    t.add_argument("--providers", help="subset of tritonnorm,eager,compile,flag_gems")
    args = p.parse_args(argv)
    import torch

    if args.dry_run:  # before tritonnorm is imported: kernels bind to the interpreter then
        if "tritonnorm" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("tritonnorm was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
        print(DRY_BANNER)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --dry-run (CPU, not a measurement)")
    return Run(args).run()


if __name__ == "__main__":
    sys.exit(main())
