"""Coded downloads against a real coordinator on loopback: round 1 of a fresh run sends no tensors (the worker
builds the initial model from the run's seed), a worker that holds the last version of the shared model downloads
its coded change, a restarted one (another process of the same installation) the values, its task in progress
re-issued before it downloads, and one whose build from the seed differed the values from then on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import torch

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator
from fedcore.errors import MissingSharedState
from fedcore.federation.client import TrainTask
from fedcore.model.unet import build_model, layout_of
from fedcore.payload import coded, initial, serialization
from fedcore.payload.serialization import PayloadMeta
from fedcore.wire.convert import task_from_proto
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from tests.system.raw_client import RawWorker

LAYOUT = layout_of(build_model("tiny", seed=0))


def _download(worker: RawWorker) -> tuple[TrainTask, PayloadMeta, int]:
    """The worker's next task, the metadata of its weights and the size its task message declared."""
    msg = worker.wait_task()
    _, data = worker.download(msg.task_id)
    assert len(data) == msg.payload_bytes
    return task_from_proto(msg), serialization.read_meta(data), msg.payload_bytes


def _deliver(worker: RawWorker, task: TrainTask) -> None:
    """An update that moves every parameter it returns (the next round makes a new version of the shared model)."""
    steps = {n: torch.full(s.shape, 1e-3) for n, s in LAYOUT.specs(task.returns).items()}
    payload = coded.encode(steps, PayloadMeta(kind="delta", model="tiny", wire_round=task.round_index, parts=task.returns, codec=task.codec.name))
    assert worker.upload_messages(worker.update_messages(task, payload, chunk_size=16 << 10), timeout=10).outcome == "accepted"


@contextmanager
def _served(tmp_path: Path, rounds: int) -> Iterator[grpc.Channel]:
    """A channel to a real int8 coordinator of `rounds` rounds (tiny, seed 5), stopped on the way out."""
    cfg = CoordinatorConfig(
        model="tiny", strategy="full", rounds=rounds, epochs=1, lr=1e-3, min_workers=1, round_deadline=60.0, listen="localhost:0",
        metrics_port=-1, insecure=True, progress="off", checkpoint_dir=str(tmp_path / "ckpt"), compression="int8", seed=5,
    )  # fmt: skip
    coord = Coordinator(cfg, Metrics()).start()
    try:
        with grpc.insecure_channel(coord.address) as channel:
            yield channel
    finally:
        coord.stop(grace=0)


def test_the_same_process_downloads_the_change_and_a_restarted_one_the_values(tmp_path: Path) -> None:
    with _served(tmp_path, 3) as channel:
        first = RawWorker(channel, "w", 64, installation_id="inst-1", instance_id="proc-1")
        first.join()
        task, meta, unchanged_bytes = _download(first)
        assert (meta.version, meta.base, meta.codec) == (0, 0, "int8")  # version 0, nothing to change
        assert (meta.seed, meta.digest) == (5, initial.state_digest(initial.initial_state("tiny", 5), LAYOUT))  # built from the seed
        assert unchanged_bytes < 1024
        _deliver(first, task)

        task, meta, change_bytes = _download(first)
        assert (meta.version, meta.base, meta.codec) == (1, 0, "int8")  # the change since version 0
        assert unchanged_bytes < change_bytes
        _deliver(first, task)

        issued = first.wait_task()  # round 3's task: the change since version 1, until the worker restarts
        restarted = RawWorker(channel, "w", 64, installation_id="inst-1", instance_id="proc-2")
        restarted.join()
        task, meta, size = _download(restarted)
        assert task.task_id == issued.task_id and size != issued.payload_bytes
        assert (meta.version, meta.base, meta.codec) == (2, -1, "none")
        assert size > 3 * change_bytes


def test_a_worker_whose_build_from_the_seed_differs_downloads_the_values_from_then_on(tmp_path: Path) -> None:
    with _served(tmp_path, 2) as channel:
        worker = RawWorker(channel, "w", 64, installation_id="inst-1", instance_id="proc-1")
        worker.join()
        msg = worker.wait_task()
        _, data = worker.download(msg.task_id)
        assert serialization.read_meta(data).seed == 5
        refusal = MissingSharedState("client 'w' built the initial model of 'tiny' with seed 5 as digest 00..., the coordinator's is ...")
        worker.stub.RejectTask(pb.RejectTaskRequest(session_id=worker.session_id, task_id=msg.task_id, reason=refusal.reason, message=str(refusal)), timeout=10)

        task, meta, size = _download(worker)  # the round again (no quorum): version 0's values
        assert task.round_index == 0 and (meta.version, meta.base, meta.codec, meta.seed) == (0, -1, "none", -1)
        assert size > 4 * LAYOUT.total
        _deliver(worker, task)

        task, meta, _ = _download(worker)  # it holds version 0 now (downloaded): the change
        assert (meta.version, meta.base) == (1, 0)
