"""Progress lines for long loads, printed to stderr at most a few times a second."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, stream=None, min_interval: float = 0.5) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self._last = 0.0
        self._start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self._last < self.min_interval:
            return
        self._last = now
        pct = 100.0 * done / max(total, 1)
        end = "\n" if done >= total else "\r"
        self.stream.write(f"{self.label}: {done}/{total} ({pct:3.0f}%) {now - self._start:5.1f}s{end}")
        self.stream.flush()
