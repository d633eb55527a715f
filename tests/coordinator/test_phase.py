"""The phase in progress without a server: what a long poll hears, how an attempt ends once every task is
answered, and what a task of a phase that ended gets (late)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from coordinator.evaluation import EvalPhase, EvalReport
from coordinator.metrics import Metrics
from coordinator.phase import IssuedTask, Phase, PollEnd
from coordinator.registry import WorkerRegistry
from fedcore.errors import DuplicateUpdate, LateUpdate, NotAssigned, WrongRound
from fedcore.federation.client import EvalTask
from fedcore.federation.engine import Federation, FederationConfig, OpenRound
from fedcore.model.diffusion import SamplingSpec
from fedcore.model.parts import Part
from fedcore.payload.serialization import PayloadMeta, encode
from fedcore.wire.stream import StreamHeader

SPEC = SamplingSpec(num_samples=16, sampler="ddim", steps=10, seed=0)
WORKERS = ("a", "b")


@pytest.fixture(scope="module")
def federation() -> Federation:
    made = {"strategy": "udec", "model": "tiny", "rounds": 2, "seed": 7, "epochs": 1, "batch_size": 8, "lr": 1e-3, "loss": "mse", "compression": "none"}
    return Federation(FederationConfig.from_settings(clients_per_round=0, **made))  # type: ignore[arg-type]


def _phase(federation: Federation) -> tuple[Phase, threading.Event, list[tuple[str, int, bytes]], list[int]]:
    stop, grids, changes = threading.Event(), [], [0]
    phase = Phase(federation, WorkerRegistry(heartbeat_timeout=30.0), Metrics(), stop, lambda *grid: grids.append(grid))
    phase.on_change(lambda: changes.__setitem__(0, changes[0] + 1))
    return phase, stop, grids, changes


def _open_round(phase: Phase, federation: Federation) -> OpenRound:
    open_round = federation.open_round(federation.plan(list(WORKERS)), dict.fromkeys(WORKERS, 8))
    issued = {w: IssuedTask(open_round.task(w), StreamHeader.of(open_round.payload_for(w), "sha256")) for w in WORKERS}
    phase.open_round(open_round, issued)
    return open_round


def _eval_phase() -> EvalPhase:
    tasks = {
        w: EvalTask(completed_rounds=3, task_id=f"e3-{w}", receives=frozenset({Part.DECODER}), private_parts=frozenset({Part.ENCODER}), spec=SPEC)
        for w in WORKERS
    }
    return EvalPhase(completed_rounds=3, tasks=tasks, payload=b"payload", digests=dict.fromkeys(tasks, "sha256"))


def test_an_evaluation_ends_at_once_when_every_task_is_answered_and_its_tasks_are_late_after(federation: Federation) -> None:
    phase, _, grids, changes = _phase(federation)
    phase.open_evaluation(_eval_phase())
    issued = phase.poll_task("a")
    assert isinstance(issued, IssuedTask) and issued.task.task_id == "e3-a" and phase.state == "evaluating" and changes == [1]
    assert phase.task_payload("a", "e3-a") == (b"payload", issued)

    phase.report_evaluation(EvalReport("a", "e3-a", 3, 25.0, "fmnist-classifier", 16), b"png")
    phase.reject("b", "e3-b", "data_mismatch", "images do not fit")
    with pytest.raises(DuplicateUpdate):
        phase.reject("b", "e3-b", "data_mismatch", "again")
    started = time.monotonic()
    phase.await_answers(time.monotonic() + 30)

    assert time.monotonic() - started < 5, "an evaluation every worker answered waited for its deadline"
    assert (phase.poll_task("a"), phase.poll_task("b")) == (None, None)
    assert [r.worker_id for r in phase.refusals()] == ["b"] and grids == [("a", 3, b"png")]
    assert (phase.progress().selected, phase.progress().done) == (2, 1)
    phase.close()
    assert not phase.accepting("e3-a") and changes == [2]
    with pytest.raises(LateUpdate):
        phase.report_evaluation(EvalReport("a", "e3-a", 3, 25.0, "fmnist-classifier", 16), b"")


def test_a_round_checks_each_upload_against_its_task_until_it_closes(federation: Federation) -> None:
    phase, _, _, _ = _phase(federation)
    open_round = _open_round(phase, federation)
    task_a, task_b = open_round.task("a"), open_round.task("b")

    assert phase.upload_limit("a", task_a.task_id, task_a.returns, task_a.wire_round) > 0
    with pytest.raises(NotAssigned):
        phase.upload_limit("a", task_b.task_id, task_b.returns, task_b.wire_round)  # another worker's task
    with pytest.raises(WrongRound):
        phase.upload_limit("a", task_a.task_id, task_a.returns, task_a.wire_round + 1)
    with pytest.raises(WrongRound):
        phase.report_evaluation(EvalReport("a", task_a.task_id, 0, 25.0, "fmnist-classifier", 16), b"")  # no evaluation in progress
    phase.note_training_time("a", task_a.task_id, 1.5)
    phase.note_training_time("a", "r9.1-a", 99.0)  # no task of this run: not taken
    assert phase.training_seconds() == {"a": 1.5} and phase.progress().round_number == 1

    phase.close()
    assert not phase.accepting(task_a.task_id) and phase.poll_task("a") is None
    with pytest.raises(LateUpdate):
        phase.upload_limit("a", task_a.task_id, task_a.returns, task_a.wire_round)


def _deliver(phase: Phase, federation: Federation, open_round: OpenRound, worker_id: str) -> None:
    """The worker's download counted and a small update of the parts its task returns accepted."""
    task = open_round.task(worker_id)
    phase.download_complete(worker_id, task.task_id)
    tensors = {n: 1e-4 * torch.ones(federation.global_state[n].shape) for n in federation.layout.names(task.returns)}
    payload = encode(tensors, PayloadMeta(kind="delta", model="tiny", wire_round=open_round.round_index, parts=task.returns))
    phase.accept(worker_id, task.task_id, payload, mean_loss=0.5, images_seen=8)


