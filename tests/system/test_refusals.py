"""Tasks refused by their workers (RejectTask), against a real coordinator: counted by reason, not given to
the same worker again in the attempt, an attempt that every worker answered ends at once, and a round that
nothing could close `max_failed_attempts` times in a row (refusals, no update at all) stops the run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from coordinator.attempts import Attempt, FailedAttempts
from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.refusals import MAX_MESSAGE, Refusal
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
        "model": "tiny", "strategy": "udec", "rounds": 1, "min_workers": 2, "quorum": 1.0, "round_deadline": DEADLINE, "max_failed_attempts": 3,
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
        assert coord.driver.phase.progress().round_number == 1 and _attempts(coord, "no_quorum") == 0  # b has not answered yet


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
        payload = serialization.encode(zeros, PayloadMeta(kind="delta", model="tiny", wire_round=tb.round_index, parts=tb.returns))
        assert b.upload_messages(b.update_messages(tb, payload)).outcome == "accepted"

        _wait(lambda: coord.driver.state == "done")
        assert _attempts(coord, "quorum") == 1 and _refused(coord, "data_mismatch") == 1
        assert coord.driver.failure == ""


def test_an_attempt_that_took_an_update_starts_the_count_over_and_any_stuck_ones_make_a_streak(tmp_path: Path) -> None:
    """With two attempts as the limit: refused, then one update in and the other worker silent (a worker gone:
    no streak), then refused for one reason and for another: the run stops after the last two."""
    # attempt 2 waits for its deadline: long enough that the others' refusals are never late on a busy machine
    with _coordinator(tmp_path, round_deadline=4.0, max_failed_attempts=2) as (coord, channel):
        a, b = _joined(channel, "a", "b")
        for attempt, reason in ((1, "out_of_range"), (2, None), (3, "out_of_range")):
            ta, tb = a.wait_task(), task_from_proto(b.wait_task())
            if reason:
                _reject(a, ta.task_id, reason)
                _reject(b, tb.task_id, reason)
            else:
                zeros = {n: torch.zeros(s.shape) for n, s in LAYOUT.specs(tb.returns).items()}
                payload = serialization.encode(zeros, PayloadMeta(kind="delta", model="tiny", wire_round=tb.round_index, parts=tb.returns))
                assert b.upload_messages(b.update_messages(tb, payload)).outcome == "accepted"
            _wait(lambda attempt=attempt: _attempts(coord, "no_quorum") == attempt)
        assert coord.driver.state == "training" and coord.driver.failure == ""

        last_a, last_b = a.wait_task(), b.wait_task()
        _reject(a, last_a.task_id, "out_of_memory")
        _reject(b, last_b.task_id, "data_mismatch")
        _wait(lambda: coord.driver.state == "failed")
        assert coord.driver.failure.startswith("round 1 failed 2 attempts in a row because workers refused its tasks (data_mismatch, 1 of 2 refusals")


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


def _attempt(refusals: list[Refusal], missing: int, *, got: int = 0, round_index: int = 0, refused_updates: str = "none", non_finite: str = "") -> Attempt:
    return Attempt(
        round_index, selected=got + missing, got=got, needed=got + missing, refusals=refusals, refused_updates=refused_updates, non_finite=non_finite
    )


def test_the_streak_counts_attempts_of_one_round_that_nothing_could_close() -> None:
    streak = FailedAttempts(limit=3, round_deadline=5.0)

    assert streak.failed(_attempt(_refusals("out_of_range", "out_of_range", "data_mismatch"), missing=2, got=1), {}) is None
    assert streak.failed(_attempt(_refusals("data_mismatch"), missing=1), {}) is None
    error = streak.failed(_attempt(_refusals("out_of_range", "data_mismatch", "out_of_range"), missing=3), {})

    assert error == "round 1 failed 3 attempts in a row because workers refused its tasks (out_of_range, 2 of 3 refusals in the last attempt): worker w0: why 0"


@pytest.mark.parametrize(
    ("second", "counted"),
    [
        (_attempt(_refusals("out_of_range"), missing=2, got=1), 0),  # an update in, a missing one nobody refused: a worker gone
        (_attempt([], missing=1, got=1), 0),  # an update in, no refusal
        (_attempt([], missing=1, round_index=1), 1),  # another round
        (_attempt([], missing=2), 2),  # no update at all
        (_attempt([], missing=0, got=2, non_finite="mean update of 'w' is infinite"), 2),  # an average that is not finite
    ],
)
def test_the_streak_starts_over_unless_the_attempt_is_stuck_on_the_same_round(second: Attempt, counted: int) -> None:
    streak = FailedAttempts(limit=5, round_deadline=5.0)
    streak.failed(_attempt(_refusals("out_of_range"), missing=1), {})

    assert streak.failed(second, {}) is None
    assert streak.count == counted


@pytest.mark.parametrize(
    ("seconds", "refused_updates", "cause"),
    [
        ({}, "none", "no update was accepted within round_deadline 5 s (none arrived); no worker has reported a training time yet: the deadline may be shorter than local training (raise round_deadline), or the workers stall"),
        ({"a": 2.0, "b": 12.25}, "late 2", "no update was accepted within round_deadline 5 s (updates refused: late 2); worker b reported 12.2 s of local training, longer than the deadline: raise round_deadline above the workers' training time (or lower epochs)"),
        ({"a": 1.5}, "none", "no update was accepted within round_deadline 5 s (none arrived); the workers reported at most 1.5 s of local training (worker a), within the deadline: downloads, uploads or stalled workers take the rest (raise round_deadline, or see the workers' logs)"),
    ],
)  # fmt: skip
def test_a_round_no_update_reaches_names_the_deadline_against_the_reported_training_time(seconds: dict[str, float], refused_updates: str, cause: str) -> None:
    streak = FailedAttempts(limit=1, round_deadline=5.0)

    error = streak.failed(_attempt([], missing=2, round_index=3, refused_updates=refused_updates), seconds)

    assert error == f"round 4 failed 1 attempts in a row because {cause}"


def test_a_round_whose_average_is_never_finite_names_it() -> None:
    streak = FailedAttempts(limit=2, round_deadline=5.0)
    stuck = _attempt([], missing=0, got=2, non_finite="mean update of 'x' has 3 infinite values")

    assert streak.failed(stuck, {}) is None
    assert streak.failed(stuck, {}) == (
        "round 1 failed 2 attempts in a row because the average of its updates was not finite (mean update of 'x' has 3 infinite "
        "values): local training diverges; lower lr, or set clip_norm"
    )


def test_a_refusal_is_kept_bounded() -> None:
    (r,) = [Refusal.of("w", "t", "made-up", "m" * 10_000)]
    assert r.reason == "other" and r.outcome == "rejected_other" and len(r.message) == MAX_MESSAGE
