"""A test per outcome label of feddiff_updates_total (coordinator.metrics.UPDATE_OUTCOMES) against a coordinator on
loopback: the refusals of malformed updates, one case each, are in tests/reliability/test_badinput.py (CASES,
and CODED_CASES for coded ones);
the others are here. Labels new in a version reach the run's tally that a checkpoint keeps and a resumed
coordinator shows."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from coordinator.config import CoordinatorConfig
from coordinator.metrics import UPDATE_MISSED, UPDATE_OUTCOMES, UPDATE_REFUSALS, Metrics
from coordinator.server import Coordinator
from fedcore import errors
from fedcore.federation import checkpoint
from fedcore.federation.client import TrainTask
from fedcore.model.unet import build_model, layout_of
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta
from fedcore.wire.convert import task_from_proto
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from tests.checkpoints import saved_run
from tests.reliability.test_badinput import CASES, CODED_CASES
from tests.system.raw_client import RawWorker, StalledUpload

LAYOUT = layout_of(build_model("tiny", seed=0))
CHUNK = 16 << 10
Code = grpc.StatusCode
# Labels tested here, each by the test named after it (a refusal of a malformed update: by test_badinput).
TESTED_HERE = {
    "accepted", "late", "aborted", "upload_in_progress", "duplicate",
    *(errors.rejected_outcome(r) for r in errors.REJECTION_REASONS),
}  # fmt: skip


@dataclass
class Round:
    coord: Coordinator
    worker: RawWorker
    task: TrainTask
    payload: bytes
    release: threading.Event  # set: stalled uploads end their side

    def count(self, outcome: str) -> float:
        return self.coord.metrics.registry.get_sample_value("feddiff_updates_total", {"outcome": outcome}) or 0.0

    def counts(self) -> dict[str, float]:
        """Every outcome counted so far."""
        return {o: self.count(o) for o in UPDATE_OUTCOMES if self.count(o)}

    def messages(self, count: int | None = None) -> list[pb.UpdateChunk]:
        """The worker's update: its header and data, or the first `count` messages of it."""
        msgs = list(self.worker.update_messages(self.task, self.payload, chunk_size=CHUNK))
        return msgs if count is None else msgs[:count]


@contextmanager
def _round(tmp_path: Path, silent: int = 1, **settings: Any) -> Iterator[Round]:
    """A round (tiny model, every part) of a worker whose task is taken, beside `silent` workers that never
    answer (the round stays open after the worker's update); the coordinator stopped after."""
    base: dict[str, Any] = {
        "model": "tiny", "strategy": "full", "rounds": 2, "epochs": 1, "min_workers": 1 + silent, "round_deadline": 30.0, "listen": "localhost:0",
        "metrics_port": -1, "insecure": True, "progress": "off", "checkpoint_dir": str(tmp_path / "ckpt"),
    }  # fmt: skip
    coord = Coordinator(CoordinatorConfig(**{**base, **settings}), Metrics()).start()
    release = threading.Event()  # ends the client side of stalled uploads
    try:
        with grpc.insecure_channel(coord.address) as channel:
            worker = RawWorker(channel, "w", 64, installation_id="inst-1", instance_id="proc-1")
            worker.join()
            for i in range(silent):
                RawWorker(channel, f"silent-{i}").join()
            task = task_from_proto(worker.wait_task())
            g = torch.Generator().manual_seed(1)
            delta = {n: torch.randn(s.shape, generator=g) * 1e-5 for n, s in LAYOUT.specs(task.returns).items()}
            payload = serialization.encode(delta, PayloadMeta(kind="delta", model="tiny", wire_round=task.round_index, parts=task.returns))
            yield Round(coord, worker, task, payload, release)
    finally:
        release.set()
        coord.stop(grace=0)


def _stall(r: Round, count: int = 4) -> StalledUpload:
    return StalledUpload(r.worker, r.messages(count), r.release)


def _wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- the catalogue ------------------------------------------------------------------------------------------
def test_every_outcome_label_has_a_test() -> None:
    by_badinput = {case.values[2] for case in CASES} | {case.values[3] for case in CODED_CASES}

    assert set(UPDATE_OUTCOMES) <= TESTED_HERE | by_badinput, set(UPDATE_OUTCOMES) - TESTED_HERE - by_badinput
    assert TESTED_HERE | by_badinput <= set(UPDATE_OUTCOMES)


def test_every_error_an_upload_can_end_with_has_its_label() -> None:
    """A new stream, payload or round error is either a refusal (its reason labels it) or a missed update."""

    def leaves(cls: type[errors.FeddiffError]) -> set[type[errors.FeddiffError]]:
        subs = cls.__subclasses__()
        return {cls} if not subs else set().union(*(leaves(s) for s in subs))

    kinds = leaves(errors.StreamError) | leaves(errors.PayloadError) | leaves(errors.RoundError)
    unlabelled = {k.__name__ for k in kinds if k not in UPDATE_REFUSALS and k.reason not in UPDATE_MISSED}
    assert not unlabelled


# --- one test per label -------------------------------------------------------------------------------------
def test_accepted(tmp_path: Path) -> None:
    with _round(tmp_path) as r:
        assert r.worker.upload_messages(r.messages(), timeout=10).outcome == "accepted"
        assert r.counts() == {"accepted": 1}


