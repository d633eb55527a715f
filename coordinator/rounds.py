"""The round state machine: wait for workers, plan, hand out tasks, collect updates, close with quorum, checkpoint;
then the evaluation that is due (coordinator/evaluation.py), its evaluate tasks handed out and answered alike."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from coordinator.attempts import Attempt, FailedAttempts
from coordinator.checkpoints import CheckpointWriter
from coordinator.config import CoordinatorConfig
from coordinator.evaluation import EvalPhase, EvalReport, Evaluation
from coordinator.metrics import Metrics
from coordinator.refusals import Refusal
from coordinator.registry import WorkerRecord, WorkerRegistry
from fedcore import settings
from fedcore.errors import DuplicateUpdate, LateUpdate, MissingSharedState, NonFiniteAggregate, NotAssigned, UploadAborted, WrongRound
from fedcore.federation.client import EvalTask, TrainTask
from fedcore.federation.roundlog import ROUNDS_LOG, format_round, latest_in_log, round_record
from fedcore.federation.server import AcceptedUpdate, Federation, Ledger, OpenRound, RoundOutcome
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
    header: StreamHeader  # of the weights payload the worker downloads


class RoundDriver:
    """Owns the federation's progress. `run` is the one loop that opens and closes rounds; gRPC handlers call
    in from the server's event loop and its accept threads. Handlers never block here: a worker's long poll
    asks `poll_task` and waits for the next change that `on_change` announces.

    A phase is a round attempt or an evaluation: tasks issued to workers, each answered (an update delivered, a
    report sent, or the task refused) or not by the phase's deadline."""

    def __init__(self, cfg: CoordinatorConfig, federation: Federation, registry: WorkerRegistry, metrics: Metrics):
        self.cfg = cfg
        self.federation = federation
        self.registry = registry
        self.metrics = metrics
        self.checkpoint_dir = Path(cfg.checkpoint_dir)
        self.state: State = "waiting_for_workers"
        self.failure = ""  # why the run stopped, in state "failed"
        self.checkpoints = CheckpointWriter(self.checkpoint_dir, metrics, federation.completed_rounds)
        self.evaluation = Evaluation(cfg, federation, metrics, self.checkpoints.append)
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # guards the state below; waits of the round loop
        self._arrivals = threading.Condition(lock)  # updates and reports in: wakes only the round loop
        self._listeners: list[Callable[[], object]] = []  # told of tasks issued and state changes
        self._round: OpenRound | None = None  # the phase in progress: a round attempt,
        self._eval: EvalPhase | None = None  # or an evaluation
        self._issued: dict[str, IssuedTask] = {}  # its tasks, by worker
        self._holder_instances: dict[str, str] = {}  # worker -> the process whose last download was counted (coded downloads)
        self._refusals: dict[str, Refusal] = {}  # of them, those their workers refused
        self._closed_task_ids: set[str] = set()  # tasks of phases that ended: their uploads are late
        self._failed_attempts = FailedAttempts(cfg.max_failed_attempts, cfg.round_deadline)
        self._training_seconds: dict[str, float] = {}  # the latest training time each worker reported (late ones too)
        self._told: set[str] = set()  # workers answered that the run failed
        self._stop = threading.Event()
        self._round_started = 0.0
        self._tally_at_start = federation.tally  # the checkpoint's; this process's counters add to it
        self._show_settings()
        if federation.completed_rounds:
            self._restore_from_round_log()

    def _show_settings(self) -> None:
        """The gauges of the run's settings and of the checkpoint it starts from."""
        self.metrics.min_workers.set(self.cfg.min_workers)
        self.metrics.rounds_planned.set(self.cfg.rounds)
        self.metrics.completed_rounds.set(self.federation.completed_rounds)
        self.metrics.show_run(self.federation.ledger, self.federation.tally)

    @property
    def last_fd(self) -> dict[str, float]:
        """The latest Frechet distance of each evaluated model."""
        return self.evaluation.last_fd

    # --- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self._stop.is_set() and not self.federation.finished:
                if not self._wait_for_workers():
                    break
                if self._run_round() and self.evaluation.due():
                    self._evaluate()
                if self.failure:
                    break
            if self.federation.finished:
                self._finish()
        except Exception:
            log.exception("round loop failed")
            raise
        finally:
            with self._cond:
                if self.state not in ("done", "failed"):
                    self.state = "stopped"
                self._changed()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._changed()
            self._arrivals.notify_all()

    def _wait_for_workers(self) -> bool:
        logged = False
        while not self._stop.is_set():
            connected = self.registry.connected()
            self.metrics.workers_connected.set(len(connected))
            if len(connected) >= self.cfg.min_workers:
                return True
            if not logged:
                log.info("waiting for workers: %d connected, %s", len(connected), settings.shown(self.cfg, "min_workers"))
                logged = True
            with self._cond:
                self.state = "waiting_for_workers"
                self._cond.wait(timeout=0.2)
        return False

    # --- one round attempt ----------------------------------------------------------------------------------
    def _run_round(self) -> bool:
        """One attempt at the next round; True when it closed (False: no quorum, not committed, or stopped)."""
        open_round, updates_before = self._open_round()
        with self._cond:
            self._await_answers(self._round_started + self.cfg.round_deadline)
            attempt = self._seal(open_round, updates_before)
            if self._stop.is_set():
                return False
            outcome, attempt = self._close(open_round, attempt) if attempt.has_quorum else (None, attempt)
        if outcome is None:
            self._attempt_failed(attempt)
            return False
        self._failed_attempts.reset()
        self._after_round(outcome)
        return True

    def _open_round(self) -> tuple[OpenRound, Mapping[str, int]]:
        """Plan the next round over the connected workers and issue its tasks; with the updates counted so far."""
        connected = self.registry.connected()
        lost = [r.worker_id for r in connected if not r.info.has_private_state]
        plan = self.federation.plan([r.worker_id for r in connected], lost_state=lost)
        with self._cond:
            open_round = self.federation.open_round(plan, {r.worker_id: r.info.num_examples for r in connected})
            self._count_lowered_weights(open_round)
            self._round = open_round
            updates_before = self.metrics.outcome_counts()[1]
            self._round_started = time.monotonic()
            self._open_phase(self._round_tasks(open_round, connected), "training")
        log.info("round %d: %d workers selected (attempt %d)", plan.round_index + 1, len(plan.clients), open_round.attempt)
        return open_round, updates_before

    def _round_tasks(self, open_round: OpenRound, connected: Sequence[WorkerRecord]) -> dict[str, IssuedTask]:
        """Each selected worker's task with its payload's header: one hash per distinct payload and digest."""
        digests = {r.worker_id: digest_for(r.info.digests) for r in connected}
        headers: dict[tuple[bytes, str], StreamHeader] = {}
        issued = {}
        for c in open_round.plan.clients:
            task = open_round.task(c)
            payload = open_round.payload_for(c)  # one object per distinct payload: its identity keys the hash
            key = (id(payload).to_bytes(8, "little"), digests[c])
            if key not in headers:
                headers[key] = StreamHeader.of(payload, digests[c])
            issued[c] = IssuedTask(task, headers[key])
        return issued

    def _count_lowered_weights(self, open_round: OpenRound) -> None:
        for worker_id, bounds in open_round.lowered.items():
            for bound in bounds:
                self.metrics.weights_bounded.labels(bound).inc()
            log.warning(
                "round %d: worker %s claims %d images; its FedAvg weight is %d (bounded by %s)",
                open_round.round_index + 1, worker_id, open_round.num_examples[worker_id], open_round.weights[worker_id], " and ".join(bounds),
            )  # fmt: skip

    def _seal(self, open_round: OpenRound, updates_before: Mapping[str, int]) -> Attempt:
        """End the attempt's collection (under the lock): no update is folded in after this one."""
        got = open_round.seal()
        attempt = Attempt(
            round_index=open_round.round_index,
            selected=len(open_round.plan.clients),
            got=got,
            needed=max(1, math.ceil(self.cfg.quorum * len(open_round.plan.clients))),
            refusals=list(self._refusals.values()),
            refused_updates=_refused_updates(updates_before, self.metrics.outcome_counts()[1]),
        )
        self._close_phase()
        self._round = None
        return attempt

    def _close(self, open_round: OpenRound, attempt: Attempt) -> tuple[RoundOutcome | None, Attempt]:
        """Average the attempt's updates into the global model; no outcome when the average is not finite
        (nothing is applied: the previous global model stays, and the round is run again), and the attempt
        then says why."""
        try:
            outcome = open_round.close()
        except NonFiniteAggregate as e:
            self.metrics.round_attempts.labels(e.reason).inc()
            log.error("round %d: not committed, the global model stays as it was (round re-run): %s", attempt.round_index + 1, e)
            return None, replace(attempt, non_finite=str(e))
        if attempt.got < attempt.selected:
            log.info("round %d: closed with %s", attempt.round_index + 1, attempt)
        self.metrics.round_attempts.labels("complete" if attempt.got == attempt.selected else "quorum").inc()
        return outcome, attempt

    def _attempt_failed(self, attempt: Attempt) -> None:
        """Count and checkpoint an attempt that did not close (it is part of the run's tally); stop the run when
        it makes `max_failed_attempts` of its round in a row that nothing could close (`FailedAttempts`)."""
        if not attempt.has_quorum:
            self.metrics.round_attempts.labels("no_quorum").inc()
            log.warning("round %d: %s: round re-run", attempt.round_index + 1, attempt)
        with self._cond:
            failure = self._failed_attempts.failed(attempt, dict(self._training_seconds))
        self._checkpoint()
        if failure:
            self._fail(failure)

    def _after_round(self, outcome: RoundOutcome) -> None:
        seconds = time.monotonic() - self._round_started
        self.metrics.round_duration.observe(seconds)
        self.metrics.completed_rounds.set(self.federation.completed_rounds)
        self.metrics.round_mean_loss.set(outcome.mean_loss)
        record = round_record(outcome, self.federation.ledger, seconds)
        self._checkpoint(record.as_json())
        log.info(format_round(record))

    def _checkpoint(self, record: Mapping[str, Any] | None = None) -> None:
        """Save the run: the global model, the round state and the tally of outcomes (the checkpoint's plus this
        process's counters), then `record` in the round log; the run gauges show these totals. A failed write
        is logged and retried (`CheckpointWriter`), the run goes on."""
        self.federation.tally = self._tally_at_start.plus(*self.metrics.outcome_counts())
        self.metrics.show_run(self.federation.ledger, self.federation.tally)
        self.checkpoints.checkpoint(self.federation, record)

    def _restore_from_round_log(self) -> None:
        """A resumed run's last round mean loss and latest Frechet distances, from the round log."""
        mean_loss, fds = latest_in_log(self.checkpoint_dir / ROUNDS_LOG, self.federation.completed_rounds)
        if mean_loss is not None:
            self.metrics.round_mean_loss.set(mean_loss)
        self.evaluation.show(fds)

    # --- a phase: its tasks issued, answered, ended ---------------------------------------------------------
    def _open_phase(self, issued: dict[str, IssuedTask], state: State) -> None:
        """Hand out a phase's tasks (under the lock; `_round` or `_eval` set): long polls hear of them."""
        self._issued = issued
        self._refusals = {}
        self.state = state
        self._changed()

    def _await_answers(self, deadline: float) -> None:
        """Wait (under the lock, released while waiting) until every task of the phase is answered, the
        deadline passes or the driver stops; the connected-workers gauge kept current meanwhile."""
        gauge_due = 0.0
        while not self._stop.is_set() and self._answered() < len(self._issued):
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

    def _close_phase(self) -> None:
        """End the phase (under the lock): what comes for its tasks from now on is late; its open uploads end."""
        self._closed_task_ids.update(t.task.task_id for t in self._issued.values())
        self._issued = {}
        self._changed()

    # --- evaluation -----------------------------------------------------------------------------------------
    def _evaluate(self) -> None:
        """The evaluation due after this round: the workers score their own models in an evaluate phase, or
        this coordinator scores the global model in the background."""
        if not self.evaluation.personalised:
            self.evaluation.score_global()
            return
        phase = self.evaluation.phase(self.registry.connected())
        if phase is not None:
            self._run_eval_phase(phase)
            self.evaluation.phase_done(phase)

    def _run_eval_phase(self, phase: EvalPhase) -> None:
        """Hand out the evaluate tasks and wait for the reports (or refusals), at most the round deadline."""
        with self._cond:
            self._eval = phase
            self._open_phase({w: IssuedTask(t, phase.header(w)) for w, t in phase.tasks.items()}, "evaluating")
            self._await_answers(time.monotonic() + self.cfg.round_deadline)
            self._close_phase()
            self._eval = None

    # --- the end --------------------------------------------------------------------------------------------
    def _fail(self, error: str) -> None:
        """Stop the run: its state becomes "failed"; waiting workers are told it is over, with the error."""
        log.error("run stopped: %s", error)
        with self._cond:
            self.failure = error
            self.state = "failed"
            self._changed()

    def wait_workers_told(self, stop: threading.Event, timeout: float) -> None:
        """After a failed run: wait until every connected worker has asked for a task and heard that the run
        failed (a worker backing off after a refusal asks late), at most `timeout` seconds or until `stop`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop.wait(0.1):
            with self._cond:
                if all(r.worker_id in self._told for r in self.registry.connected()):
                    return

    def _finish(self) -> None:
        self.evaluation.wait()
        error = self.checkpoints.finish(self.federation, self.cfg.final_save_timeout, self._stop)
        if error:
            self._fail(error)
            return
        with self._cond:
            self.state = "done"
            self._changed()
        ledger = self.federation.ledger
        log.info(
            "done: %d rounds, %d parameters exchanged, %.1f%% less than plain FedAvg; %.2f MB of payloads, %.1fx fewer bytes than plain FedAvg in float32",
            self.federation.completed_rounds,
            ledger.traffic.total,
            100 * ledger.reduction_vs_full,
            ledger.payload_bytes / 1e6,
            ledger.full_fedavg_fp32_bytes / max(ledger.payload_bytes, 1),
        )

    # --- called from gRPC handlers --------------------------------------------------------------------------
    def on_change(self, listener: Callable[[], object]) -> Callable[[], None]:
        """Call `listener` (from the thread that made the change, under the driver's lock: it must only
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

    def poll_task(self, worker_id: str) -> IssuedTask | Literal["done", "stopped"] | None:
        """This worker's open task of the phase in progress; "done" after the last round or once the run failed
        (`failure` says why), "stopped" once the driver stops; None while there is nothing for it (wait for the
        next change)."""
        with self._cond:
            if self.state == "failed":
                self._told.add(worker_id)
            if self.state in ("done", "failed"):
                return "done"
            issued = self._issued.get(worker_id)
            if issued is not None and not self._finished(worker_id):
                return issued
            return "stopped" if self._stop.is_set() else None

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

    def weights_for(self, worker_id: str, task_id: str) -> tuple[bytes, IssuedTask]:
        """The weights payload of this worker's task of the phase in progress, and the task."""
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
        self.metrics.count_transfer("down", event.traffic.down, event.bytes_down, event.full_fedavg)
        return event

    def upload_limit(self, worker_id: str, task_id: str, parts: frozenset[Part], round_index: int) -> int:
        """The largest update payload this worker may send for this task, after checking the task, its round
        (as the stream header states it) and the parts."""
        open_round, issued = self._current(worker_id, task_id)
        if worker_id in self._refusals:
            raise NotAssigned(f"worker {worker_id!r} refused task {task_id!r}")
        if worker_id in open_round.accepted:  # before a slot is taken or a byte is read
            raise DuplicateUpdate(f"worker {worker_id!r} already delivered its update for task {task_id!r}")
        if round_index != issued.task.payload_round:
            raise WrongRound(f"update header is for round {round_index}, task {task_id!r} belongs to round {issued.task.payload_round}")
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
        self.metrics.count_transfer("up", update.ledger.traffic.up, update.ledger.bytes_up, update.ledger.full_fedavg)
        for part, factor in update.clipped.items():
            self.metrics.clipped_updates.labels(part.value).inc()
            log.info("update of worker %s for task %s: %s scaled by %.3g to the clipping bound", worker_id, task_id, part.value, factor)
        if open_round.plan.assignment(worker_id).private:
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

    def joined(self, worker_id: str) -> None:
        """A worker joined (again). When it holds no private parts but its open task of the phase in progress
        counts on them (another installation took its identity over, or it lost its state and says so), it
        is never handed that task, which it could only fail: a training task is given again with the whole
        model, and an evaluate task is withdrawn (it has no model of its own to score)."""
        record = self.registry.record(worker_id)
        if record is not None and self.federation.shared is not None:
            self._holder_restarted(worker_id, record.info.instance_id)
        if record is None or record.info.has_private_state:
            return
        with self._cond:
            issued = self._issued.get(worker_id)
            if issued is None or self._finished(worker_id) or issued.task.private <= issued.task.receives:
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
            self.evaluation.save_shared_grid(report.worker_id, phase.completed_rounds, grid_png)

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
        ledger = self.federation.ledger
        return sum(ledger.bytes_down[p] for p in PART_ORDER), sum(ledger.bytes_up[p] for p in PART_ORDER)


def _refused_updates(before: Mapping[str, int], after: Mapping[str, int]) -> str:
    """The updates the coordinator refused between two readings of feddiff_updates_total, by outcome, in words
    ("bad_header 2, late 1", or "none"): not those accepted, those cut off on the way (aborted), nor tasks
    refused by their workers (rejected_*)."""
    counts = {o: n - before.get(o, 0) for o, n in sorted(after.items()) if o not in ("accepted", UploadAborted.reason) and not o.startswith("rejected_")}
    return ", ".join(f"{o} {n}" for o, n in counts.items() if n) or "none"
