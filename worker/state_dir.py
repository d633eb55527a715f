"""A worker's state directory: held by one process at a time, its identity, and its private parts, saved so
that a failed save (a full or failing disk) leaves the last good files as they were and is retried.

Layout of a --state-dir:
  lock                        held (flock) by the worker process using the directory; holds its pid
  identity.json               {"worker_id", "installation_id"}: the same across restarts
  run.json                    {"run_id"}: the run the files below belong to (the coordinator's, told at join)
  private-r0003.safetensors   private parts after 3 completed rounds (the last two are kept)
  residual-r0003.safetensors  what a lossy compression left out of the updates up to round 3 (error feedback)
  samples/r0003.png           sample grids of evaluate tasks
  previous-runs/<run id>/     the private parts and samples of other runs, moved aside when this worker joined
                              another run (never loaded by it; moved back if it joins that run again);
                              unknown-<UTC time> for files saved before run ids, whose run is not known"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedcore.atomic import FolderInUse, atomic_write_json, file_in_the_way, lock_folder, writable_folder
from fedcore.errors import FeddiffError
from fedcore.federation import checkpoint
from fedcore.wire.bounds import RUN_ID, WORKER_ID
from worker.metrics import Metrics

log = logging.getLogger("feddiff.worker")

IDENTITY_FILE = "identity.json"
PRIVATE_STEM = "private"
SAMPLES = "samples"
PREVIOUS_RUNS = checkpoint.PREVIOUS_RUNS
RESIDUAL_STEM = "residual"
TEMPORARY_MARK = ".tmp-"  # fedcore.atomic's temporary files: .NAME.tmp-PID


class StateDirError(FeddiffError, ValueError):
    """A state directory this process cannot use at all: in use by another worker process, not writable, or a
    saved file in it unreadable. The worker does not start (or, for a run's files at a join, joins again later)."""

    reason = "bad_state_dir"


@dataclass(frozen=True)
class Identity:
    worker_id: str
    installation_id: str  # saved in the state dir: tells a restart of this worker from another one
    instance_id: str  # new in every process


@dataclass(frozen=True)
class UnsavedPrivate:
    """Private parts held in memory only, because saving them failed."""

    completed_rounds: int
    tensors: dict[str, torch.Tensor]


class StateDir:
    """The open state directory of this worker process. `open` takes its lock (released when the process
    ends, or by `close`); the private parts are saved with `save_private` and, after a failure, `retry`."""

    def __init__(self, path: Path, lock_fd: int, identity: Identity, metrics: Metrics):
        self.path = path
        self.identity = identity
        self.metrics = metrics
        self.unsaved: UnsavedPrivate | None = None
        self.run_id: str | None = None  # the run joined (None before a join, or with a coordinator that predates run ids)
        self._run_file_pending = False  # run.json does not name it yet (its write failed)
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, path: str | Path, requested_worker_id: str, metrics: Metrics, *, default: bool = False) -> StateDir:
        """Lock the directory (created if missing) for this process and read or create its identity;
        StateDirError when another process holds it or it cannot be written at all (`default`: the flag was
        not given, and the message says so)."""
        path = Path(path)
        named = f"--state-dir {str(path)!r}{' (the default)' if default else ''}"
        in_the_way = file_in_the_way(path)
        if in_the_way is not None:
            what = "is a file" if in_the_way == path else f"cannot be made: {str(in_the_way)!r} is a file"
            raise StateDirError(f"{named} {what}, not a folder: give a folder (created if missing)")
        try:
            writable_folder(path)
            lock_fd = _lock(path, named)
        except OSError as e:
            raise StateDirError(f"{named} cannot be used: {e.strerror or e}") from e
        try:
            _remove_temporary_files(path)
            identity = _load_identity(path, requested_worker_id, named)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, lock_fd, identity, metrics)

    def close(self) -> None:
        """Release the lock (the process's end does it too)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # --- private parts ---------------------------------------------------------------------------------------
    def load_private(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """The newest private parts and their round count; StateDirError naming the file when it cannot be read."""
        return self._load(PRIVATE_STEM, "the coordinator then sends this worker the whole model again")

    def _load(self, stem: str, without: str) -> tuple[dict[str, torch.Tensor], int] | None:
        try:
            return checkpoint.load_private(self.path, stem)
        except (FeddiffError, OSError) as e:
            raise StateDirError(f"worker state in {self.path} cannot be read: {e}; move that file aside to start without it ({without})") from e

    # --- the run they belong to ------------------------------------------------------------------------------
    def enter_run(self, run_id: str) -> bool:
        """Make this state dir hold the files of run `run_id` (told by the coordinator at join): those of another
        run, or of an unknown one (saved before run ids), are moved to previous-runs/ (not loaded, not deleted;
        in-memory parts whose save failed are saved there, if they can be); the run's own, moved there earlier,
        are moved back. True when the private parts or error-feedback residuals on disk changed (the caller loads
        them again). ValueError
        for a run id that is no id."""
        problem = RUN_ID.problem(run_id)
        if problem or not run_id:
            raise ValueError(f"the coordinator's run id {problem or 'is empty'}")
        saved = self._saved_run_id()
        if saved == run_id:
            self.run_id = run_id
            return False
        changed = self._move_aside(saved, run_id)
        changed |= self._move_back(run_id)
        self.run_id, self._run_file_pending = run_id, True
        try:
            self._save_run_id()
        except OSError as e:  # the files moved aside stay there; the next save of private parts writes it first
            log.error("worker %s: cannot save run id %s in %s (%s); retried with the next save", self.identity.worker_id, run_id, self.path, e)
        return changed

    def _save_run_id(self) -> None:
        if self._run_file_pending and self.run_id:
            checkpoint.save_run_id(self.path, self.run_id)
            self._run_file_pending = False

    def _saved_run_id(self) -> str | None:
        """The run of the files in this state dir; None when unknown (no run.json, or one that is no run id)."""
        try:
            return checkpoint.load_run_id(self.path)
        except ValueError as e:
            log.warning("worker %s: %s: the run of the files here is taken as unknown", self.identity.worker_id, e)
            return None

    def _run_files(self) -> list[Path]:
        private = sorted(self.path.glob(f"{PRIVATE_STEM}-r*.safetensors"))
        residuals = sorted(self.path.glob(f"{RESIDUAL_STEM}-r*.safetensors"))  # a run's error feedback, with its parts
        return private + residuals + ([self.path / SAMPLES] if (self.path / SAMPLES).exists() else [])

    def _move_aside(self, run_id: str | None, joining: str) -> bool:
        """Move the files of run `run_id` (None: unknown) to previous-runs/ as this worker joins run `joining`;
        True when private parts moved."""
        files, unsaved = self._run_files(), self.unsaved
        if not files and unsaved is None:
            return False
        label = run_id or time.strftime("unknown-%Y%m%dT%H%M%SZ", time.gmtime())
        aside = _new_folder(self.path / PREVIOUS_RUNS, label)
        for f in files:
            os.replace(f, aside / f.name)
        if unsaved is not None:
            self.unsaved = None
            self.metrics.private_state_unsaved.set(0)
            try:
                checkpoint.save_private(aside, PRIVATE_STEM, unsaved.completed_rounds, unsaved.tensors)
            except OSError as e:
                log.error("worker %s: the unsaved private parts of round %d are lost: %s", self.identity.worker_id, unsaved.completed_rounds, e)
        private = any(f.name.startswith(PRIVATE_STEM) for f in files) or unsaved is not None
        residuals = any(f.name.startswith(RESIDUAL_STEM) for f in files)
        held = " and ".join(what for what, there in (("private parts", private), ("sample grids", (self.path / SAMPLES) in files)) if there)
        log.warning(
            "worker %s: this state dir held the %s of %s; joining run %s, they were moved to %s (kept, not used)%s",
            self.identity.worker_id, held, f"run {run_id}" if run_id else "a run of unknown id (saved before run ids)", joining, aside,
            " and this run starts from the global model" if private else "",
        )  # fmt: skip
        return private or residuals

    def _move_back(self, run_id: str) -> bool:
        """The files of run `run_id`, moved aside when this worker joined another run, back in place."""
        earlier = self.path / PREVIOUS_RUNS / run_id
        if not earlier.is_dir():
            return False
        for f in sorted(earlier.iterdir()):
            os.replace(f, self.path / f.name)
        earlier.rmdir()
        log.info("worker %s: run %s again: its private parts, moved aside before, are back from %s", self.identity.worker_id, run_id, earlier)
        return True

    def save_private(self, completed_rounds: int, tensors: dict[str, torch.Tensor]) -> bool:
        """Save the private parts after `completed_rounds` rounds; on failure keep them in memory (replacing
        older unsaved ones) for `retry`. The files saved before stay as they were. True when saved."""
        try:
            self._save_run_id()  # first: parts saved must never be taken for another run's
            checkpoint.save_private(self.path, PRIVATE_STEM, completed_rounds, tensors)
        except OSError as e:
            self.unsaved = UnsavedPrivate(completed_rounds, tensors)
            self.metrics.state_saves.labels("failed").inc()
            self.metrics.private_state_unsaved.set(1)
            log.error(
                "worker %s: saving the private parts of round %d to %s failed (%s); they are kept in memory and the "
                "save is retried; the files saved before stay valid",
                self.identity.worker_id, completed_rounds, self.path, e,
            )  # fmt: skip
            return False
        if self.unsaved is not None:
            log.info("worker %s: private parts of round %d saved to %s; nothing is held unsaved any more", self.identity.worker_id, completed_rounds, self.path)
        self.unsaved = None
        self.metrics.state_saves.labels("saved").inc()
        self.metrics.private_state_unsaved.set(0)
        return True

    # --- error-feedback residuals ----------------------------------------------------------------------------
    def load_residuals(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """The newest error-feedback residuals and their round count; StateDirError naming the file when it cannot be read."""
        return self._load(RESIDUAL_STEM, "the error feedback then starts afresh")

    def save_residuals(self, completed_rounds: int, tensors: dict[str, torch.Tensor]) -> bool:
        """Save the residuals of the update of round `completed_rounds` (atomically, as the private parts); a
        failed save is logged and leaves the files saved before as they were: the residuals stay in memory, and
        the next round's save carries them. True when saved."""
        try:
            self._save_run_id()  # first: residuals saved must never be taken for another run's
            checkpoint.save_private(self.path, RESIDUAL_STEM, completed_rounds, tensors)
        except OSError as e:
            log.error(
                "worker %s: saving the error-feedback residuals of round %d to %s failed (%s); they are kept in memory",
                self.identity.worker_id,
                completed_rounds,
                self.path,
                e,
            )
            return False
        return True

    def retry(self) -> bool:
        """Try again to save private parts whose save failed; True when nothing is left unsaved."""
        if self.unsaved is None:
            return True
        return self.save_private(self.unsaved.completed_rounds, self.unsaved.tensors)


