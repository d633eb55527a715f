"""Tests for coordinator.metrics: the run gauges show a checkpoint's totals; the counters give this process's."""

from __future__ import annotations

from coordinator.metrics import Metrics
from fedcore.federation.strategies import Traffic
from fedcore.federation.totals import Ledger, Tally
from fedcore.model.parts import Part


def _ledger() -> Ledger:
    zero = dict.fromkeys(Part, 0)
    return Ledger(
        traffic=Traffic(down={**zero, Part.DECODER: 300, Part.ENCODER: 50}, up={**zero, Part.DECODER: 200}),
        full_fedavg=1000,
        bytes_down={**zero, Part.DECODER: 1300, Part.ENCODER: 250},
        bytes_up={**zero, Part.DECODER: 900},
    )


def test_show_run_sets_every_run_gauge() -> None:
    metrics = Metrics()
    value = metrics.registry.get_sample_value

    metrics.show_run(_ledger(), Tally({"complete": 2, "no_quorum": 1}, {"accepted": 5, "bad_hash": 1}))

    assert value("feddiff_run_parameters", {"direction": "down", "part": "decoder"}) == 300
    assert value("feddiff_run_parameters", {"direction": "down", "part": "encoder"}) == 50
    assert value("feddiff_run_parameters", {"direction": "up", "part": "bottleneck"}) == 0
    assert value("feddiff_run_payload_bytes", {"direction": "up", "part": "decoder"}) == 900
    assert value("feddiff_run_full_fedavg_parameters") == 1000
    assert value("feddiff_run_round_attempts", {"outcome": "complete"}) == 2
    assert value("feddiff_run_round_attempts", {"outcome": "quorum"}) == 0
    assert value("feddiff_run_updates", {"outcome": "bad_hash"}) == 1
    assert value("feddiff_parameters_total", {"direction": "down", "part": "decoder"}) == 0, "counters untouched"


def test_outcome_counts_read_this_process_counters() -> None:
    metrics = Metrics()
    metrics.round_attempts.labels("complete").inc()
    metrics.updates.labels("accepted").inc(3)
    metrics.updates.labels("late").inc()

    attempts, updates = metrics.outcome_counts()

    assert attempts == {"complete": 1, "quorum": 0, "no_quorum": 0, "non_finite": 0}
    assert updates == {"accepted": 3, "late": 1}
