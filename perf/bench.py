"""Timing, buffer rotation, copy bandwidth and result checking.

A *step* is a zero-argument callable running an op once (forward, or forward + backward) on one
input set and returning the tensors to check. Timers take a step and return milliseconds.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from perf.ops import Inputs

L2_BYTES = 50 * 2**20  # H100's L2; rotation keeps the working set at several times this
ROTATE_TARGET_BYTES = 4 * L2_BYTES
MAX_BUFFERS = 8

# Tolerances against torch eager in the same dtype: (rtol, atol relative to max |reference|).
# Reduction order differs between implementations; fp32 keeps ~1e-6 relative error on O(1)
# outputs and ~1e-5 on N*HW-long gradient sums; fp16/bf16 outputs are rounded (eps 9.8e-4 /
# 7.8e-3), so a few ulps of the output dtype are allowed.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-3, 1e-4),
    torch.float16: (1e-2, 5e-3),
    torch.bfloat16: (5e-2, 2e-2),
}


def make_step(fn: Callable, inp: Inputs, backward: bool) -> Callable[[], tuple]:
    """A step running ``fn`` on ``inp``; with ``backward``, also the gradients for ``inp.dy``."""
    if backward:

        def step():
            y = fn(*inp.args)
            return (y, *torch.autograd.grad(y, inp.grad_inputs, inp.dy))

    else:

        def step():
            with torch.no_grad():
                return (fn(*inp.args),)

    return step


def buffers_needed(bytes_per_set: int) -> int:
    """Input sets to rotate through so the working set is several times L2."""
    return max(1, min(MAX_BUFFERS, math.ceil(ROTATE_TARGET_BYTES / max(1, bytes_per_set))))


def rotating(steps: Sequence[Callable]) -> Callable:
    """One callable cycling through ``steps`` (one per input set)."""
    if len(steps) == 1:
        return steps[0]
    state = {"i": 0}

    def step():
        i = state["i"]
        state["i"] = (i + 1) % len(steps)
        return steps[i]()

    return step


def gpu_timer(step: Callable) -> float:
    """Median milliseconds by ``triton.testing.do_bench`` (warm-up excluded, L2 flushed)."""
    import triton.testing

    return float(triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median"))


def cpu_timer(step: Callable, reps: int = 3) -> float:
    """Median milliseconds of a few CPU runs after one warm-up: dry runs only, not a GPU timing."""
    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(timer: Callable, device: str, nbytes: int) -> float:
    """GB/s of a large device-to-device ``copy_``, counting the bytes read and written."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)

    def step():
        dst.copy_(src)

    ms = timer(step)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def compare(got: Sequence, ref: Sequence, dtype: torch.dtype) -> str | None:
    """None when every tensor of ``got`` is close to ``ref``, else a short description."""
    if len(got) != len(ref):
        return f"{len(got)} outputs, expected {len(ref)}"
    rtol, atol = TOLERANCES[dtype]
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        if g is None or r is None:
            if g is not r:
                return f"output {i}: None vs tensor"
            continue
        if g.shape != r.shape:
            return f"output {i}: shape {tuple(g.shape)} vs {tuple(r.shape)}"
        g, r = g.detach().float(), r.detach().float()
        if not torch.isfinite(g).all():
            return f"output {i}: non-finite values"
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        err = (g - r).abs()
        bad = err > atol * scale + rtol * r.abs()
        if bad.any():
            return f"output {i}: max abs err {err.max().item():.3g} (scale {scale:.3g})"
    return None
