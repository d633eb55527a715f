"""Tasks refused by their workers (RejectTask), against a real coordinator: counted by reason, not given to
the same worker again in the attempt, an attempt that every worker answered ends at once, and a round that
refusals fail `max_refused_attempts` times in a row for one reason stops the run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.refusals import MAX_MESSAGE, Refusal, RefusalStreak
from coordinator.server import Coordinator
from fedcore.model.unet import build_model, layout_of
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta
from fedcore.wire.convert import task_from_proto
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from feddiff.cli import main
from tests.system.raw_client import RawWorker

DEADLINE = 60.0  # far longer than any of these tests: an attempt that ends does so because every worker answered
LAYOUT = layout_of(build_model("tiny", seed=0))
Code = grpc.StatusCode


@contextmanager
def _coordinator(tmp_path: Path, **settings: Any) -> Iterator[tuple[Coordinator, grpc.Channel]]:
    base: dict[str, Any] = {
        "model": "tiny", "strategy": "udec", "rounds": 1, "min_workers": 2, "quorum": 1.0, "round_deadline": DEADLINE, "max_refused_attempts": 3,
        "listen": "localhost:0", "metrics_port": -1, "insecure": True, "progress": "off", "checkpoint_dir": str(tmp_path / "ckpt"),
    }  # fmt: skip
    coord = Coordinator(CoordinatorConfig(**{**base, **settings}), Metrics()).start()
    try:
        with grpc.insecure_channel(coord.address) as channel:
            yield coord, channel
    finally:
        coord.stop(grace=0)


def _joined(channel: grpc.Channel, *names: str) -> list[RawWorker]:
    workers = [RawWorker(channel, name) for name in names]
    for w in workers:
        w.join()
    return workers


def _reject(worker: RawWorker, task_id: str, reason: str = "out_of_range", message: str = "lr = 10000.0: expected a number in (0, 1)") -> None:
    worker.stub.RejectTask(pb.RejectTaskRequest(session_id=worker.session_id, task_id=task_id, reason=reason, message=message), timeout=10)


def _poll(worker: RawWorker, timeout: float) -> pb.WaitTaskResponse:
    return worker.stub.WaitTask(pb.WaitTaskRequest(session_id=worker.session_id, timeout_ms=int(timeout * 1000)), timeout=timeout + 10)


def _refused(coord: Coordinator, reason: str) -> float:
    return coord.metrics.registry.get_sample_value("feddiff_updates_total", {"outcome": f"rejected_{reason}"}) or 0.0


def _attempts(coord: Coordinator, outcome: str) -> float:
    return coord.metrics.registry.get_sample_value("feddiff_round_attempts_total", {"outcome": outcome}) or 0.0


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_refused_task_is_counted_and_not_given_again_in_the_attempt(tmp_path: Path) -> None:
    with _coordinator(tmp_path) as (coord, channel):
        a, b = _joined(channel, "a", "b")
        task = a.wait_task()
        b.wait_task()

        _reject(a, task.task_id)

        assert _refused(coord, "out_of_range") == 1
        assert _poll(a, 0.5).WhichOneof("outcome") == "idle"  # the same task is not handed out again
        assert coord.driver.progress().round_number == 1 and _attempts(coord, "no_quorum") == 0  # b has not answered yet


def test_an_attempt_every_worker_answered_ends_at_once_and_refusals_stop_the_run_after_n(tmp_path: Path, capsys) -> None:
    with _coordinator(tmp_path) as (coord, channel):
        a, b = _joined(channel, "a", "b")
        start = time.monotonic()
        for attempt in (1, 2, 3):
            ta, tb = a.wait_task(), b.wait_task()
            assert ta.task_id == f"r0.{attempt}-a"
            _reject(a, ta.task_id)
            _reject(b, tb.task_id, message="lr out of range")
            _wait(lambda attempt=attempt: _attempts(coord, "no_quorum") == attempt)

        assert time.monotonic() - start < DEADLINE / 2, "the attempts ended when both workers had refused, not at the deadline"
        _wait(lambda: coord.driver.state == "failed")
        assert _refused(coord, "out_of_range") == 6
        done = _poll(a, 5).done
        assert done.error.startswith("round 1 failed 3 attempts in a row because workers refused its tasks (out_of_range, 2 of 2 refusals")
        assert done.error.endswith("worker a: lr = 10000.0: expected a number in (0, 1)")
        assert _poll(b, 5).done.error == done.error
        assert coord.wait_done(timeout=5)

        assert main(["status", "--coordinator", coord.address]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[:2] == ["failed: round 0/1 (udec, tiny)", f"  error: {done.error}"]


def test_a_round_that_still_has_its_quorum_closes_at_once_beside_a_refusal(tmp_path: Path) -> None:
    with _coordinator(tmp_path, quorum=0.5) as (coord, channel):
        a, b = _joined(channel, "a", "b")
        ta, tb = a.wait_task(), task_from_proto(b.wait_task())
        _reject(a, ta.task_id, reason="data_mismatch", message="local images (1, 32, 32) do not fit model 'tiny'")
        zeros = {n: torch.zeros(s.shape) for n, s in LAYOUT.specs(tb.returns).items()}
        payload = serialization.encode(zeros, PayloadMeta(kind="delta", model="tiny", round_index=tb.round_index, parts=tb.returns))
        assert b.upload_messages(b.update_messages(tb, payload)).outcome == "accepted"

        _wait(lambda: coord.driver.state == "done")
        assert _attempts(coord, "quorum") == 1 and _refused(coord, "data_mismatch") == 1
        assert coord.driver.failure == ""


def test_failed_attempts_for_other_reasons_do_not_stop_the_run(tmp_path: Path) -> None:
    """Attempts failed by refusals with different reasons, or by workers that did not answer, are no streak."""
    # attempt 3 waits for its deadline: long enough that the others' refusals are never late on a busy machine
    with _coordinator(tmp_path, round_deadline=4.0, max_refused_attempts=2) as (coord, channel):
        a, b = _joined(channel, "a", "b")
        for attempt, reason in ((1, "out_of_range"), (2, "out_of_memory"), (3, None), (4, "out_of_range")):
            ta, tb = a.wait_task(), b.wait_task()
            if reason:
                _reject(a, ta.task_id, reason)
                _reject(b, tb.task_id, reason)
            _wait(lambda attempt=attempt: _attempts(coord, "no_quorum") == attempt)
        assert coord.driver.state == "training" and coord.driver.failure == ""


def test_refusals_that_do_not_fit_the_round_are_refused_with_their_status(tmp_path: Path) -> None:
    with _coordinator(tmp_path) as (coord, channel):
        a, b = _joined(channel, "a", "b")
        ta, tb = a.wait_task(), b.wait_task()
        cases = [
            (RawWorker(channel, "nobody", session_id="no-such-session"), ta.task_id, Code.UNAUTHENTICATED),
            (a, tb.task_id, Code.PERMISSION_DENIED),  # b's task
            (a, "r7.1-a", Code.FAILED_PRECONDITION),  # no task of the round in progress
        ]
        for worker, task_id, code in cases:
            with pytest.raises(grpc.RpcError) as e:
                _reject(worker, task_id)
            assert e.value.code() == code, e.value.details()

        with pytest.raises(grpc.RpcError) as e:
            _reject(a, ta.task_id, message="x" * 10_000)
        assert (e.value.code(), e.value.details()) == (
            Code.INVALID_ARGUMENT,
            "bad_field: RejectTaskRequest.message has 10000 characters: expected 0..4096 characters, no control characters but newline and tab",
        )
        _reject(a, ta.task_id, reason="a-reason-from-a-newer-worker", message="x" * 4096)
        with pytest.raises(grpc.RpcError) as e:
            _reject(a, ta.task_id)
        assert e.value.code() == Code.ALREADY_EXISTS

        _reject(b, tb.task_id)
        _wait(lambda: _attempts(coord, "no_quorum") == 1)
        with pytest.raises(grpc.RpcError) as e:
            _reject(a, ta.task_id)  # of the attempt that ended
        assert e.value.code() == Code.FAILED_PRECONDITION
        assert _refused(coord, "other") == 1 and _refused(coord, "out_of_range") == 1
        counted = {
            o: coord.metrics.registry.get_sample_value("feddiff_refusals_total", {"rpc": "RejectTask", "outcome": o})
            for o in ("unauthenticated", "not_assigned", "wrong_round", "duplicate", "late")
        }
        assert counted == dict.fromkeys(counted, 1.0)


# --- the streak, alone -------------------------------------------------------------------------------------
def _refusals(*reasons: str) -> list[Refusal]:
    return [Refusal.of(f"w{i}", f"r0.1-w{i}", reason, f"why {i}") for i, reason in enumerate(reasons)]


def test_the_streak_counts_attempts_of_one_round_failed_by_refusals_of_one_reason() -> None:
    streak = RefusalStreak(limit=3)

    assert streak.attempt_failed(0, _refusals("out_of_range", "out_of_range", "data_mismatch"), missing=2) is None
    assert streak.attempt_failed(0, _refusals("out_of_range"), missing=1) is None
    error = streak.attempt_failed(0, _refusals("out_of_range", "data_mismatch", "out_of_range"), missing=3)

    assert error == "round 1 failed 3 attempts in a row because workers refused its tasks (out_of_range, 2 of 3 refusals in the last attempt): worker w0: why 0"


@pytest.mark.parametrize(
    ("second", "missing"),
    [
        (("data_mismatch",), 1),  # another reason
        (("out_of_range",), 2),  # a missing update that nobody refused: the refusals alone did not fail it
        ((), 1),  # no refusal at all
    ],
)
def test_the_streak_starts_over(second: tuple[str, ...], missing: int) -> None:
    streak = RefusalStreak(limit=2)
    streak.attempt_failed(0, _refusals("out_of_range"), missing=1)

    assert streak.attempt_failed(0, _refusals(*second), missing=missing) is None
    assert streak.count == (1 if second and len(second) >= missing else 0)


def test_a_refusal_is_kept_bounded() -> None:
    (r,) = [Refusal.of("w", "t", "made-up", "m" * 10_000)]
    assert r.reason == "other" and r.outcome == "rejected_other" and len(r.message) == MAX_MESSAGE
