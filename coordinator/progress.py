"""Live progress of the coordinator: a rich status line on a terminal, a log line per change otherwise."""

from __future__ import annotations

import logging
import sys
import threading

from coordinator.phase import RoundProgress
from coordinator.rounds import RoundDriver

log = logging.getLogger("feddiff.coordinator")


def _line(p: RoundProgress, rounds: int) -> str:
    return f"{p.state}: round {p.round_number}/{rounds}, {p.done}/{p.selected} workers done, {p.bytes_down / 1e6:.2f} MB down, {p.bytes_up / 1e6:.2f} MB up"


class ProgressReporter:
    """Polls the round driver twice a second until stopped; never touches the round state."""

    def __init__(self, driver: RoundDriver, mode: str = "auto", interval: float = 0.5):
        self.driver = driver
        self.mode = ("bar" if sys.stderr.isatty() else "log") if mode == "auto" else mode
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def start(self) -> ProgressReporter:
        if self.mode != "off":
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _run(self) -> None:
        rounds = self.driver.federation.config.rounds
        last: tuple[str, int, int] | None = None
        if self.mode == "bar":
            from rich.live import Live

            with Live("", transient=True, refresh_per_second=4) as live:
                while not self._stop.wait(self.interval):
                    live.update(_line(self.driver.phase.progress(), rounds))
            return
        while not self._stop.wait(self.interval):
            p = self.driver.phase.progress()
            key = (p.state, p.round_number, p.done)
            if p.selected and key != last:
                log.info(_line(p, rounds))
            last = key
