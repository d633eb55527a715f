"""The tasks of the phase in progress, shared by the round loop (coordinator/rounds.py) and the gRPC handlers
under one lock: a round attempt or an evaluation, its tasks issued to workers, each answered (an update
delivered, a report sent, or the task refused) or not by the phase's deadline; and the run's state that long
polls hear of."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from coordinator.evaluation import EvalPhase, EvalReport
from coordinator.metrics import Metrics
from coordinator.refusals import Refusal
from coordinator.registry import WorkerRegistry
from fedcore.errors import DuplicateUpdate, LateUpdate, MissingSharedState, NotAssigned, WrongRound
from fedcore.federation.client import EvalTask, TrainTask
from fedcore.federation.engine import AcceptedUpdate, Federation, OpenRound
from fedcore.federation.totals import Ledger
from fedcore.model.parts import PART_ORDER, Part
from fedcore.payload import coded
from fedcore.wire.stream import StreamHeader, digest_for

log = logging.getLogger("feddiff.coordinator")

State = Literal["waiting_for_workers", "training", "evaluating", "done", "failed", "stopped"]
GAUGE_INTERVAL = 0.5  # seconds between two updates of the connected-workers gauge while a phase waits


@dataclass(frozen=True)
class RoundProgress:
    state: str
    round_number: int  # 1-based number of the round in progress (or the last one completed)
    selected: int  # workers given a task in this phase
    done: int  # of them, finished
    bytes_down: int  # payload bytes of this round so far
    bytes_up: int


@dataclass(frozen=True)
class IssuedTask:
    task: TrainTask | EvalTask
    header: StreamHeader  # of the payload the worker downloads for it


class PollEnd(Enum):
    """How a worker's long poll ends without a task."""

    DONE = "done"  # the run is over: its last round saved, or it failed (`Phase.failure` says why)
    STOPPED = "stopped"  # the round loop stopped
    IDLE = "idle"  # nothing for the worker within the poll's timeout, or a newer poll of its session came


PollOutcome = IssuedTask | PollEnd  # a long poll's answer