def test_duplicate(tmp_path: Path) -> None:
    with _round(tmp_path) as r:
        r.worker.upload_messages(r.messages(), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            r.worker.upload_messages(r.messages(), timeout=10)
        assert e.value.code() == Code.ALREADY_EXISTS
        assert r.counts() == {"accepted": 1, "duplicate": 1}


def test_late_when_the_round_closes_mid_stream(tmp_path: Path) -> None:
    with _round(tmp_path, round_deadline=1.5, quorum=0.01, upload_idle_timeout=60.0) as r:
        stalled = _stall(r)
        assert stalled.code(10) == Code.FAILED_PRECONDITION
        assert r.counts() == {"late": 1}


def test_upload_in_progress(tmp_path: Path) -> None:
    with _round(tmp_path) as r:
        first = _stall(r)
        _wait_for(lambda: first.stalled_at)
        with pytest.raises(grpc.RpcError) as e:
            r.worker.upload_messages(r.messages(), timeout=10)
        assert e.value.code() == Code.RESOURCE_EXHAUSTED
        assert "already has an upload in progress" in (e.value.details() or "")
        assert r.counts() == {"upload_in_progress": 1}
        assert not first.call.done()


def test_aborted_when_its_worker_cancels(tmp_path: Path) -> None:
    """The stream ends early when its call is cancelled: counted aborted, not refused as short (bad_size)."""
    with _round(tmp_path) as r:

        def cancel_one(aborted_after: int) -> None:
            stalled = _stall(r)
            _wait_for(lambda: stalled.stalled_at)
            time.sleep(0.1)
            stalled.call.cancel()
            _wait_for(lambda: sum(r.counts().values()) == aborted_after)

        for cancelled in range(1, 4):
            cancel_one(cancelled)
        assert r.counts() == {"aborted": 3}


def test_aborted_when_it_stalls(tmp_path: Path) -> None:
    with _round(tmp_path, upload_idle_timeout=0.5) as r:
        stalled = _stall(r)
        assert stalled.code(10) == Code.DEADLINE_EXCEEDED
        error = stalled.call.exception()
        assert isinstance(error, grpc.Call) and "upload_idle_timeout" in (error.details() or "")
        assert r.counts() == {"aborted": 1}
        assert r.worker.upload_messages(r.messages(), timeout=10).outcome == "accepted"  # the worker may send again


def test_aborted_when_its_worker_joins_again_and_uploads_anew(tmp_path: Path) -> None:
    """A worker whose connection broke mid-upload joins again (same installation) and uploads its update anew
    while the coordinator still holds the dead stream: the old stream is cut off, the new one goes in."""
    with _round(tmp_path, upload_idle_timeout=60.0) as r:
        old = _stall(r)
        _wait_for(lambda: old.stalled_at)
        r.worker.join()  # a new session; the old one has ended
        assert r.worker.upload_messages(r.messages(), timeout=10).outcome == "accepted"
        assert old.code(10) == Code.ABORTED
        assert r.counts() == {"aborted": 1, "accepted": 1}


@pytest.mark.parametrize("reason", [*sorted(errors.REJECTION_REASONS), "a-newer-reason"])
def test_rejected(reason: str, tmp_path: Path) -> None:
    with _round(tmp_path) as r:
        r.worker.stub.RejectTask(pb.RejectTaskRequest(session_id=r.worker.session_id, task_id=r.task.task_id, reason=reason, message="no"), timeout=10)
        assert r.counts() == {errors.rejected_outcome(reason): 1}


# --- into the run's tally ----------------------------------------------------------------------------------
def test_new_labels_reach_the_checkpointed_tally_and_come_back_on_resume(tmp_path: Path) -> None:
    with _round(tmp_path, silent=0, rounds=2, upload_idle_timeout=0.5) as r:
        first = _stall(r)
        _wait_for(lambda: first.stalled_at)
        with pytest.raises(grpc.RpcError):
            r.worker.upload_messages(r.messages(), timeout=10)  # upload_in_progress
        assert first.code(10) == Code.DEADLINE_EXCEEDED  # aborted
        r.worker.upload_messages(r.messages(), timeout=10)  # accepted: round 1 closes and is checkpointed
        _wait_for(lambda: (saved := checkpoint.load_run(tmp_path / "ckpt")) is not None and saved[1].completed_rounds == 1)
    tally = saved_run(tmp_path / "ckpt")[1].tally
    assert tally.updates == {"accepted": 1, "aborted": 1, "upload_in_progress": 1}

    cfg = CoordinatorConfig(
        model="tiny", strategy="full", rounds=2, epochs=1, min_workers=5, listen="localhost:0", metrics_port=-1,
        insecure=True, progress="off", checkpoint_dir=str(tmp_path / "ckpt"), resume=True,
    )  # fmt: skip
    resumed = Coordinator(cfg, Metrics()).start()
    try:
        run = {o: resumed.metrics.registry.get_sample_value("feddiff_run_updates", {"outcome": o}) for o in ("accepted", "aborted", "upload_in_progress")}
    finally:
        resumed.stop(grace=0)
    assert run == {"accepted": 1, "aborted": 1, "upload_in_progress": 1}
