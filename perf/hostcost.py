"""``python -m perf.hostcost``: the host (Python) time of one call, with the kernels stubbed out.

On a GPU a call costs max(host time, GPU time) when nothing else is queued: the first H100 run
found the host side far above the kernels' time for every shape of the report (perf/NOTES.md).
This measures that side on any machine, without a GPU: the public functions run on small CPU
tensors through the Triton path (``TRITON_INTERPRET=1`` routes them there), with every kernel
launch replaced by a no-op, so what is timed is validation, dispatch, autograd, planning, config
lookup and allocation. Triton's own launch cost (its argument binding, per launch) comes on top.

CPU time per call (``time.process_time``), best of several blocks: the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Before tritonnorm is imported: CPU tensors then take the kernels' path.
os.environ["TRITON_INTERPRET"] = "1"

import torch


@contextmanager
def kernels_stubbed() -> Iterator[list[int]]:
    """Within the block, tritonnorm's kernel launches do nothing (the grids are still
    computed). Yields a one-element list counting the launches skipped."""
    from tritonnorm.kernels import config, launch

    skipped = [0]

    def tuned_launch(self, grid, candidates, *args, tune_key=None, **kwargs):
        grid(candidates[0].kwargs)
        skipped[0] += 1
        return candidates[0]

    class Stub:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                skipped[0] += 1

            return run

    names = ("_norm_stats_finalize_kernel", "_norm_grad_finalize_kernel")
    saved = config.TunedKernel.launch, {n: getattr(launch, n) for n in names}
    config.TunedKernel.launch = tuned_launch
    for n in names:
        setattr(launch, n, Stub())
    try:
        yield skipped
    finally:
        config.TunedKernel.launch = saved[0]
        for n, fn in saved[1].items():
            setattr(launch, n, fn)


def cases() -> dict[str, Callable[[], object]]:
    import tritonnorm as tn

    torch.manual_seed(0)
    x = torch.randn(8, 16, 8, 8)
    c = x.shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    rm, rv = torch.zeros(c), torch.ones(c)
    xg, dy = x.clone().requires_grad_(), torch.randn_like(x)
    scale, shift = torch.rand(8, c) + 0.5, torch.randn(8, c)
    return {
        "bn eval forward": lambda: tn.batch_norm(x, rm, rv, w, b, training=False),
        "bn train forward": lambda: tn.batch_norm(x, rm, rv, w, b, training=True),
        "bn train forward+backward": lambda: tn.batch_norm(
            xg, rm, rv, wg, bg, training=True
        ).backward(dy),
        "in forward+backward": lambda: tn.instance_norm(xg, weight=wg, bias=bg).backward(dy),
        "gn forward+backward": lambda: tn.group_norm(xg, 4, wg, bg).backward(dy),
        "gn+scale/shift+silu forward+backward": lambda: tn.group_norm(
            xg, 4, wg, bg, scale=scale, shift=shift, activation="silu"
        ).backward(dy),
    }


def measure(calls: int = 150, blocks: int = 7) -> dict[str, float]:
    """Microseconds of CPU time per call of each case, and the launches skipped per call."""
    out = {}
    with kernels_stubbed() as skipped:
        for name, fn in cases().items():
            for _ in range(10):
                fn()
            per_call = []
            for _ in range(blocks):
                start, t = skipped[0], time.process_time()
                for _ in range(calls):
                    fn()
                per_call.append((time.process_time() - t) / calls * 1e6)
            out[name] = min(per_call)
            out[f"{name}: launches"] = (skipped[0] - start) / calls
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.hostcost", description=__doc__)
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--blocks", type=int, default=7)
    args = parser.parse_args(argv)
    got = measure(args.calls, args.blocks)
    for name, us in got.items():
        if not name.endswith(": launches"):
            launches = got[f"{name}: launches"]
            print(f"{name:40s} {us:8.1f} us per call ({launches:g} kernel launches stubbed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
