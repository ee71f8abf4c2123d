"""``python -m perf``: the performance report.

On a CUDA GPU: check, time and compare every op against torch eager, torch.compile and any
installed Triton peers; write perf/results/<gpu>/ (results.csv, PNGs, summary.md, env.json).
The default is ``--quick`` (one shape per class: about 60 op/shape/layout/dtype combinations,
dominated by torch.compile's compile time); ``--full`` runs every shape of PERF.md's classes
(several hundred combinations, far beyond 10 minutes).

Without a GPU: an interpreter pass (correctness check and byte count per op and layout, no
timing) written to perf/results/interpreter/. ``--dry-run`` exercises the GPU report's plumbing
on the CPU with tiny shapes and a CPU timer, labelled as not a GPU measurement.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m perf",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one shape per class (default)")
    size.add_argument("--full", action="store_true", help="every shape of every class")
    p.add_argument("--out", help="output directory (default perf/results/<gpu-name>/)")
    p.add_argument("--ops", help="comma-separated op names or globs, e.g. 'bn_*,in_fwd'")
    p.add_argument("--layouts", help="comma-separated subset of: contiguous,channels_last")
    p.add_argument("--dtypes", help="comma-separated subset of: float32,bfloat16,float16")
    p.add_argument(
        "--providers",
        help="comma-separated subset of: tritonnorm,eager,compile,flag_gems,liger_kernel",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run the GPU report's orchestration on the CPU with tiny shapes and a "
        "CPU timer (NOT a GPU measurement); outputs under perf/results/interpreter/",
    )
    p.add_argument(
        "--interpret",
        action="store_true",
        help="the no-GPU interpreter pass even when a GPU is present",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    if not gpu or args.dry_run or args.interpret:
        # Must precede the first import of tritonnorm: kernels are bound to the interpreter
        # when they are defined.
        if "tritonnorm" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("tritonnorm was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
    if args.dry_run:
        from perf import report

        return report.run(args)
    if not gpu or args.interpret:
        if not gpu:
            print("No CUDA GPU: running the interpreter pass.")
        from perf import interpret

        return interpret.run(args)
    from perf import report

    return report.run(args)


if __name__ == "__main__":
    sys.exit(main())
