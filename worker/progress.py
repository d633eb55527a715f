"""Live training progress: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

import torch

from fedcore.federation.client import TrainTask
from fedcore.model.training import StepCallback, TrainResult

if TYPE_CHECKING:
    from rich.progress import Progress

log = logging.getLogger("feddiff.worker")

LOG_EVERY_SECONDS = 10.0


class TrainingProgress:
    """`step(task)` gives the per-step callback of one task; the loss is read (a device sync) only when shown."""

    def __init__(self, worker_id: str, mode: str = "auto"):
        self.worker_id = worker_id
        self.mode = ("bar" if sys.stderr.isatty() else "log") if mode == "auto" else mode
        self._bar: Progress | None = None  # shown while a task trains (mode "bar")

    def step(self, task: TrainTask) -> StepCallback | None:
        if self.mode == "off":
            return None
        start = time.perf_counter()
        last_shown = [start]
        images = [0]
        batch = task.train.batch_size
        if self.mode == "bar":
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
            self._bar.start()
            bar_task = self._bar.add_task(f"round {task.round_index + 1}", total=None, info="")

        def on_step(epoch: int, step: int, steps: int, loss: torch.Tensor) -> None:
            images[0] += batch
            now = time.perf_counter()
            if now - last_shown[0] < (0.5 if self.mode == "bar" else LOG_EVERY_SECONDS):
                return
            last_shown[0] = now
            rate = images[0] / (now - start)
            info = f"epoch {epoch + 1}/{task.train.epochs} step {step + 1}/{steps} loss {float(loss):.4f} {rate:.0f} img/s"
            if self._bar is not None:
                self._bar.update(bar_task, total=steps * task.train.epochs, completed=epoch * steps + step + 1, info=info)
            else:
                log.info("worker %s: round %d: %s", self.worker_id, task.round_index + 1, info)

        return on_step

    def done(self, task: TrainTask, result: TrainResult) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
