"""Log lines of refused calls, limited per reason: a caller that floods the coordinator with bad calls (it need
not even be a worker) cannot grow its log without bound. The metrics count every refusal; the log shows the
first ones of each reason in a window and how many it left out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

PER_WINDOW = 20  # lines of one reason logged in a window
WINDOW = 60.0  # seconds


@dataclass
class _Window:
    start: float
    shown: int = 0
    held: int = 0


class LimitedLog:
    """At most `per_window` warnings of each reason every `window` seconds. The first one held back says so;
    the first of a later window says how many were held back. Not thread-safe: one thread logs (the event loop)."""

    def __init__(self, logger: logging.Logger, per_window: int = PER_WINDOW, window: float = WINDOW, clock: Callable[[], float] = time.monotonic):
        if per_window < 1 or window <= 0:
            raise ValueError(f"per_window {per_window} and window {window} s: expected at least one line in a positive window")
        self.logger, self.per_window, self.window, self.clock = logger, per_window, window, clock
        self._windows: dict[str, _Window] = {}

    def refused(self, reason: str, msg: str, *args: object) -> None:
        """Log `msg % args` as a warning unless `reason` had its `per_window` lines in this window."""
        now = self.clock()
        w = self._windows.get(reason)
        if w is None or now - w.start >= self.window:
            if w is not None and w.held:
                self.logger.warning("%d more %s lines were not logged in the last %.0f s (the metrics count them all)", w.held, reason, self.window)
            w = self._windows[reason] = _Window(now)
        if w.shown < self.per_window:
            w.shown += 1
            self.logger.warning(msg, *args)
            return
        if w.held == 0:
            self.logger.warning("more %s lines in this %.0f s are counted in the metrics, not logged", reason, self.window)
        w.held += 1
