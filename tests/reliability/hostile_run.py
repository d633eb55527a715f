"""A real `feddiff coordinator` process (tiny model, full strategy, one round) and an honest raw worker whose
delta is known, for the tests of hostile traffic: the committed model is the round's start plus that delta,
bit for bit, whatever the hostile worker did."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import safetensors.torch
import torch

from fedcore.federation import checkpoint
from fedcore.federation.client import TrainTask
from fedcore.model.unet import build_model, layout_of
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta
from fedcore.wire.convert import task_from_proto
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from feddiff.local import LocalCluster, Process
from tests.reliability.support import ENV
from tests.system.raw_client import RawWorker

MODEL = "tiny"
LAYOUT = layout_of(build_model(MODEL, seed=0))
IMAGES = 64  # FedAvg weight of every worker: a power of two, so one update's mean is that update, bit for bit
CHUNK = 16 << 10
HEALTH_LIMIT = 0.1  # seconds the median health check may take (each one: support.PROBE_TIMEOUT)
Tensors = dict[str, torch.Tensor]


# --- the coordinator and its workers -----------------------------------------------------------------------
def delta_for(task: TrainTask, seed: int) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s.shape, generator=g) * 1e-5 for n, s in LAYOUT.specs(task.returns).items()}


def payload_for(task: TrainTask, delta: Tensors) -> bytes:
    return serialization.encode(delta, PayloadMeta(kind="delta", model=MODEL, wire_round=task.round_index, parts=task.returns))


def identical(a: Tensors, b: Tensors) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n].view(torch.int32), b[n].view(torch.int32)) for n in a)


@dataclass
class Honest:
    """A worker that downloads the global model and uploads a known delta (full strategy: every part)."""

    worker: RawWorker
    task: TrainTask = field(init=False)  # set by take_task
    before: Tensors | None = None  # the global model its round started from
    delta: Tensors | None = None

    def take_task(self, timeout: float = 30.0) -> None:
        """Its task, once the round opens (the long poll asked again until then), and the model it starts from."""
        deadline = time.monotonic() + timeout
        while (task := self.worker.stub.WaitTask(pb.WaitTaskRequest(session_id=self.worker.session_id, timeout_ms=10_000), timeout=30)).WhichOneof(
            "outcome"
        ) != "task":
            assert time.monotonic() < deadline, f"no task after {timeout} s"
        self.task = task_from_proto(task.task)
        _, weights = self.worker.download(self.task.task_id)
        self.before = safetensors.torch.load(weights)

    def upload(self, seed: int = 2, timeout: float = 30.0) -> pb.UploadResponse:
        self.delta = delta_for(self.task, seed)
        return self.worker.upload_messages(self.worker.update_messages(self.task, payload_for(self.task, self.delta), chunk_size=CHUNK), timeout=timeout)

    def assert_round_change_is_its_delta(self, checkpoints: Path) -> None:
        """The committed global model is the one the round started from plus this worker's delta, bit for bit."""
        saved = checkpoint.load_run(checkpoints)
        assert saved is not None and saved[1].completed_rounds == 1
        assert self.before is not None and self.delta is not None
        assert identical(saved[0], {n: self.before[n] + self.delta[n] for n in self.before})


@contextmanager
def coordinator_process(tmp_path: Path, *args: str) -> Iterator[tuple[Process, grpc.Channel]]:
    with LocalCluster(tmp_path, env=ENV) as cluster:
        coord = cluster.coordinator(
            "--insecure",
            "--model",
            MODEL,
            "--strategy",
            "full",
            "--rounds",
            "1",
            "--epochs",
            "1",
            "--progress",
            "off",
            "--health-port",
            "0",
            *args,
            ready_timeout=120,
        )
        with grpc.insecure_channel(coord.ready["address"]) as channel:
            yield coord, channel


def probes_address(coord: Process) -> str:
    """The address of the coordinator's health-only port, which Kubernetes' probes ask."""
    return f"127.0.0.1:{coord.ready['health_port']}"


def committed(tmp_path: Path) -> bool:
    saved = checkpoint.load_run(tmp_path / "checkpoints")
    return saved is not None and saved[1].completed_rounds == 1
