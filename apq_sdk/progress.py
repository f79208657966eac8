"""Progress of long steps: a live bar in a terminal, plain lines everywhere else.

`progress_bar()` returns an object with rich's `add_task(description, total=N)` and
`advance(task, n)`. Attached to a terminal it is a rich progress bar. When stderr is not a terminal
(CI, `| tee`, a log file) it prints one line when a step starts, one every 5 % of it or every 30 s,
whichever comes first, and one when it ends, so a log never sits silent through a long step.
`APQ_NO_PROGRESS=1` silences both (the tests set it).
"""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)
LINE_EVERY_FRACTION = 0.05
LINE_EVERY_SECONDS = 30.0


class LineProgress:
    """rich.progress.Progress's add_task/advance, written as plain lines to a stream."""

    def __init__(self, stream=None, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: int | None = None, **_) -> int:
        task = len(self.tasks)
        now = self.clock()
        self.tasks[task] = {"description": description, "total": total, "done": 0,
                            "started": now, "last_time": now, "last_fraction": 0.0}
        self._line(task, "started")
        return task

    def advance(self, task: int, advance: float = 1) -> None:
        t = self.tasks[task]
        t["done"] += advance
        now = self.clock()
        fraction = t["done"] / t["total"] if t["total"] else 0.0
        finished = bool(t["total"]) and t["done"] >= t["total"]
        if finished or fraction - t["last_fraction"] >= LINE_EVERY_FRACTION \
                or now - t["last_time"] >= LINE_EVERY_SECONDS:
            t["last_time"], t["last_fraction"] = now, fraction
            self._line(task, "done" if finished else None)

    def _line(self, task: int, event: str | None) -> None:
        t = self.tasks[task]
        elapsed = self.clock() - t["started"]
        if t["total"]:
            where = f"{t['done']:g}/{t['total']:g} ({100 * t['done'] / t['total']:.0f} %)"
        else:
            where = f"{t['done']:g}"
        suffix = f", {event}" if event else ""
        print(f"{t['description']}: {where}, {elapsed:.0f} s{suffix}", file=self.stream, flush=True)


class _Quiet(LineProgress):
    def _line(self, task: int, event: str | None) -> None:
        return None


def progress_bar():
    if os.environ.get("APQ_NO_PROGRESS"):
        return _Quiet()
    if console.is_terminal:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    return LineProgress()
