"""The worker registry: who has joined, with which session, and who is connected now. Owned here alone.

A worker that has departed (left, or unheard of for the heartbeat timeout) is forgotten `departed_retention`
seconds later: its session ends (a later call is UNAUTHENTICATED, and the worker joins again by itself), and
it is no longer listed. What it keeps (its private parts) is its own; what the run keeps of it (whether it
was sent the whole model) is the federation's."""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from fedcore.errors import DuplicateWorker, UnknownWorker


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    device: str
    gpu_name: str
    gpu_memory_bytes: int
    num_examples: int  # images it declares: its FedAvg weight before the bounds (fedcore.federation.robust)
    software_version: str
    has_private_state: bool
    digests: frozenset[str] = frozenset()  # payload digests it checks besides SHA-256 (fedcore.wire.stream.DIGESTS)
    installation_id: str = ""  # saved in the worker's state dir: the same across its restarts ("" before v1.1)
    instance_id: str = ""  # new in every worker process


@dataclass(frozen=True)
class WorkerRecord:
    info: WorkerInfo
    session_id: str
    last_seen: float  # monotonic clock
    left: bool = False

    @property
    def worker_id(self) -> str:
        return self.info.worker_id


class WorkerRegistry:
    def __init__(self, heartbeat_timeout: float, departed_retention: float = math.inf, clock: Callable[[], float] = time.monotonic):
        self.heartbeat_timeout = heartbeat_timeout
        self.departed_retention = departed_retention
        self._clock = clock
        self._by_id: dict[str, WorkerRecord] = {}
        self._sessions: dict[str, str] = {}  # session id -> worker id
        self._lock = threading.Lock()

    def join(self, info: WorkerInfo) -> tuple[str, WorkerRecord | None]:
        """A new session for this identity, and the live session it replaced (if any).

        The same installation joining again (its process restarted, or it lost its session) replaces its
        older session at once. Another installation is refused with DuplicateWorker while the older session
        is live (heard within the heartbeat timeout, not left), and takes the identity over once it is not:
        then it counts as holding no private parts, whatever it says, since it holds none the run gave this
        identity (its next task carries the whole model)."""
        session = secrets.token_hex(16)
        with self._lock:
            self._forget_departed(self._clock())
            old = self._by_id.get(info.worker_id)
            live = old if old is not None and self.is_connected(old) else None
            if live is not None and live.info.installation_id != info.installation_id:
                raise DuplicateWorker(
                    f"worker id {info.worker_id!r} is held by a live session of another installation "
                    f"({_installation(live.info)}, heard {self.seconds_since_seen(live):.1f}s ago); this one is "
                    f"{_installation(info)}: give each worker its own --worker-id, or stop the other one"
                )
            if old is not None:
                self._sessions.pop(old.session_id, None)
                if old.info.installation_id != info.installation_id:  # what it keeps is not what the run gave this id
                    info = replace(info, has_private_state=False)
            self._by_id[info.worker_id] = WorkerRecord(info, session, self._clock())
            self._sessions[session] = info.worker_id
        return session, live

    def record(self, worker_id: str) -> WorkerRecord | None:
        with self._lock:
            return self._by_id.get(worker_id)

    def check_session(self, session_id: str) -> None:
        """UnknownWorker for a session never issued, ended, or forgotten (of any length: it is only looked up)."""
        with self._lock:
            if session_id not in self._sessions:
                raise UnknownWorker(f"session {session_id[:12]!r} is unknown or has ended; join again")

    def touch(self, session_id: str) -> WorkerRecord:
        """The worker behind a session, marked as seen now; UnknownWorker for an unknown or ended session."""
        with self._lock:
            worker_id = self._sessions.get(session_id)
            if worker_id is None:
                raise UnknownWorker(f"session {session_id[:12]!r} is unknown or has ended; join again")
            record = replace(self._by_id[worker_id], last_seen=self._clock(), left=False)
            self._by_id[worker_id] = record
            return record

    def leave(self, session_id: str) -> str | None:
        """End a session: the worker that held it, or None for a session unknown or already ended (a restart's
        newer session stays)."""
        with self._lock:
            worker_id = self._sessions.pop(session_id, None)
            if worker_id is not None:
                self._by_id[worker_id] = replace(self._by_id[worker_id], left=True)
            return worker_id

    def mark_has_private_state(self, worker_id: str) -> None:
        with self._lock:
            r = self._by_id.get(worker_id)
            if r is not None:
                self._by_id[worker_id] = replace(r, info=replace(r.info, has_private_state=True))

    def is_connected(self, record: WorkerRecord, now: float | None = None) -> bool:
        now = self._clock() if now is None else now
        return not record.left and now - record.last_seen <= self.heartbeat_timeout

    def _departed_at(self, record: WorkerRecord) -> float:
        """When a worker stopped being connected: when it left, or when its heartbeat timeout ran out."""
        return record.last_seen if record.left else record.last_seen + self.heartbeat_timeout

    def _forget_departed(self, now: float) -> None:
        """Drop the workers departed more than `departed_retention` seconds ago (under the lock)."""
        gone = [r for r in self._by_id.values() if not self.is_connected(r, now) and now - self._departed_at(r) > self.departed_retention]
        for r in gone:
            del self._by_id[r.worker_id]
            self._sessions.pop(r.session_id, None)

    def connected(self) -> list[WorkerRecord]:
        now = self._clock()
        with self._lock:
            self._forget_departed(now)
            return sorted((r for r in self._by_id.values() if self.is_connected(r, now)), key=lambda r: r.worker_id)

    def all(self) -> list[WorkerRecord]:
        with self._lock:
            self._forget_departed(self._clock())
            return sorted(self._by_id.values(), key=lambda r: r.worker_id)

    def listing(self, most: int) -> tuple[list[WorkerRecord], int, int]:
        """At most `most` workers for a status reply: the connected ones by id, then the others, most recently
        heard first; with how many known workers are left out and how many are connected."""
        now = self._clock()
        with self._lock:
            self._forget_departed(now)
            live = {r.worker_id for r in self._by_id.values() if self.is_connected(r, now)}
            records = sorted(self._by_id.values(), key=lambda r: (r.worker_id not in live, 0.0 if r.worker_id in live else -r.last_seen, r.worker_id))
        connected = len(live)
        return records[:most], max(0, len(records) - most), connected

    def seconds_since_seen(self, record: WorkerRecord) -> float:
        return self._clock() - record.last_seen


def _installation(info: WorkerInfo) -> str:
    """An installation as the logs name it: its id's first characters and where it runs."""
    installation = f"installation {info.installation_id[:12]!r}" if info.installation_id else "an installation without id"
    return f"{installation}, {info.software_version or 'unknown software'}"
