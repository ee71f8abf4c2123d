"""The epilogue kernels compile for Hopper (sm_90) without a GPU, and do not spill at the register
cap (perf.compile_check's rule): the interpreter accepts code the compiler may reject, and erf or
the recomputed pre-activation add registers. Launches are recorded from the real launchers on meta
tensors, in a subprocess (kernels are only compilable without TRITON_INTERPRET)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_gpu_compile import _nvidia_tools_present

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not _nvidia_tools_present(), reason="Triton's NVIDIA backend (bundled ptxas) is not installed"
)

SCRIPT = r"""
import json, torch
from perf.compile_check import compile_one, problems, recording
from tritonnorm.kernels import launch

CASES = [  # (shape, norm, dtype, channels_last, scale/shift, residual, activations)
    ((8, 256, 32, 32), launch.Norm(False, 32), torch.float16, True, True, False, (3, 4)),
    ((8, 256, 32, 32), launch.Norm(False, 32), torch.float32, False, True, True, (3, 5)),
    # groups of 4096 elements: the on-chip backward with an epilogue
    ((8, 128, 32, 32), launch.Norm(False, 32), torch.float32, True, True, True, (3, 4)),
    ((8, 128, 32, 32), launch.Norm(False, 32), torch.float16, False, True, False, (4, 5)),
    ((32, 64, 56, 56), launch.Norm(True), torch.float32, True, False, True, (1,)),
    ((32, 64, 56, 56), launch.Norm(True), torch.bfloat16, False, True, True, (2, 4)),
    ((4, 32, 16, 16), launch.Norm(False, 0, False), torch.float16, False, True, True, (4,)),
    ((2, 64, 8, 8), launch.Norm(False, 8), torch.float64, False, True, True, (4, 5)),
]
with recording(90, heuristic=True) as (specs, scenario):
    for shape, norm, dtype, cl, has_scale, has_res, acts in CASES:
        fmt = torch.channels_last if cl else torch.contiguous_format
        x = torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=fmt)
        N, C = shape[:2]
        w, b = (torch.empty(C, dtype=dtype, device="meta") for _ in range(2))
        rm, rv = (torch.empty(C, dtype=torch.float32, device="meta") for _ in range(2))
        sc = torch.empty(N, C, dtype=dtype, device="meta") if has_scale else None
        res = torch.empty(shape, dtype=dtype, device="meta") if has_res else None
        for act in acts:
            scenario[0] = f"{shape} {dtype} cl={cl} act={act}"
            ep = launch.Epilogue(sc, sc, res, act, 0.01)
            y, mean, rstd = launch.forward(
                x, w, b, rm, rv, norm=norm, momentum=0.1, eps=1e-5, epilogue=ep
            )
            # as the ops do: with a residual and ReLU / leaky ReLU, act' is read off the output
            from_output = has_res and launch.derivative_from_output(act, 0.01)
            if from_output:
                ep = launch.Epilogue(sc, sc, None, act, 0.01)
            mask = (True, True, True, has_scale, has_scale, has_res)
            launch.backward(
                torch.empty_like(x), x, w, b, mean, rstd, norm=norm, epilogue=ep,
                output_mask=mask, output=y if from_output else None,
            )
results = [compile_one(s, 90) for s in specs]
print(json.dumps({
    "specs": len(specs),
    "errors": [f"{r.kernel} {r.flags} {r.scenario}: {r.error}" for r in results if r.error],
    "problems": problems(results, 90),
    "epilogue_specs": sum(1 for s in specs if "EPILOGUE=1" in s.describe()[0]),
    "from_output_specs": sum(
        1 for s in specs
        if "grad_partial" in s.kernel and "EPILOGUE=1" in s.describe()[0]
        and "y_ptr=None" not in s.describe()[0]
    ),
    "fused_grad_specs": sum(
        1 for s in specs
        if "grad_partial" in s.kernel and {"FUSED=1", "EPILOGUE=1"} <= set(s.describe()[0].split())
    ),
}))
"""


def test_epilogue_kernels_compile_for_sm90_without_spilling_at_the_cap(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["epilogue_specs"] > 10, report
    assert report["fused_grad_specs"] > 0, report
    assert report["from_output_specs"] > 0, report  # ReLU's derivative read off the output
    assert not report["errors"], "\n".join(report["errors"])
    assert not report["problems"], "\n".join(report["problems"])
