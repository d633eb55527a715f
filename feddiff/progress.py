"""Progress of the sampling in `feddiff sample` and `feddiff evaluate`: a rich bar on a terminal, a line on
stderr every LOG_EVERY_SECONDS otherwise, so that a long run (DDPM calls the model 1000 times per batch of
500 images) is never silent. stdout keeps only the result, for scripts."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

LOG_EVERY_SECONDS = 10.0


class SamplingBar:
    """A context manager whose `step` is the `on_step(done, total)` of fedcore.model.diffusion.sample.
    `mode`: "auto" (a bar when `stream` is a terminal, log lines otherwise), "bar", "log" or "off"."""

    def __init__(self, what: str, mode: str = "auto", stream: TextIO | None = None):
        self.what = what
        self.stream = stream or sys.stderr
        self.mode = ("bar" if self.stream.isatty() else "log") if mode == "auto" else mode
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._start = self._shown = 0.0

    def __enter__(self) -> SamplingBar:
        self._start = self._shown = time.perf_counter()
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            columns = (TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TextColumn("steps"), TimeElapsedColumn(), TimeRemainingColumn())
            self._bar = Progress(*columns, console=Console(file=self.stream), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def step(self, done: int, total: int) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done, total=total)
            return
        now = time.perf_counter()
        if self.mode != "log" or now - self._shown < LOG_EVERY_SECONDS:
            return
        self._shown = now
        elapsed = now - self._start
        left = elapsed * (total - done) / done
        print(f"{self.what}: {done:,}/{total:,} steps ({100 * done / total:.0f}%), {elapsed:.0f} s, about {left:.0f} s left", file=self.stream, flush=True)
