"""A one-line-per-step progress printer with counts and an ETA (no dependency)."""

from __future__ import annotations

import sys
import time


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    def __init__(self, total: int, stream=sys.stdout):
        self.total = max(1, total)
        self.done = 0
        self.start = time.perf_counter()
        self.stream = stream

    def step(self, label: str) -> None:
        """Announce the step about to run."""
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / (self.done - 1) * (self.total - self.done + 1) if self.done > 1 else 0.0
        width = len(str(self.total))
        print(
            f"[{self.done:>{width}}/{self.total}] {100 * (self.done - 1) / self.total:5.1f}% "
            f"elapsed {_fmt(elapsed)} eta {_fmt(eta) if self.done > 1 else '?'}  {label}",
            file=self.stream,
            flush=True,
        )

    def note(self, text: str) -> None:
        print(f"    {text}", file=self.stream, flush=True)
