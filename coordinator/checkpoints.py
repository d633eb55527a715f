"""The coordinator's writes to its checkpoint dir: each checkpoint, the round log lines that follow it, and the
final model. A write that fails (a full or read-only disk) leaves the files before it as they were; what it
held stays in memory and is written again with backoff while the run goes on, and the round log never gets
ahead of the checkpoint on disk. At the end the final model is retried for a bounded time."""

from __future__ import annotations

import errno
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.metrics import Metrics
from fedcore.atomic import append_json_line, naming
from fedcore.federation import checkpoint
from fedcore.federation.engine import SHARED_STEM, Federation
from fedcore.federation.roundlog import LogRecord
from fedcore.payload.serialization import save_file

log = logging.getLogger("feddiff.coordinator")

BACKOFF_INITIAL = 1.0  # seconds before the first retry of a failed write; doubled after each further failure
BACKOFF_MAX = 30.0


@dataclass(frozen=True)
class Unsaved:
    """A checkpoint that could not be written: a copy of the global model and the round state it commits."""

    global_state: dict[str, torch.Tensor]
    state: checkpoint.RunState
    shared: dict[str, torch.Tensor] | None = None  # the shared model of a run with coded downloads


def described(e: OSError, directory: Path) -> str:
    """A failed write in words: the file it was writing (not its temporary name) and the errno, by name."""
    path = Path(e.filename) if e.filename else directory
    if path.name.startswith(".") and ".tmp-" in path.name:  # fedcore.atomic's temporary file for path
        path = path.with_name(path.name[1:].rsplit(".tmp-", 1)[0])
    code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else "no errno"
    return f"writing {path}: {code} ({e.strerror or e})"


