"""A worker that cannot run a task says so (RejectTask) with the reason, and waits before it asks again:
exponentially longer after each refusal, up to backoff_max, and from the start again once a task ran."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedcore.errors import MissingPrivateState
from fedcore.model.training import SpeedConfig
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from tests.reliability.support import image_folder
from worker.config import WorkerConfig
from worker.daemon import WorkerDaemon
from worker.rpc import CoordinatorClient
from worker.status import Action


class FakeClient(CoordinatorClient):
    """Records the refusals a worker sends; answers as an old coordinator would when `unimplemented`. It has
    no channel: the tasks here end before anything else is asked of a client."""

    def __init__(self, unimplemented: bool = False):  # no CoordinatorClient.__init__: no channel
        self.refusals: list[tuple[str, str, str]] = []
        self.unimplemented = unimplemented

    def reject_task(self, task_id: str, reason: str, message: str) -> None:
        self.refusals.append((task_id, reason, message))
        if self.unimplemented:
            raise _RpcError(grpc.StatusCode.UNIMPLEMENTED)


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "Method not found!"


class Waits(threading.Event):
    """Stands for the daemon's stop event: records how long each wait would have been."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None, "the daemon always waits a while"
        self.seconds.append(timeout)
        return False

    def is_set(self) -> bool:
        return False


def _daemon(tmp_path: Path, image_size: int = 28, **settings: Any) -> WorkerDaemon:
    images = image_folder(tmp_path / "images", n=4, size=image_size)
    cfg = WorkerConfig(
        coordinator="127.0.0.1:9", data_dir=str(images), image_size=image_size, state_dir=str(tmp_path / "state"),
        speed=SpeedConfig(device="cpu", compile="off"), progress="off", **settings,
    )  # fmt: skip
    daemon = WorkerDaemon(cfg)
    daemon.stop_event = Waits()
    return daemon


def _waits(daemon: WorkerDaemon) -> list[float]:
    """The seconds each of the daemon's waits would have lasted."""
    assert isinstance(daemon.stop_event, Waits)
    return daemon.stop_event.seconds


def _task(task_id: str = "r0.1-w", **train: Any) -> pb.Task:
    spec: dict[str, Any] = {"epochs": 1, "batch_size": 8, "lr": 1e-4, "loss": "huber", "seed": 0, **train}
    return pb.Task(kind=pb.Task.TRAIN, round=0, task_id=task_id, receives=["decoder"], returns=["decoder"], train=pb.TrainSpec(**spec))


def _refused(daemon: WorkerDaemon, reason: str) -> float:
    return daemon.metrics.registry.get_sample_value("feddiff_updates_total", {"outcome": f"rejected_{reason}"}) or 0.0


def test_a_task_out_of_range_is_refused_with_its_reason_and_the_waits_grow_to_the_cap(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, backoff_initial=0.5, backoff_max=3.0)
    daemon._build("tiny")
    client = FakeClient()

    for i in range(5):
        daemon._run_task(client, _task(f"r0.{i + 1}-w", lr=1e4))

    assert [(t, r) for t, r, _ in client.refusals] == [(f"r0.{i + 1}-w", "out_of_range") for i in range(5)]
    assert "lr = 10000.0: expected a number in (0, 1)" in client.refusals[0][2]
    assert _waits(daemon) == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert _refused(daemon, "out_of_range") == 5


def test_images_that_do_not_fit_the_model_are_a_refusal_of_each_task_not_an_exit(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, image_size=32)
    client = FakeClient()

    daemon._join(type("Joining", (), {"join": lambda self, info: pb.JoinResponse(model="tiny", rounds=1)})())
    daemon._run_task(client, _task())

    assert daemon.runtime is None
    ((_, reason, message),) = client.refusals
    assert reason == "data_mismatch"
    assert message == "local images (1, 32, 32) do not fit model 'tiny', which takes (1, 28, 28) (channels, height, width)"


