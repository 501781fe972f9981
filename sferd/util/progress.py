"""Progress of long work: a rich bar with ETA on a terminal, one line per 10 % on a log."""

from __future__ import annotations

import sys
import time


class Progress:
    """A rich progress bar with ETA on a terminal; on a log (not a TTY) one line every 10 %."""

    def __init__(self, label: str, total: int, start: int = 0):
        self.label, self.total, self.done = label, total, start
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.start = start
        self._next_report = start + max(1, total // 10)
        self._bar = None
        if self.tty:
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total, completed=start, info="")

    def update(self, n: int = 1, info: str = "") -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, info=info)
        elif self.done >= self._next_report or self.done == self.total:
            rate = (self.done - self.start) / max(time.monotonic() - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"{self.label}: {self.done}/{self.total} {info} eta {eta:.0f}s", file=sys.stderr, flush=True)
            self._next_report = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