class CheckpointWriter:
    """Writes the run's files in the order that keeps them consistent: a checkpoint (global model, then state.json),
    then the round log lines of what it commits, then (at the end) the final model. The round loop calls
    `checkpoint` and `append`; after a failure a thread of its own retries what is held, with backoff, until it
    is written or `close` is called."""

    def __init__(self, directory: str | Path, metrics: Metrics, saved_rounds: int):
        self.directory = Path(directory)
        self.metrics = metrics
        self.saved_rounds = saved_rounds  # completed rounds of the checkpoint on disk
        self._lock = threading.Lock()  # one write at a time, and guards the state below
        self._unsaved: Unsaved | None = None  # the latest checkpoint not yet written
        self._records: list[LogRecord] = []  # round log records waiting for their checkpoint (or a failed append)
        self._final: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None  # the final model, once asked for
        self._failures = 0  # failed writes in a row
        self._error = ""  # the last one, in words
        self._closed = threading.Event()
        self._retrying: threading.Thread | None = None

    @property
    def unsaved(self) -> bool:
        """Whether anything asked for is not on disk yet."""
        with self._lock:
            return self._pending()

    def _pending(self) -> bool:
        return self._unsaved is not None or bool(self._records) or self._final is not None

    def checkpoint(self, federation: Federation, record: LogRecord | None = None) -> bool:
        """Checkpoint the federation as it is now, then append `record` (a round's) to the round log;
        True when both are on disk. When the checkpoint fails, a copy is held and retried (the previous
        checkpoint stays the valid one) and the line waits for it. Call from the thread that changes the
        federation."""
        with self._lock:
            if record is not None:
                self._records.append(record)
            self._unsaved = None  # superseded: this checkpoint holds everything the held one did
            try:
                federation.save(self.directory)
            except OSError as e:
                shared = None if federation.shared is None else {k: v.clone() for k, v in federation.shared.items()}
                self._unsaved = Unsaved({k: v.clone() for k, v in federation.global_state.items()}, federation.run_state(), shared)
                self._failed(e)
                return False
            self.saved_rounds = federation.completed_rounds
            self.metrics.checkpoint_saves.labels("saved").inc()
            return self._write_held()

    def append(self, record: LogRecord) -> None:
        """Append a record to the round log, after any checkpoint still held (an evaluation's)."""
        with self._lock:
            self._records.append(record)
            if self._unsaved is None:
                self._write_held()

    def finish(self, federation: Federation, timeout: float, stop: threading.Event) -> str | None:
        """Write the final model (after whatever is still held), retrying with backoff for at most `timeout`
        seconds or until `stop`; None once it is written, else the error that ends the run, in one line."""
        with self._lock:
            self._final = (federation.global_state, {"completed_rounds": str(federation.completed_rounds)})
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._write_held():
                    return None
                delay = self._delay()
            left = deadline - time.monotonic()
            if left <= 0 or stop.wait(min(delay, left)):
                break
        with self._lock:
            if not self._pending():  # the retry thread wrote it meanwhile
                return None
            return (
                f"the final model could not be written to {self.directory / checkpoint.FINAL_MODEL} in {timeout:g} s of retries "
                f"({self._error}); {self.directory / checkpoint.STATE_FILE} holds {self.saved_rounds} of "
                f"{federation.completed_rounds} rounds: make room (or make it writable) and run the coordinator again with --resume"
            )

    def close(self) -> str | None:
        """Stop retrying, after one last try; what is still not on disk, in words, or None."""
        self._closed.set()
        if self._retrying is not None:
            self._retrying.join(timeout=30)
        with self._lock:
            if not self._pending() or self._write_held(quiet=True):
                return None
            held = f"the checkpoint after {self._unsaved.state.completed_rounds} rounds" if self._unsaved else "round log lines"
            return f"stopping with {held} unsaved ({self._error}): {self.directory / checkpoint.STATE_FILE} holds {self.saved_rounds} rounds"

    # --- writing what is held (under the lock) ---------------------------------------------------------------
    def _write_held(self, *, quiet: bool = False) -> bool:
        """Write what is held, in order; True when nothing is left. A failure keeps the rest for a retry (and is
        logged unless `quiet`)."""
        try:
            if self._unsaved is not None:
                if self._unsaved.shared is not None:
                    checkpoint.save_private(self.directory, SHARED_STEM, self._unsaved.state.completed_rounds, self._unsaved.shared)
                checkpoint.save_run(self.directory, self._unsaved.global_state, self._unsaved.state)
                self.saved_rounds = self._unsaved.state.completed_rounds
                self._unsaved = None
                self.metrics.checkpoint_saves.labels("saved").inc()
            while self._records:
                with naming(self.directory / checkpoint.ROUNDS_LOG):
                    append_json_line(self.directory / checkpoint.ROUNDS_LOG, self._records[0].as_json())
                self._records.pop(0)
            if self._final is not None:
                with naming(self.directory / checkpoint.FINAL_MODEL):
                    save_file(self.directory / checkpoint.FINAL_MODEL, *self._final)
                self._final = None
                self.metrics.checkpoint_saves.labels("saved").inc()
        except OSError as e:
            self._failed(e, quiet=quiet)
            return False
        self.metrics.checkpoint_unsaved.set(0)
        if self._failures:
            log.info(
                "checkpoint after %d rounds written to %s after %d failed writes; nothing is held unsaved any more",
                self.saved_rounds,
                self.directory,
                self._failures,
            )
        self._failures, self._error = 0, ""
        return True

    def _failed(self, e: OSError, *, quiet: bool = False) -> None:
        self._failures += 1
        self._error = described(e, self.directory)
        self.metrics.checkpoint_saves.labels("failed").inc()
        self.metrics.checkpoint_unsaved.set(1)
        if quiet:
            return
        meanwhile = "while the run goes on" if self._final is None else "until --final-save-timeout"
        (log.error if self._failures == 1 else log.warning)(
            "checkpoint failed (%s); the checkpoint after %d rounds stays the valid one, what is unsaved is kept in memory and written again in %g s %s",
            self._error, self.saved_rounds, self._delay(), meanwhile,
        )  # fmt: skip
        if self._retrying is None and not self._closed.is_set():
            self._retrying = threading.Thread(target=self._retry, name="checkpoint-retry", daemon=True)
            self._retrying.start()

    def _delay(self) -> float:
        return min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** max(0, self._failures - 1))

    def _retry(self) -> None:
        """Write what is held again, after each failure's backoff, until nothing is held or `close`."""
        while True:
            with self._lock:
                delay = self._delay()
            if self._closed.wait(delay):
                return
            with self._lock:
                if self._pending() and self._final is None:  # the final model is `finish`'s to retry
                    self._write_held()