def _waited(phase: Phase, seconds: float, quorum: int) -> float:
    """How long `await_answers` waited, given a deadline `seconds` away."""
    started = time.monotonic()
    phase.await_answers(started + seconds, quorum=quorum)
    return time.monotonic() - started


def test_a_round_with_its_quorum_in_does_not_wait_for_a_worker_that_left_unless_it_joins_again(federation: Federation) -> None:
    phase, _, _, _ = _phase(federation)
    open_round = _open_round(phase, federation)

    phase.left("b")  # no update in yet: the attempt waits for b, which may come back
    assert _waited(phase, 0.3, quorum=1) >= 0.3
    phase.joined("b")  # back in time: its task is its own and waited for again
    _deliver(phase, federation, open_round, "a")
    assert isinstance(phase.poll_task("b"), IssuedTask) and _waited(phase, 0.3, quorum=1) >= 0.3
    assert _waited(phase, 0.3, quorum=2) >= 0.3

    phase.left("b")  # stopped for good: a's update is the quorum of 1, nothing to wait for
    assert _waited(phase, 30, quorum=1) < 5, "a round with its quorum in waited for a worker that left"
    assert _waited(phase, 0.3, quorum=2) >= 0.3, "a round short of its quorum stopped waiting for a worker that left"
    assert isinstance(phase.poll_task("b"), IssuedTask), "its task stays its own until the round closes"


def test_long_polls_hear_stopped_and_done(federation: Federation) -> None:
    phase, stop, _, changes = _phase(federation)
    assert phase.poll_task("a") is None
    stop.set()
    phase.wake()
    assert phase.poll_task("a") is PollEnd.STOPPED and changes == [1]
    phase.await_answers(time.monotonic() + 30)  # returns at once once stopped
    phase.fail("round 1 failed")
    assert phase.poll_task("a") is PollEnd.DONE and (phase.state, phase.failure) == ("failed", "round 1 failed")
    phase.ended()
    assert phase.state == "failed"
