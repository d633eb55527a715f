"""The worker's one table of status codes (worker/status.py): a row for every code it can meet, rows that agree
with the coordinator's mapping (coordinator/status.py), and the daemon doing what each row says after a failed
join, upload and refusal."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from coordinator.metrics import UPDATE_REFUSALS
from coordinator.status import code_for
from fedcore import errors
from fedcore.errors import OutOfMemory
from fedcore.federation.client import TrainTask
from fedcore.model.parts import Part
from fedcore.model.training import SpeedConfig, TrainConfig
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from tests.reliability.support import image_folder
from worker.config import WorkerConfig
from worker.daemon import SessionOver, WorkerDaemon
from worker.rpc import CoordinatorClient
from worker.status import TABLE, Action, reaction

Code = grpc.StatusCode
CODES = [c for c in Code if c is not Code.OK]
JOIN_REFUSALS = (errors.BadWorkerInfo, errors.UnregisteredWorker, errors.DuplicateWorker, errors.UnknownWorker)  # what Join raises


class Failed(grpc.RpcError):
    def __init__(self, code: Code):
        self._code = code

    def code(self) -> Code:
        return self._code

    def details(self) -> str:
        return f"{self._code.name.lower()}: as the test says"


class FailingClient(CoordinatorClient):
    """Every call fails with `code`. It has no channel."""

    def __init__(self, code: Code):  # no CoordinatorClient.__init__: no channel
        self.failure = code

    def join(self, info: pb.WorkerInfo, timeout: float = 30.0) -> pb.JoinResponse:
        raise Failed(self.failure)

    def reject_task(self, task_id: str, reason: str, message: str) -> None:
        raise Failed(self.failure)


class NoWaits:
    """Stands for the daemon's stop event: counts the waits instead of waiting."""

    def __init__(self) -> None:
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return False

    def is_set(self) -> bool:
        return False


@pytest.fixture
def daemon(tmp_path: Path) -> WorkerDaemon:
    cfg = WorkerConfig(
        coordinator="127.0.0.1:9", worker_id="w", data_dir=str(image_folder(tmp_path / "images", n=4)), state_dir=str(tmp_path / "state"),
        speed=SpeedConfig(device="cpu", compile="off"), progress="off",
    )  # fmt: skip
    d = WorkerDaemon(cfg)
    d.stop_event = NoWaits()  # type: ignore[assignment]
    return d


def _count(d: WorkerDaemon, metric: str, outcome: str) -> float:
    return d.metrics.registry.get_sample_value(metric, {"outcome": outcome}) or 0.0


def _waits(d: WorkerDaemon) -> int:
    assert isinstance(d.stop_event, NoWaits)
    return d.stop_event.waits


# --- the table --------------------------------------------------------------------------------------------------
def test_every_code_a_worker_can_meet_has_a_row() -> None:
    assert set(TABLE) == set(CODES)


def test_a_failed_join_and_a_failed_long_poll_download_or_report_end_the_session() -> None:
    assert {r.join.action for r in TABLE.values()} == {r.session.action for r in TABLE.values()} == {Action.REJOIN}


@pytest.mark.parametrize("error", JOIN_REFUSALS, ids=lambda e: e.__name__)
def test_a_refused_join_is_counted_under_the_reason_the_coordinator_refused_it_with(error: type[errors.FeddiffError]) -> None:
    assert reaction("join", Failed(code_for(error("refused")))).outcome == error.reason


@pytest.mark.parametrize("error", [e for e in UPDATE_REFUSALS if e is not errors.UnknownWorker], ids=lambda e: e.__name__)
def test_every_refusal_of_an_update_is_counted_and_the_session_goes_on(error: type[errors.FeddiffError]) -> None:
    """Of an update the coordinator refused (or that missed its round) the worker counts the outcome and asks for
    its next task; an upload on an ended session (UNAUTHENTICATED) ends the session instead."""
    r = reaction("upload", Failed(code_for(error("refused"))))

    assert r.outcome and r.action in (Action.BACK_OFF, Action.NEXT_TASK)


def test_connection_trouble_during_a_refusal_ends_the_session_any_other_failure_does_not() -> None:
    ending = {c for c in CODES if reaction("reject_task", Failed(c)).action is Action.REJOIN}

    assert ending == {Code.UNAVAILABLE, Code.UNAUTHENTICATED, Code.DEADLINE_EXCEEDED}


# --- the daemon, as the table says ------------------------------------------------------------------------------
@pytest.mark.parametrize("code", CODES, ids=lambda c: c.name)
def test_a_failed_join_ends_the_session_counted_and_logged(code: Code, daemon: WorkerDaemon, caplog: pytest.LogCaptureFixture) -> None:
    expected = TABLE[code].join.outcome

    with caplog.at_level(logging.WARNING, "feddiff.worker"), pytest.raises(SessionOver):
        daemon._join(FailingClient(code))

    assert not expected or _count(daemon, "feddiff_joins_total", expected) == 1
    (line,) = [r.getMessage() for r in caplog.records if r.name == "feddiff.worker"]
    if code is Code.ALREADY_EXISTS:
        assert line == "worker w: join refused, another worker runs under this id: already_exists: as the test says; retrying in 0.5s"
    elif expected:
        assert line.startswith(f"worker w: join refused: {code.name.lower()}: as the test says; retrying in")
    else:
        assert line.startswith(f"worker w: coordinator unavailable (StatusCode.{code.name}: ")


TASK = TrainTask(
    round_index=0, task_id="r0.1-w", receives=frozenset(Part), returns=frozenset({Part.DECODER}), private_parts=frozenset(), train=TrainConfig(), seed=0
)


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.name)
def test_a_failed_upload_goes_on_backs_off_or_ends_the_session_as_its_row_says(code: Code, daemon: WorkerDaemon) -> None:
    row = TABLE[code].upload

    if row.action is Action.REJOIN:
        with pytest.raises(SessionOver):
            daemon._upload_failed(TASK, Failed(code))
    else:
        assert daemon._upload_failed(TASK, Failed(code)) is row.action
        assert _count(daemon, "feddiff_updates_total", row.outcome) == 1


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.name)
def test_a_refusal_the_coordinator_does_not_take_backs_off_unless_the_session_is_over(code: Code, daemon: WorkerDaemon) -> None:
    refusal = OutOfMemory("task 'r0.1-w': CUDA out of memory")

    if code in (Code.UNAVAILABLE, Code.UNAUTHENTICATED, Code.DEADLINE_EXCEEDED):
        with pytest.raises(SessionOver):
            daemon._refuse(FailingClient(code), "r0.1-w", refusal)
        assert _waits(daemon) == 0, "the session's end waits, in `run`"
    else:
        daemon._refuse(FailingClient(code), "r0.1-w", refusal)
        assert _waits(daemon) == 1
    assert _count(daemon, "feddiff_updates_total", "rejected_out_of_memory") == 1, "counted when it was refused"
