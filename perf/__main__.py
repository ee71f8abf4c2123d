"""``python -m perf``: the performance report, perf/gpu.py's environment and timing stages without
a time budget: on a GPU the quick set (``--set full``: every shape) written to
perf/results/<gpu>/; without one the CPU mode (Triton interpreter, bytes counted against the
floors, no meaningful timing) on shapes either side of the on-chip limits, to
perf/results/interpreter/.
Options as ``python -m perf.gpu`` (``--ops``, ``--layouts``, ``--dtypes``, ``--providers``)."""

import re
import sys

import torch

from perf.gpu import main

if __name__ == "__main__":
    args = sys.argv[1:]
    gpu = torch.cuda.is_available() and "--dry-run" not in args
    out = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()) if gpu else None
    cpu = "--dry-run --set cpu --dtypes float32,bfloat16 --providers tritonnorm,eager".split()  # noqa: SIM905
    sys.exit(main(["--stages", "env,timing", "--budget", "1e9", "--out",
                   f"perf/results/{out or 'interpreter'}", *([] if gpu else cpu), *args]))  # fmt: skip
