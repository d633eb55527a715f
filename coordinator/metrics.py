"""The coordinator's Prometheus metrics: rounds, workers, refusals, bounded FedAvg weights and clipped updates, and the
run's committed totals, besides the metrics both processes keep (service.metrics).

Counters (`*_total`) count what this process did since it started, and restart at zero with it, as
Prometheus's rate() and increase() expect. The run as a whole, which a resumed coordinator continues, is
described by the `feddiff_run_*` gauges: the totals of its last checkpoint, restored with it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedcore import errors
from fedcore.federation.robust import WEIGHT_BOUNDS
from fedcore.model.parts import PART_ORDER
from service.metrics import ProcessMetrics

if TYPE_CHECKING:
    from fedcore.federation.totals import Ledger, Tally

ROUND_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600, float("inf"))
ROUND_ATTEMPT_OUTCOMES = ("complete", "quorum", "no_quorum", "non_finite")
# The outcomes of feddiff_updates_total at the coordinator, each tested (tests/system/test_update_outcomes.py):
# an update folded in; one that did not arrive, which is no refusal (a straggler behind its round's close, a
# stream cut off: its connection gone, stalled, or replaced by a newer session); each refusal, labelled with
# its error's reason; and each reason a worker gave for refusing its task (RejectTask).
UPDATE_ARRIVED = ("accepted",)
UPDATE_MISSED: tuple[str, ...] = (errors.LateUpdate.reason, errors.UploadAborted.reason)
UPDATE_REFUSALS: tuple[type[errors.FeddiffError], ...] = (
    errors.UnknownWorker,
    errors.HeaderError,
    errors.StreamTooLong,
    errors.UploadInProgress,
    errors.SizeMismatch,
    errors.HashMismatch,
    errors.NotSafetensors,
    errors.SchemaError,
    errors.NonFiniteTensor,
    errors.ValueOutOfBounds,
    errors.CodecSpecError,
    errors.BadScale,
    errors.CodeOutOfRange,
    errors.BadIndices,
    errors.WrongRound,
    errors.NotAssigned,
    errors.DuplicateUpdate,
)
UPDATE_OUTCOMES = (
    *UPDATE_ARRIVED,
    *UPDATE_MISSED,
    *(e.reason for e in UPDATE_REFUSALS),
    *(errors.rejected_outcome(r) for r in sorted(errors.REJECTION_REASONS)),
)


class Metrics(ProcessMetrics):
    """The coordinator's metrics in their own registry (a fresh one per test, the process's one in a server)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        super().__init__(registry)
        self._count_rounds()
        self._count_workers()
        self._run_totals()
        self._count_checkpoints()

    def _count_rounds(self) -> None:
        """The rounds: how far the run is, how long each took, how each attempt ended, the last mean loss."""
        r = self.registry
        self.completed_rounds = Gauge("feddiff_round", "Rounds completed", registry=r)
        self.rounds_planned = Gauge("feddiff_rounds_planned", "Rounds the run is configured for", registry=r)
        self.round_duration = Histogram("feddiff_round_duration_seconds", "Wall time of a round", buckets=ROUND_SECONDS_BUCKETS, registry=r)
        self.round_attempts = Counter(
            "feddiff_round_attempts",
            "How round attempts ended: complete (every update in), quorum (closed at the deadline), no_quorum (re-run), "
            "non_finite (its mean update would have made the model NaN or infinite: re-run)",
            ["outcome"],
            registry=r,
        )
        self.round_mean_loss = Gauge("feddiff_round_mean_loss", "Mean local loss of the last round", registry=r)
        for outcome in ROUND_ATTEMPT_OUTCOMES:
            self.round_attempts.labels(outcome)

    def _count_checkpoints(self) -> None:
        """The writes to the checkpoint dir: how each ended, and whether something is held unwritten."""
        r = self.registry
        self.checkpoint_saves = Counter(
            "feddiff_checkpoint_saves", "Writes of a checkpoint or the final model, by outcome (saved, failed: retried with backoff)", ["outcome"], registry=r
        )
        for outcome in ("saved", "failed"):
            self.checkpoint_saves.labels(outcome)
        self.checkpoint_unsaved = Gauge(
            "feddiff_checkpoint_unsaved", "1 while a checkpoint, round log line or the final model is held in memory, not yet written", registry=r
        )

    def _count_workers(self) -> None:
        """The workers: how many are connected, their refused calls, bounded FedAvg weights and clipped updates."""
        r = self.registry
        self.workers_connected = Gauge("feddiff_workers_connected", "Workers with a live session", registry=r)
        self.min_workers = Gauge("feddiff_min_workers", "Workers needed to start a round", registry=r)
        self.refusals = Counter(
            "feddiff_refusals",
            "Calls other than joins and uploads refused with a status code, by RPC and reason (e.g. an ended session)",
            ["rpc", "outcome"],
            registry=r,
        )
        self.fedavg_weights_bounded = Counter(
            "feddiff_weights_bounded",
            "Workers whose FedAvg weight in a round attempt a bound lowered below the images they claimed, by bound (registered, share)",
            ["bound"],
            registry=r,
        )
        self.clipped_updates = Counter("feddiff_clipped_updates", "Accepted updates that norm clipping scaled down, by part", ["part"], registry=r)
        for bound in WEIGHT_BOUNDS:
            self.fedavg_weights_bounded.labels(bound)

    def _run_totals(self) -> None:
        """The run's committed totals: the last checkpoint's, restored with --resume (`show_run`)."""
        r = self.registry
        self.run_payload_bytes = Gauge(
            "feddiff_run_payload_bytes", "Safetensors payload bytes of the run's committed rounds", ["direction", "part"], registry=r
        )
        self.run_parameters = Gauge("feddiff_run_parameters", "Parameters exchanged in the run's committed rounds", ["direction", "part"], registry=r)
        self.run_full_fedavg_parameters = Gauge(
            "feddiff_run_full_fedavg_parameters",
            "Parameters plain FedAvg would have exchanged in the run's committed rounds",
            registry=r,
        )
        self.run_round_attempts = Gauge("feddiff_run_round_attempts", "The run's round attempts up to its last checkpoint, by outcome", ["outcome"], registry=r)
        self.run_updates = Gauge("feddiff_run_updates", "The run's updates up to its last checkpoint, by outcome", ["outcome"], registry=r)

    def outcome_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """This process's round attempts and updates by outcome, as its counters hold them."""
        return _by_outcome(self.round_attempts), _by_outcome(self.updates)

    def show_run(self, ledger: Ledger, tally: Tally) -> None:
        """Set the run gauges to a checkpoint's totals."""
        for d, params, nbytes in (("down", ledger.traffic.down, ledger.bytes_down), ("up", ledger.traffic.up, ledger.bytes_up)):
            for p in PART_ORDER:
                self.run_parameters.labels(d, p.value).set(params[p])
                self.run_payload_bytes.labels(d, p.value).set(nbytes[p])
        self.run_full_fedavg_parameters.set(ledger.full_fedavg)
        for outcome in (*ROUND_ATTEMPT_OUTCOMES, *tally.round_attempts):
            self.run_round_attempts.labels(outcome).set(tally.round_attempts.get(outcome, 0))
        for outcome, n in tally.updates.items():
            self.run_updates.labels(outcome).set(n)


def _by_outcome(counter: Counter) -> dict[str, int]:
    return {s.labels["outcome"]: int(s.value) for m in counter.collect() for s in m.samples if s.name.endswith("_total")}
