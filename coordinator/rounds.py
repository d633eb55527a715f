"""The round loop: wait for workers, plan, open a round attempt (coordinator/phase.py: its tasks handed out and
answered), close it with quorum, checkpoint; then the evaluation that is due (coordinator/evaluation.py), its
evaluate tasks handed out and answered alike."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from coordinator.attempts import Attempt, FailedAttempts
from coordinator.checkpoints import CheckpointWriter
from coordinator.config import CoordinatorConfig
from coordinator.evaluation import EvalPhase, Evaluation
from coordinator.metrics import Metrics
from coordinator.phase import IssuedTask, Phase, State
from coordinator.registry import WorkerRecord, WorkerRegistry
from fedcore.errors import NonFiniteAggregate, UploadAborted
from fedcore.federation.engine import Federation, OpenRound, RoundOutcome
from fedcore.federation.roundlog import ROUNDS_LOG, RoundRecord, format_round, latest_in_log, round_record
from fedcore.wire.stream import StreamHeader, digest_for
from service import flags

log = logging.getLogger("feddiff.coordinator")


class RoundDriver:
    """Owns the federation's progress. `run` is the one loop that opens and closes rounds; each phase (a round
    attempt or an evaluation) is opened, awaited and closed on `phase`, which the gRPC handlers call into."""

    def __init__(self, cfg: CoordinatorConfig, federation: Federation, registry: WorkerRegistry, metrics: Metrics):
        self.cfg = cfg
        self.federation = federation
        self.registry = registry
        self.metrics = metrics
        self.checkpoint_dir = Path(cfg.checkpoint_dir)
        self.checkpoints = CheckpointWriter(self.checkpoint_dir, metrics, federation.completed_rounds)
        self.evaluation = Evaluation(cfg, federation, metrics, self.checkpoints.append)
        self._stop = threading.Event()
        self.phase = Phase(federation, registry, metrics, self._stop, self.evaluation.save_shared_grid)
        self._failed_attempts = FailedAttempts(cfg.max_failed_attempts, cfg.round_deadline)
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
    def state(self) -> State:
        """The run's state (`Phase.state`)."""
        return self.phase.state

    @property
    def failure(self) -> str:
        """Why the run stopped, in state "failed" (`Phase.failure`)."""
        return self.phase.failure

    @property
    def last_fd(self) -> dict[str, float]:
        """The latest Frechet distance of each evaluated model."""
        return self.evaluation.last_fd

    # --- the loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        """The round loop, until the last round is saved, the run fails or `stop` is called."""
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
            self.phase.ended()

    def stop(self) -> None:
        """End the round loop: the phase in progress stops waiting, and long polls hear STOPPED."""
        self._stop.set()
        self.phase.wake()

    def _wait_for_workers(self) -> bool:
        logged = False
        while not self._stop.is_set():
            connected = self.registry.connected()
            self.metrics.workers_connected.set(len(connected))
            if len(connected) >= self.cfg.min_workers:
                return True
            if not logged:
                log.info("waiting for workers: %d connected, %s", len(connected), flags.shown(self.cfg, "min_workers"))
                logged = True
            self.phase.wait_for_workers(timeout=0.2)
        return False

    # --- one round attempt ----------------------------------------------------------------------------------
    def _run_round(self) -> bool:
        """One attempt at the next round; True when it closed (False: no quorum, not committed, or stopped)."""
        open_round, updates_before = self._open_round()
        with self.phase.lock:  # no handler call between the end of the answers and the round's close
            self.phase.await_answers(self._round_started + self.cfg.round_deadline, quorum=self._quorum(open_round))
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
        with self.phase.lock:
            open_round = self.federation.open_round(plan, {r.worker_id: r.info.num_examples for r in connected})
            self._count_lowered_fedavg_weights(open_round)
            updates_before = self.metrics.outcome_counts()[1]
            self._round_started = time.monotonic()
            self.phase.open_round(open_round, self._round_tasks(open_round, connected))
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

    def _count_lowered_fedavg_weights(self, open_round: OpenRound) -> None:
        for worker_id, bounds in open_round.lowered.items():
            for bound in bounds:
                self.metrics.fedavg_weights_bounded.labels(bound).inc()
            log.warning(
                "round %d: worker %s claims %d images; its FedAvg weight is %d (bounded by %s)",
                open_round.round_index + 1, worker_id, open_round.num_examples[worker_id], open_round.fedavg_weights[worker_id], " and ".join(bounds),
            )  # fmt: skip

    def _seal(self, open_round: OpenRound, updates_before: Mapping[str, int]) -> Attempt:
        """End the attempt's collection (under the phase's lock): no update is folded in after this one."""
        got = open_round.seal()
        attempt = Attempt(
            round_index=open_round.round_index,
            selected=len(open_round.plan.clients),
            got=got,
            needed=self._quorum(open_round),
            refusals=self.phase.refusals(),
            refused_updates=_refused_updates(updates_before, self.metrics.outcome_counts()[1]),
        )
        self.phase.close()
        return attempt

    def _quorum(self, open_round: OpenRound) -> int:
        """The updates an attempt needs to close: `quorum` of the workers selected, at least one."""
        return max(1, math.ceil(self.cfg.quorum * len(open_round.plan.clients)))

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
        with self.phase.lock:
            failure = self._failed_attempts.failed(attempt, self.phase.training_seconds())
        self._checkpoint()
        if failure:
            self._fail(failure)

    def _after_round(self, outcome: RoundOutcome) -> None:
        seconds = time.monotonic() - self._round_started
        self.metrics.round_duration.observe(seconds)
        self.metrics.completed_rounds.set(self.federation.completed_rounds)
        self.metrics.round_mean_loss.set(outcome.mean_loss)
        record = round_record(outcome, self.federation.ledger, seconds)
        self._checkpoint(record)
        log.info(format_round(record))

    def _checkpoint(self, record: RoundRecord | None = None) -> None:
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

    # --- evaluation -----------------------------------------------------------------------------------------
    def _evaluate(self) -> None:
        """The evaluation due after this round: the workers score their own models in an evaluate phase, or
        this coordinator scores the global model in the background."""
        if not self.evaluation.personalised:
            self.evaluation.score_global()
            return
        eval_phase = self.evaluation.phase(self.registry.connected())
        if eval_phase is not None:
            self._run_eval_phase(eval_phase)
            self.evaluation.phase_done(eval_phase)

    def _run_eval_phase(self, eval_phase: EvalPhase) -> None:
        """Hand out the evaluate tasks and wait for the reports (or refusals), at most the round deadline."""
        with self.phase.lock:
            self.phase.open_evaluation(eval_phase)
            self.phase.await_answers(time.monotonic() + self.cfg.round_deadline)
            self.phase.close()

    # --- the end --------------------------------------------------------------------------------------------
    def _fail(self, error: str) -> None:
        """Stop the run: its state becomes "failed"; waiting workers are told it is over, with the error."""
        log.error("run stopped: %s", error)
        self.phase.fail(error)

    def wait_workers_told(self, stop: threading.Event, timeout: float) -> None:
        """After a failed run: wait until every connected worker has asked for a task and heard that the run
        failed (a worker backing off after a refusal asks late), at most `timeout` seconds or until `stop`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop.wait(0.1):
            if self.phase.all_told():
                return

    def _finish(self) -> None:
        self.evaluation.wait()
        error = self.checkpoints.finish(self.federation, self.cfg.final_save_timeout, self._stop)
        if error:
            self._fail(error)
            return
        self.phase.done()
        ledger = self.federation.ledger
        log.info(
            "done: %d rounds, %d parameters exchanged, %.1f%% less than plain FedAvg; %.2f MB of payloads, %.1fx fewer bytes than plain FedAvg in float32",
            self.federation.completed_rounds,
            ledger.traffic.total,
            100 * ledger.reduction_vs_full,
            ledger.payload_bytes / 1e6,
            ledger.full_fedavg_fp32_bytes / max(ledger.payload_bytes, 1),
        )


def _refused_updates(before: Mapping[str, int], after: Mapping[str, int]) -> str:
    """The updates the coordinator refused between two readings of feddiff_updates_total, by outcome, in words
    ("bad_header 2, late 1", or "none"): not those accepted, those cut off on the way (aborted), nor tasks
    refused by their workers (rejected_*)."""
    counts = {o: n - before.get(o, 0) for o, n in sorted(after.items()) if o not in ("accepted", UploadAborted.reason) and not o.startswith("rejected_")}
    return ", ".join(f"{o} {n}" for o, n in counts.items() if n) or "none"
