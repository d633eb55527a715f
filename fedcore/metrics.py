"""Prometheus metrics of both sides: communication volume by direction and part, rounds, workers, training.

Counters (`*_total`) count what this process did since it started, and restart at zero with it, as
Prometheus's rate() and increase() expect. The run as a whole, which a resumed coordinator continues, is
described by the `feddiff_run_*` gauges: the totals of its last checkpoint, restored with it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedcore import errors, ports
from fedcore.model.parts import PART_ORDER, Part

if TYPE_CHECKING:
    from fedcore.federation.server import Ledger, Tally

ROUND_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600, float("inf"))
ROUND_ATTEMPT_OUTCOMES = ("complete", "quorum", "no_quorum", "non_finite")
WEIGHT_BOUNDS = ("registered", "share")  # what lowered a worker's FedAvg weight (fedcore.federation.robust)
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


class Metrics:
    """One set of feddiff metrics in its own registry (a fresh one per test, the process's one in a server)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.payload_bytes = Counter(
            "feddiff_payload_bytes", "Safetensors payload bytes exchanged", ["direction", "part"], registry=r
        )
        self.wire_bytes = Counter(
            "feddiff_wire_bytes", "Bytes of weight-stream messages sent or received", ["direction"], registry=r
        )
        self.parameters = Counter(
            "feddiff_parameters", "Parameters (float32 values) exchanged", ["direction", "part"], registry=r
        )
        self.full_fedavg_parameters = Counter(
            "feddiff_full_fedavg_parameters",
            "Parameters plain FedAvg would have exchanged for the same rounds and participants",
            registry=r,
        )
        self.round = Gauge("feddiff_round", "Rounds completed", registry=r)
        self.rounds_planned = Gauge("feddiff_rounds_planned", "Rounds the run is configured for", registry=r)
        self.round_duration = Histogram(
            "feddiff_round_duration_seconds", "Wall time of a round", buckets=ROUND_SECONDS_BUCKETS, registry=r
        )
        self.round_attempts = Counter(
            "feddiff_round_attempts",
            "How round attempts ended: complete (every update in), quorum (closed at the deadline), no_quorum (re-run), "
            "non_finite (its mean update would have made the model NaN or infinite: re-run)",
            ["outcome"],
            registry=r,
        )
        self.workers_connected = Gauge("feddiff_workers_connected", "Workers with a live session", registry=r)
        self.min_workers = Gauge("feddiff_min_workers", "Workers needed to start a round", registry=r)
        self.updates = Counter("feddiff_updates", "Updates by outcome (accepted, late, or the refusal reason)", ["outcome"], registry=r)
        self.joins = Counter("feddiff_joins", "Joins by outcome (accepted, or the refusal reason)", ["outcome"], registry=r)
        self.refusals = Counter(
            "feddiff_refusals",
            "Calls other than joins and uploads refused with a status code, by RPC and reason (e.g. an ended session)",
            ["rpc", "outcome"],
            registry=r,
        )
        self.weights_bounded = Counter(
            "feddiff_weights_bounded",
            "Workers whose FedAvg weight in a round attempt a bound lowered below the images they claimed, by bound (registered, share)",
            ["bound"],
            registry=r,
        )
        self.clipped_updates = Counter(
            "feddiff_clipped_updates", "Accepted updates that norm clipping scaled down, by part", ["part"], registry=r
        )
        self.round_mean_loss = Gauge("feddiff_round_mean_loss", "Mean local loss of the last round", registry=r)
        self.local_loss = Gauge("feddiff_local_loss", "Mean loss of this worker's last local training", registry=r)
        self.train_images = Counter("feddiff_train_images", "Images this worker trained on", registry=r)
        self.train_images_per_second = Gauge(
            "feddiff_train_images_per_second", "Training throughput of this worker's last round", registry=r
        )
        self.private_state_unsaved = Gauge(
            "feddiff_private_state_unsaved",
            "1 while this worker's newest private parts are held in memory only (a save to its state dir failed; retried)",
            registry=r,
        )
        self.state_saves = Counter(
            "feddiff_state_saves", "Saves of this worker's private parts to its state dir, by outcome (saved, failed)", ["outcome"], registry=r
        )
        self.fd = Gauge("feddiff_fd", "Frechet distance of a model's samples to real images", ["model"], registry=r)
        # The run's committed totals (coordinator): the last checkpoint's, restored with --resume.
        self.run_payload_bytes = Gauge(
            "feddiff_run_payload_bytes", "Safetensors payload bytes of the run's committed rounds", ["direction", "part"], registry=r
        )
        self.run_parameters = Gauge(
            "feddiff_run_parameters", "Parameters exchanged in the run's committed rounds", ["direction", "part"], registry=r
        )
        self.run_full_fedavg_parameters = Gauge(
            "feddiff_run_full_fedavg_parameters",
            "Parameters plain FedAvg would have exchanged in the run's committed rounds",
            registry=r,
        )
        self.run_round_attempts = Gauge(
            "feddiff_run_round_attempts", "The run's round attempts up to its last checkpoint, by outcome", ["outcome"], registry=r
        )
        self.run_updates = Gauge("feddiff_run_updates", "The run's updates up to its last checkpoint, by outcome", ["outcome"], registry=r)
        for p in PART_ORDER:  # export zeros so dashboards and recording rules see every series from the start
            for d in ("down", "up"):
                self.payload_bytes.labels(d, p.value)
                self.parameters.labels(d, p.value)
        for d in ("down", "up"):
            self.wire_bytes.labels(d)
        for outcome in ROUND_ATTEMPT_OUTCOMES:
            self.round_attempts.labels(outcome)
        for outcome in ("accepted", "bad_worker_info", "unauthenticated", "duplicate_worker"):
            self.joins.labels(outcome)
        for bound in WEIGHT_BOUNDS:
            self.weights_bounded.labels(bound)
        for outcome in ("saved", "failed"):
            self.state_saves.labels(outcome)

    def count_transfer(self, direction: str, parameters: Mapping[Part, int], payload_bytes: Mapping[Part, int], full_fedavg: int) -> None:
        for p in PART_ORDER:
            if parameters.get(p):
                self.parameters.labels(direction, p.value).inc(parameters[p])
            if payload_bytes.get(p):
                self.payload_bytes.labels(direction, p.value).inc(payload_bytes[p])
        self.full_fedavg_parameters.inc(full_fedavg)

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

    def serve(self, port: int, addr: str = "0.0.0.0", flag: str = "--metrics-port") -> int:
        """Expose /metrics over HTTP; returns the bound port (port 0 picks a free one). CannotListen, naming
        `flag`, when the port is taken."""
        try:
            server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise ports.refusal(flag, f"{addr}:{port}", e) from None
        return int(server.server_port)


def _by_outcome(counter: Counter) -> dict[str, int]:
    return {s.labels["outcome"]: int(s.value) for m in counter.collect() for s in m.samples if s.name.endswith("_total")}
