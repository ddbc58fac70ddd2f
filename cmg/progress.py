"""Progress lines with elapsed time and ETA on stderr; silent with quiet=True.

    bar = Progress("classifier", total=steps, quiet=args.quiet)
    bar.update(done, epoch="2/5", loss=0.31)      # prints at most every `every` seconds
    bar.close(acc=0.98)
    Progress("sweep", total=24, done_before=15)  # a resumed run: 15 of 24 were done before it
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def _fmt(fields: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in fields.items())


class Progress:
    def __init__(self, label: str, total: int, quiet: bool = False, every: float = 5.0,
                 stream: TextIO | None = None, done_before: int = 0):
        self.label, self.total, self.quiet, self.every = label, max(total, 1), quiet, every
        # work finished by an earlier process (a resumed run): it counts in the percentage but
        # not in the rate, which is this process's own
        self.done_before = done_before
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()

    def due(self) -> bool:
        """True when the next `update` would print (lets callers skip computing its fields)."""
        return not self.quiet and time.monotonic() - self.last >= self.every

    def update(self, done: int, force: bool = False, **fields) -> None:
        now = time.monotonic()
        if self.quiet or (not force and now - self.last < self.every):
            return
        self.last = now
        elapsed = now - self.start
        rate_done = done - self.done_before
        eta_text = _fmt_seconds(elapsed / rate_done * (self.total - done)) if rate_done > 0 else "?"
        print(f"[{self.label}] {100 * done / self.total:5.1f}% {_fmt(fields)} | "
              f"{_fmt_seconds(elapsed)} elapsed, ETA {eta_text}", file=self.stream, flush=True)

    def close(self, **fields) -> float:
        """Print the final line; return the elapsed seconds."""
        elapsed = time.monotonic() - self.start
        if not self.quiet:
            print(f"[{self.label}] done {_fmt(fields)} | {_fmt_seconds(elapsed)}",
                  file=self.stream, flush=True)
        return elapsed