def test_a_diffusers_model_without_diffusers_is_a_refusal_of_each_task_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    daemon = _daemon(tmp_path)
    client = FakeClient()

    daemon._join(type("Joining", (), {"join": lambda self, info: pb.JoinResponse(model="diffusers-tiny", rounds=1)})())
    daemon._run_task(client, _task())

    assert daemon.runtime is None
    ((_, reason, message),) = client.refusals
    assert reason == "model_unavailable"
    assert message.startswith("model 'diffusers-tiny' is a diffusers UNet2DModel, but diffusers is not installed")
    assert message.endswith("pip install 'feddiff[diffusers]'")
    assert _refused(daemon, "model_unavailable") == 1


def test_a_task_too_large_for_the_device_is_refused_and_a_task_that_runs_resets_the_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = _daemon(tmp_path)
    daemon._build("tiny")
    client = FakeClient()

    def out_of_memory(client: object, task: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    monkeypatch.setattr(daemon, "_train", out_of_memory)
    daemon._run_task(client, _task(batch_size=65536))
    daemon._run_task(client, _task(batch_size=65536))
    monkeypatch.setattr(daemon, "_train", lambda client, task: None)  # its update was taken
    daemon._run_task(client, _task())
    monkeypatch.setattr(daemon, "_train", out_of_memory)
    daemon._run_task(client, _task(batch_size=65536))

    assert [r for _, r, _ in client.refusals] == ["out_of_memory"] * 3
    assert client.refusals[0][2] == "task 'r0.1-w': CUDA out of memory. Tried to allocate 20.00 GiB"
    assert _waits(daemon) == [0.5, 1.0, 0.5]


def test_an_update_that_missed_its_round_neither_waits_nor_resets_the_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A late update was not taken: the next task comes at once, and the next refusal waits on from where the
    backoff stood (a worker refused until its round closes must not start again from the shortest wait)."""
    daemon = _daemon(tmp_path)
    daemon._build("tiny")
    client = FakeClient()

    monkeypatch.setattr(daemon, "_train", lambda client, task: Action.BACK_OFF)  # its update was refused
    daemon._run_task(client, _task())
    daemon._run_task(client, _task())
    monkeypatch.setattr(daemon, "_train", lambda client, task: Action.NEXT_TASK)  # its round had closed
    daemon._run_task(client, _task())
    monkeypatch.setattr(daemon, "_train", lambda client, task: Action.BACK_OFF)
    daemon._run_task(client, _task())

    assert _waits(daemon) == [0.5, 1.0, 2.0]


def test_against_a_coordinator_without_reject_task_the_worker_still_waits(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path)
    daemon._build("tiny")

    daemon._run_task(FakeClient(unimplemented=True), _task(epochs=0))
    daemon._run_task(FakeClient(unimplemented=True), _task(epochs=0))

    assert _waits(daemon) == [0.5, 1.0]


class StopAfter(Waits):
    """Waits that stop the daemon after `n` of them."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def is_set(self) -> bool:
        return len(self.seconds) >= self.n


def test_every_rejoin_and_refusal_waits_by_one_policy_a_lost_private_state_included(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task the worker cannot load for want of its private parts used to send it back to join at once, again
    and again; now it waits like after a lost connection or a refused task, in one growing series."""
    daemon = _daemon(tmp_path, backoff_initial=0.5, backoff_max=3.0, insecure=True)
    daemon._build("tiny")
    assert daemon.runtime is not None
    daemon.runtime.private_tensors["stale"] = torch.zeros(1)
    daemon.stop_event = StopAfter(5)
    outcomes = iter(
        [
            MissingPrivateState("no private tensor 'init_conv.weight'"),
            _RpcError(grpc.StatusCode.UNAVAILABLE),
            "refuse",
            MissingPrivateState("again"),
            MissingPrivateState("again"),
        ]
    )

    def session(client: object) -> bool:
        outcome = next(outcomes)
        if outcome == "refuse":
            daemon._run_task(FakeClient(), _task(lr=1e4))
            return False
        assert isinstance(outcome, Exception)
        raise outcome

    monkeypatch.setattr(daemon, "_session", session)
    daemon.run()

    assert _waits(daemon) == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert daemon.runtime is not None
    assert daemon.runtime.private_tensors == {} and daemon.private_tensors is None, "it rejoins as a worker without private state"
