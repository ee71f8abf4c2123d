"""``python -m perf``: the performance report (perf/report.py); on a GPU machine with a time
limit, ``python -m perf.gpu`` (perf/gpu.py) instead."""

import sys

from perf.report import main

if __name__ == "__main__":
    sys.exit(main())
