"""A one-line progress bar on stderr (only when stderr is a terminal)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label, self.total, self.done, self.t0, self.last = "", 0, 0, 0.0, 0.0  # total 0: not started

    def start(self, label: str, total: int):
        self.label, self.total, self.done = label, max(int(total), 1), 0
        self.t0 = self.last = time.perf_counter()
        self._draw()

    def advance(self, n: int):
        self.done += int(n)
        now = time.perf_counter()
        if now - self.last > 0.1 or self.done >= self.total:
            self.last = now
            self._draw()

    def _draw(self):
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        width = 30
        fill = int(frac * width)
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9) / 1e6
        self.stream.write(
            f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}% "
            f"{self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB {rate:,.0f} MB/s"
        )
        self.stream.flush()

    def finish(self):
        if self.enabled and self.total:
            self.stream.write("\n")
            self.stream.flush()
