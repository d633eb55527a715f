"""Coded downloads against a real coordinator on loopback: a worker that holds the last version of the shared model
downloads its coded change, a restarted one (another process of the same installation) the values, its task in
progress re-issued before it downloads."""

from __future__ import annotations

from pathlib import Path

import grpc
import torch

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator
from fedcore.federation.client import TrainTask
from fedcore.model.unet import build_model, layout_of
from fedcore.payload import coded, serialization
from fedcore.payload.serialization import PayloadMeta
from fedcore.wire.convert import task_from_proto
from tests.system.raw_client import RawWorker

LAYOUT = layout_of(build_model("tiny", seed=0))


def _download(worker: RawWorker) -> tuple[TrainTask, PayloadMeta, int]:
    """The worker's next task, the metadata of its weights and the size its task message declared."""
    msg = worker.wait_task()
    _, data = worker.download(msg.task_id)
    assert len(data) == msg.payload_bytes
    return task_from_proto(msg), serialization.read_meta(data), msg.payload_bytes


def _deliver(worker: RawWorker, task: TrainTask) -> None:
    zeros = {n: torch.zeros(s.shape) for n, s in LAYOUT.specs(task.returns).items()}
    payload = coded.encode(zeros, PayloadMeta(kind="delta", model="tiny", round_index=task.round_index, parts=task.returns, codec=task.codec.name))
    assert worker.upload_messages(worker.update_messages(task, payload, chunk_size=16 << 10), timeout=10).outcome == "accepted"


def test_the_same_process_downloads_the_change_and_a_restarted_one_the_values(tmp_path: Path) -> None:
    cfg = CoordinatorConfig(
        model="tiny", strategy="full", rounds=3, epochs=1, lr=1e-3, min_workers=1, round_deadline=60.0, listen="localhost:0",
        metrics_port=-1, insecure=True, progress="off", checkpoint_dir=str(tmp_path / "ckpt"), compression="int8",
    )  # fmt: skip
    coord = Coordinator(cfg, Metrics()).start()
    try:
        with grpc.insecure_channel(coord.address) as channel:
            first = RawWorker(channel, "w", 64, installation_id="inst-1", instance_id="proc-1")
            first.join()
            task, meta, values_bytes = _download(first)
            assert (meta.version, meta.base, meta.codec) == (1, -1, "none")  # the values of version 1
            _deliver(first, task)

            task, meta, change_bytes = _download(first)
            assert (meta.version, meta.base, meta.codec) == (2, 1, "int8")  # the change since version 1
            assert change_bytes < values_bytes / 3
            _deliver(first, task)

            issued = first.wait_task()  # round 3's task: the change since version 2, until the worker restarts
            restarted = RawWorker(channel, "w", 64, installation_id="inst-1", instance_id="proc-2")
            restarted.join()
            task, meta, size = _download(restarted)
            assert task.task_id == issued.task_id and size != issued.payload_bytes
            assert (meta.version, meta.base, meta.codec) == (3, -1, "none")
    finally:
        coord.stop(grace=0)
