"""The run's tally of outcomes across a restart: a round attempt without quorum and a refused update are
checkpointed when the attempt ends, and a resumed coordinator's run gauges start from them while its counters
start from zero."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator
from fedcore.federation import checkpoint
from fedcore.federation.totals import Tally
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from tests.system.raw_client import RawWorker

DEADLINE = 1.0


def _coordinator(tmp_path: Path, *, resume: bool) -> tuple[Coordinator, Metrics]:
    cfg = CoordinatorConfig(
        model="tiny", strategy="udec", rounds=2, epochs=1, min_workers=1, quorum=1.0, round_deadline=DEADLINE,
        listen="localhost:0", metrics_port=-1, insecure=True, progress="off", checkpoint_dir=str(tmp_path), resume=resume,
    )  # fmt: skip
    metrics = Metrics()
    return Coordinator(cfg, metrics).start(), metrics


def _tally(tmp_path: Path) -> Tally:
    saved = checkpoint.load_run(tmp_path)
    return saved[1].tally if saved is not None else Tally()


def _run_gauges(metrics: Metrics) -> dict[str, dict[str, float | None]]:
    value = metrics.registry.get_sample_value
    return {
        "round_attempts": {o: value("feddiff_run_round_attempts", {"outcome": o}) for o in ("complete", "quorum", "no_quorum")},
        "updates": {"bad_header": value("feddiff_run_updates", {"outcome": "bad_header"})},
    }


def test_attempts_without_quorum_and_refusals_survive_a_restart(tmp_path: Path) -> None:
    first, metrics = _coordinator(tmp_path, resume=False)
    try:
        with grpc.insecure_channel(first.address) as channel:
            worker = RawWorker(channel, "silent")  # joins, takes its task, never uploads
            worker.join()
            worker.wait_task()
            with pytest.raises(grpc.RpcError) as refused:
                worker.upload_messages([pb.UpdateChunk(data=b"no header first")], timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            deadline = time.monotonic() + 30
            while _tally(tmp_path).round_attempts.get("no_quorum", 0) < 1:
                assert time.monotonic() < deadline, "no attempt without quorum was checkpointed"
                time.sleep(0.05)
    finally:
        first.stop(grace=0)
    tally = _tally(tmp_path)
    attempts = tally.round_attempts["no_quorum"]
    before = _run_gauges(metrics)

    resumed, fresh = _coordinator(tmp_path, resume=True)
    try:
        after = _run_gauges(fresh)
        counted = fresh.outcome_counts()
    finally:
        resumed.stop(grace=0)

    assert tally == Tally({"complete": 0, "no_quorum": attempts, "non_finite": 0, "quorum": 0}, {"bad_header": 1})
    assert before == after == {"round_attempts": {"complete": 0, "quorum": 0, "no_quorum": attempts}, "updates": {"bad_header": 1}}
    assert metrics.registry.get_sample_value("feddiff_round_attempts_total", {"outcome": "no_quorum"}) == attempts
    assert counted == ({"complete": 0, "quorum": 0, "no_quorum": 0, "non_finite": 0}, {}), "the resumed process's counters start at zero"