class Phase:
    """The phase in progress and the run's state, under one lock (`lock`). The round loop opens a phase,
    awaits its answers and closes it, holding `lock` where the phase's end must not interleave with a handler;
    gRPC handlers call in from the server's event loop and its accept threads and never block here: a worker's
    long poll asks `poll_task` and waits for the next change that `on_change` announces."""

    def __init__(self, federation: Federation, registry: WorkerRegistry, metrics: Metrics, stop: threading.Event, save_grid: Callable[[str, int, bytes], None]):
        self.federation = federation
        self.registry = registry
        self.metrics = metrics
        self.state: State = "waiting_for_workers"
        self.failure = ""  # why the run stopped, in state "failed"
        self.lock = threading.RLock()  # guards the state below; held by the round loop across a phase's end
        self._cond = threading.Condition(self.lock)  # waits of the round loop
        self._arrivals = threading.Condition(self.lock)  # updates and reports in: wakes only the round loop
        self._stop = stop  # set once the round loop stops
        self._save_grid = save_grid  # a sample grid a worker shared (`Evaluation.save_shared_grid`)
        self._listeners: list[Callable[[], object]] = []  # told of tasks issued and state changes
        self._round: OpenRound | None = None  # the phase in progress: a round attempt,
        self._eval: EvalPhase | None = None  # or an evaluation
        self._issued: dict[str, IssuedTask] = {}  # its tasks, by worker
        self._holder_instances: dict[str, str] = {}  # worker -> the process whose last download was counted (coded downloads)
        self._refusals: dict[str, Refusal] = {}  # of them, those their workers refused
        self._left: set[str] = set()  # of them, those whose workers left their session and have not joined again
        self._closed_task_ids: set[str] = set()  # tasks of phases that ended: their uploads are late
        self._training_seconds: dict[str, float] = {}  # the latest training time each worker reported (late ones too)
        self._told: set[str] = set()  # workers answered that the run failed

    # --- the round loop's calls -----------------------------------------------------------------------------
    def open_round(self, open_round: OpenRound, issued: dict[str, IssuedTask]) -> None:
        """Hand out a round attempt's tasks (`issued`, by worker): long polls hear of them."""
        with self._cond:
            self._round = open_round
            self._open(issued, "training")

    def open_evaluation(self, phase: EvalPhase) -> None:
        """Hand out an evaluation's tasks: long polls hear of them."""
        with self._cond:
            self._eval = phase
            self._open({w: IssuedTask(t, phase.header(w)) for w, t in phase.tasks.items()}, "evaluating")

    def _open(self, issued: dict[str, IssuedTask], state: State) -> None:
        """Hand out a phase's tasks (under the lock; `_round` or `_eval` set)."""
        self._issued = issued
        self._refusals = {}
        self._left = set()
        self.state = state
        self._changed()

    def await_answers(self, deadline: float, quorum: float = math.inf) -> None:
        """Wait (under the lock, released while waiting) until every task of the phase is answered (or, once
        `quorum` updates are in, answered or left by its worker: `left`), the deadline passes or the round loop
        stops; the connected-workers gauge kept current meanwhile."""
        with self._cond:
            gauge_due = 0.0
            while not self._stop.is_set() and not self._settled(quorum):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._arrivals.wait(timeout=min(remaining, GAUGE_INTERVAL))
                if time.monotonic() >= gauge_due:  # twice a second, not once per update
                    self.metrics.workers_connected.set(len(self.registry.connected()))
                    gauge_due = time.monotonic() + GAUGE_INTERVAL

    def _answered(self) -> int:
        """Tasks of the phase in progress that their workers answered: delivered, reported or refused."""
        done = len(self._round.accepted) if self._round is not None else len(self._eval.reports) if self._eval is not None else 0
        return done + len(self._refusals)

    def _settled(self, quorum: float) -> bool:
        """Whether the phase waits for nothing more: every task answered, or a round attempt with `quorum`
        updates in whose other tasks are answered or left by their workers (they cannot deliver)."""
        answered = self._answered()
        if answered >= len(self._issued):
            return True
        if self._round is None or len(self._round.accepted) < quorum:
            return False
        return answered + sum(1 for w in self._left if not self._finished(w)) >= len(self._issued)

    def refusals(self) -> list[Refusal]:
        """The tasks of the phase in progress that their workers refused."""
        with self._cond:
            return list(self._refusals.values())

    def close(self) -> None:
        """End the phase: what comes for its tasks from now on is late; its open uploads end."""
        with self._cond:
            self._closed_task_ids.update(t.task.task_id for t in self._issued.values())
            self._issued = {}
            self._changed()
            self._round = None
            self._eval = None

    def training_seconds(self) -> dict[str, float]:
        """The latest training time each worker reported (`note_training_time`)."""
        with self._cond:
            return dict(self._training_seconds)

    def wait_for_workers(self, timeout: float) -> None:
        """Show the state "waiting_for_workers" and wait at most `timeout` seconds for a change."""
        with self._cond:
            self.state = "waiting_for_workers"
            self._cond.wait(timeout=timeout)

    def fail(self, error: str) -> None:
        """The run failed with `error`: waiting workers are told it is over."""
        with self._cond:
            self.failure = error
            self.state = "failed"
            self._changed()

    def done(self) -> None:
        """The run is over, its last round saved."""
        with self._cond:
            self.state = "done"
            self._changed()

    def ended(self) -> None:
        """The round loop ended: "stopped" unless the run is done or failed."""
        with self._cond:
            if self.state not in ("done", "failed"):
                self.state = "stopped"
            self._changed()

    def wake(self) -> None:
        """Wake the round loop and every long poll (the round loop is stopping)."""
        with self._cond:
            self._changed()
            self._arrivals.notify_all()

    def all_told(self) -> bool:
        """Whether every connected worker has asked for a task since the run failed (`poll_task`)."""
        with self._cond:
            return all(r.worker_id in self._told for r in self.registry.connected())

    # --- called from gRPC handlers --------------------------------------------------------------------------
    def on_change(self, listener: Callable[[], object]) -> Callable[[], None]:
        """Call `listener` (from the thread that made the change, under the phase's lock: it must only
        schedule work) whenever tasks are issued or the state changes, until the returned function is called."""
        with self._cond:
            self._listeners.append(listener)

        def remove() -> None:
            with self._cond:
                self._listeners.remove(listener)

        return remove

    def _changed(self) -> None:
        self._cond.notify_all()
        for listener in self._listeners:
            listener()

    def poll_task(self, worker_id: str) -> PollOutcome | None:
        """This worker's open task of the phase in progress; DONE after the last round or once the run failed
        (`failure` says why), STOPPED once the round loop stops; None while there is nothing for it (wait for
        the next change)."""
        with self._cond:
            if self.state == "failed":
                self._told.add(worker_id)
            if self.state in ("done", "failed"):
                return PollEnd.DONE
            issued = self._issued.get(worker_id)
            if issued is not None and not self._finished(worker_id):
                return issued
            return PollEnd.STOPPED if self._stop.is_set() else None

    def _finished(self, worker_id: str) -> bool:
        """Whether this worker is through with the task of the phase in progress (or refused it)."""
        if worker_id in self._refusals:
            return True
        if self._round is not None:
            return worker_id in self._round.accepted
        if self._eval is not None:
            return worker_id in self._eval.reports
        return True

    def _issued_task(self, worker_id: str, task_id: str) -> IssuedTask:
        """This worker's task `task_id` of the phase in progress; else LateUpdate (a task of a phase that ended),
        NotAssigned (another worker's) or WrongRound (no task of this phase)."""
        with self._cond:
            issued = self._issued.get(worker_id)
            if issued is not None and issued.task.task_id == task_id:
                return issued
            if task_id in self._closed_task_ids:
                raise LateUpdate(f"task {task_id!r} belongs to a round that has closed")
            if any(t.task.task_id == task_id for t in self._issued.values()):
                raise NotAssigned(f"task {task_id!r} was not given to worker {worker_id!r}")
            raise WrongRound(f"task {task_id!r} is not part of the round in progress")

    def _current(self, worker_id: str, task_id: str) -> tuple[OpenRound, IssuedTask]:
        """The round in progress and this worker's training task of it (`_issued_task`; WrongRound during an
        evaluation)."""
        with self._cond:
            issued = self._issued_task(worker_id, task_id)
            if self._round is None or not isinstance(issued.task, TrainTask):
                raise WrongRound(f"task {task_id!r} is not a training task of the round in progress")
            return self._round, issued

    def task_payload(self, worker_id: str, task_id: str) -> tuple[bytes, IssuedTask]:
        """The payload this worker downloads for its task of the phase in progress, and the task."""
        with self._cond:
            issued = self._issued_task(worker_id, task_id)
            if self._eval is not None:
                return self._eval.payload, issued
        open_round, issued = self._current(worker_id, task_id)
        return open_round.payload_for(worker_id), issued

    def download_complete(self, worker_id: str, task_id: str) -> Ledger | None:
        """Count a drained download. Evaluation downloads are not part of the paper's accounting."""
        with self._cond:
            if self._eval is not None and self._issued_task(worker_id, task_id):
                return None
        open_round, _ = self._current(worker_id, task_id)
        event = open_round.mark_sent(worker_id)
        record = self.registry.record(worker_id)
        with self._cond:
            self._holder_instances[worker_id] = record.info.instance_id if record is not None else ""
        self.metrics.count_transfer("down", event)
        return event

    def upload_limit(self, worker_id: str, task_id: str, parts: frozenset[Part], wire_round: int) -> int:
        """The largest update payload this worker may send for this task, after checking the task, its round
        (as the stream header states it) and the parts."""
        open_round, issued = self._current(worker_id, task_id)
        if worker_id in self._refusals:
            raise NotAssigned(f"worker {worker_id!r} refused task {task_id!r}")
        if worker_id in open_round.accepted:  # before a slot is taken or a byte is read
            raise DuplicateUpdate(f"worker {worker_id!r} already delivered its update for task {task_id!r}")
        if wire_round != issued.task.wire_round:
            raise WrongRound(f"update header is for round {wire_round}, task {task_id!r} belongs to round {issued.task.wire_round}")
        if parts != issued.task.returns:
            got = sorted(p.value for p in parts)
            want = sorted(p.value for p in issued.task.returns)
            raise NotAssigned(f"update carries parts {got}, task {task_id!r} returns {want}")
        return coded.max_payload_bytes(self.federation.layout, parts, self.federation.config.compression)

    def accepting(self, task_id: str) -> bool:
        """Whether the round of a task that `upload_limit` let through still takes its update (False once that
        round has closed; every listener of `on_change` hears of the close)."""
        with self._cond:
            return task_id not in self._closed_task_ids

    def accept(self, worker_id: str, task_id: str, payload: bytes | bytearray | memoryview, *, mean_loss: float, images_seen: int) -> AcceptedUpdate:
        """Fold a worker's received update into the round in progress (checked there first) and count it."""
        open_round, _ = self._current(worker_id, task_id)
        update = open_round.accept(worker_id, payload, mean_loss=mean_loss, images_seen=images_seen)
        self.metrics.count_transfer("up", update.ledger)
        for part, factor in update.clipped.items():
            self.metrics.clipped_updates.labels(part.value).inc()
            log.info("update of worker %s for task %s: %s scaled by %.3g to the clipping bound", worker_id, task_id, part.value, factor)
        if open_round.plan.assignment(worker_id).private_parts:
            self.registry.mark_has_private_state(worker_id)
        with self._arrivals:
            self._arrivals.notify_all()
        return update

    def admit(self, worker_id: str, num_examples: int) -> None:
        """Whether a worker may join: UnregisteredWorker when worker sizes are registered and it has none. A
        claim above its registered size is logged; every round weighs it at its size."""
        robust = self.federation.robust
        robust.check_registered(worker_id)
        size = robust.registered.get(worker_id, num_examples)
        if num_examples > size:
            log.warning("worker %s claims %d images, more than the %d registered for it: it weighs %d", worker_id, num_examples, size, size)

    def _holder_restarted(self, worker_id: str, instance_id: str) -> None:
        """In a run with coded downloads: a worker that joins from another process than the one whose downloads
        were counted (a restart, or a worker that does not say) holds no shared model, so its downloads are the
        values from now on, its task in progress included (a change from version 0 it builds from the seed
        stays as it is)."""
        with self._cond:
            if instance_id and self._holder_instances.get(worker_id) == instance_id:
                return
            self.federation.forget_holdings(worker_id)
            issued = self._issued.get(worker_id)
            if self._round is None or issued is None or not isinstance(issued.task, TrainTask) or self._finished(worker_id):
                return
            if not self._round.send_values(worker_id):
                return
            record = self.registry.record(worker_id)
            digest = digest_for(record.info.digests) if record is not None else issued.header.algorithm
            self._issued[worker_id] = IssuedTask(issued.task, StreamHeader.of(self._round.payload_for(worker_id), digest))
            self._changed()

    def left(self, worker_id: str) -> None:
        """A worker ended its session (it stops): a round attempt with a quorum of updates in no longer waits
        for its open task (`await_answers`), which stays its own should it join again before the round closes."""
        with self._cond:
            issued = self._issued.get(worker_id)
            if self._round is None or issued is None or self._finished(worker_id):
                return
            self._left.add(worker_id)
            self._arrivals.notify_all()
        log.info("worker %s left with task %s open: once a quorum of updates is in, the round does not wait for it", worker_id, issued.task.task_id)

    def joined(self, worker_id: str) -> None:
        """A worker joined (again): its open task of the phase in progress is waited for again. When it holds no
        private parts but that task counts on them (another installation took its identity over, or it lost its
        state and says so), it is never handed that task, which it could only fail: a training task is given
        again with the whole model, and an evaluate task is withdrawn (it has no model of its own to score)."""
        with self._cond:
            self._left.discard(worker_id)
        record = self.registry.record(worker_id)
        if record is not None and self.federation.shared is not None:
            self._holder_restarted(worker_id, record.info.instance_id)
        if record is None or record.info.has_private_state:
            return
        with self._cond:
            issued = self._issued.get(worker_id)
            if issued is None or self._finished(worker_id) or issued.task.private_parts <= issued.task.receives:
                return
            if self._round is not None:
                task = self._round.send_whole_model(worker_id)
                header = StreamHeader.of(self._round.payload_for(worker_id), digest_for(record.info.digests))
                self._issued[worker_id] = IssuedTask(task, header)
                log.info("worker %s holds no private parts: task %s now carries the whole model", worker_id, task.task_id)
            else:
                del self._issued[worker_id]
                if self._eval is not None:
                    self._eval.tasks.pop(worker_id, None)
                self._arrivals.notify_all()
                log.info("worker %s holds no private parts: its evaluate task %s is withdrawn", worker_id, issued.task.task_id)
            self._changed()

    def note_training_time(self, worker_id: str, task_id: str, seconds: float) -> None:
        """The training time a worker reports with an update of one of this run's tasks, late ones included:
        what tells a round deadline too short for the training (`FailedAttempts`)."""
        with self._cond:
            if task_id in self._closed_task_ids or any(t.task.task_id == task_id for t in self._issued.values()):
                self._training_seconds[worker_id] = seconds

    def reject(self, worker_id: str, task_id: str, reason: str, message: str) -> Refusal:
        """A worker cannot run its task of the phase in progress: it is not given that task again in this
        attempt, and an attempt in which every worker has delivered or refused ends at once."""
        with self._cond:
            self._issued_task(worker_id, task_id)  # raises for a task of another worker or of a closed round
            if self._finished(worker_id):
                raise DuplicateUpdate(f"worker {worker_id!r} already answered task {task_id!r}")
            refusal = self._refusals[worker_id] = Refusal.of(worker_id, task_id, reason, message)
            if reason == MissingSharedState.reason:  # its next download: the values, never the seed
                self.federation.refused_shared(worker_id)
            self._arrivals.notify_all()
        log.warning("worker %s refused task %s (%s): %s", worker_id, task_id, refusal.reason, refusal.message)
        return refusal

    def report_evaluation(self, report: EvalReport, grid_png: bytes) -> None:
        """A worker's evaluation of its own model, for its task of the evaluation in progress (LateUpdate,
        NotAssigned or WrongRound for a task that is not; NotAssigned for a task its worker refused), checked
        against that task (`EvalPhase.report`); the sample grid it shares, if any, saved."""
        with self._cond:
            self._issued_task(report.worker_id, report.task_id)
            if self._eval is None:
                raise WrongRound(f"task {report.task_id!r} is not an evaluate task of the evaluation in progress")
            if report.worker_id in self._refusals:
                raise NotAssigned(f"worker {report.worker_id!r} refused task {report.task_id!r}")
            phase = self._eval
            phase.report(report)
            self._arrivals.notify_all()
        if grid_png:
            self._save_grid(report.worker_id, phase.completed_rounds, grid_png)

    def progress(self) -> RoundProgress:
        """Where the round (or evaluation) in progress stands."""
        with self._cond:
            if self._round is not None:
                ledger = self._round.ledger_so_far()
                return RoundProgress(
                    state=self.state,
                    round_number=self._round.round_index + 1,
                    selected=len(self._round.plan.clients),
                    done=len(self._round.accepted),
                    bytes_down=sum(ledger.bytes_down.values()),
                    bytes_up=sum(ledger.bytes_up.values()),
                )
            if self._eval is not None:
                return RoundProgress(self.state, self._eval.completed_rounds, len(self._eval.tasks), len(self._eval.reports), 0, 0)
            return RoundProgress(self.state, self.federation.completed_rounds, 0, 0, 0, 0)

    def bytes_total(self) -> tuple[int, int]:
        """The run's payload bytes so far, down and up."""
        ledger = self.federation.ledger
        return sum(ledger.bytes_down[p] for p in PART_ORDER), sum(ledger.bytes_up[p] for p in PART_ORDER)