def _new_folder(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3, ... when it exists: created, empty."""
    parent.mkdir(exist_ok=True)
    for n in range(1, 1000):
        folder = parent / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise OSError(f"{parent}: no free name for {name}")


def _lock(path: Path, named: str) -> int:
    """An exclusive lock on path/lock for this process, or StateDirError naming the process holding it."""
    try:
        return lock_folder(path)
    except FolderInUse as e:
        raise StateDirError(f"{named} is in use by another worker process (pid {e.holder}): each worker needs its own state dir") from None


def _remove_temporary_files(path: Path) -> None:
    """Temporary files that a killed process left (this one holds the lock: no write is in progress)."""
    for f in path.iterdir():
        if f.name.startswith(".") and TEMPORARY_MARK in f.name:
            f.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted write", f)


def _load_identity(path: Path, requested: str, named: str) -> Identity:
    """The requested worker id, else the one saved in the state dir, else a new one; the installation id
    saved there, else a new one. Saved when new (StateDirError when that fails: a restart would not be told
    from another worker)."""
    file = path / IDENTITY_FILE
    try:
        saved = json.loads(file.read_text()) if file.exists() else {}
    except ValueError as e:
        raise StateDirError(f"{str(file)!r} is not a worker identity (JSON): {e}") from e
    if not isinstance(saved, dict):
        raise StateDirError(f"{str(file)!r} is not a worker identity: expected a JSON object")
    worker_id = requested or saved.get("worker_id") or f"worker-{secrets.token_hex(4)}"
    owner = saved.get("worker_id")
    if requested and owner and requested != owner and any(path.glob(f"{PRIVATE_STEM}-r*.safetensors")):
        raise StateDirError(
            f"{str(file)!r}: this state dir holds the private parts of worker {owner!r}, not {requested!r}: give {requested!r} "
            f"a state dir of its own, or run it as --worker-id {owner!r}"
        )
    problem = WORKER_ID.problem(worker_id) if isinstance(worker_id, str) else "is no string"
    if problem:  # a file edited by hand: the coordinator would refuse the id at every join
        raise StateDirError(f"{str(file)!r}: the saved worker id {problem}; expected {WORKER_ID.describe()} (or pass --worker-id)")
    installation_id = saved.get("installation_id") or secrets.token_hex(16)
    fresh = {"worker_id": worker_id, "installation_id": installation_id}
    if fresh != saved:
        try:
            atomic_write_json(file, fresh)
        except OSError as e:
            raise StateDirError(f"{named}: cannot save the worker's identity in {IDENTITY_FILE}: {e.strerror or e}") from e
    return Identity(worker_id, installation_id, secrets.token_hex(8))
