"""Stage progress on stderr with elapsed time and an ETA, and per-stage seconds for the report.

Progress always goes to stderr (so `--json` output on stdout stays clean); `enabled=False` silences it.
"""

from __future__ import annotations

import sys
import time


def _fmt(s: float) -> str:
    s = max(0.0, s)
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.1f}min" if s < 5400 else f"{s / 3600:.1f}h"


class Progress:
    def __init__(self, enabled: bool = True, stream=None, min_interval: float = 1.0):
        self.enabled, self.stream = enabled, stream or sys.stderr
        self.min_interval = min_interval
        self.seconds: dict[str, float] = {}
        self._name = None
        self._t0 = self._last = 0.0

    def log(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=self.stream, flush=True)

    def start(self, name: str) -> "Progress":
        self.end()
        self._name, self._t0, self._last = name, time.perf_counter(), 0.0
        return self

    def update(self, done: int, total: int, unit: str = "") -> None:
        """done of total units of the current stage (prints at most once per min_interval)."""
        if not self.enabled or self._name is None:
            return
        now = time.perf_counter()
        tty = getattr(self.stream, "isatty", lambda: False)()
        # a terminal gets a line rewritten in place; a log gets a line every 30 s and the last one
        if done < total and now - self._last < (self.min_interval if tty else 30.0):
            return
        self._last = now
        el = now - self._t0
        eta = el / done * (total - done) if done else float("nan")
        eta_s = _fmt(eta) if eta == eta else "?"
        end = "\n" if done >= total or not tty else "\r"
        print(f"{self._name}: {done}/{total} {unit}, {_fmt(el)} elapsed, ETA {eta_s}   ",
              end=end, file=self.stream, flush=True)

    def end(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._t0
            self._name = None

    def __call__(self, done: int, total: int, unit: str = "") -> None:
        self.update(done, total, unit)
