"""Payload digests across versions: BLAKE3 between peers that both check it, SHA-256 with a worker that
predates it, each stream checked with the digest its header names."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import blake3
import grpc
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator
from fedcore.federation.client import TrainTask
from fedcore.model.parts import PartLayout
from fedcore.model.unet import build_model, layout_of
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta
from fedcore.wire.convert import task_from_proto
from fedcore.wire.stream import StreamHeader
from tests.system.raw_client import RawWorker


def _delta_payload(task: TrainTask, layout: PartLayout) -> bytes:
    import torch

    tensors = {n: torch.full(s.shape, 1e-4) for n, s in layout.specs(task.returns).items()}  # about one Adam step at lr 1e-4
    return serialization.encode(tensors, PayloadMeta(kind="delta", model="tiny", wire_round=task.round_index, parts=task.returns))


@contextmanager
def _serving(tmp_path: Path, workers: int) -> Iterator[tuple[Coordinator, grpc.Channel]]:
    """A tiny-model coordinator waiting for `workers` workers, and a plain-text channel to it."""
    cfg = CoordinatorConfig(
        model="tiny", strategy="udec", rounds=1, epochs=1, min_workers=workers, round_deadline=60.0,
        listen="localhost:0", metrics_port=-1, insecure=True, progress="off", checkpoint_dir=str(tmp_path / "ckpt"),
    )  # fmt: skip
    coord = Coordinator(cfg, Metrics()).start()
    try:
        with grpc.insecure_channel(coord.address) as channel:
            yield coord, channel
    finally:
        coord.stop(grace=0)


LAYOUT = layout_of(build_model("tiny", seed=0))


def test_each_worker_gets_and_sends_the_digest_it_knows(tmp_path: Path) -> None:
    with _serving(tmp_path, workers=2) as (coord, channel):
        modern, legacy = RawWorker(channel, "modern"), RawWorker(channel, "legacy")
        assert list(modern.join(digests=["blake3", "md5"]).digests) == ["blake3"]  # what the coordinator checks
        legacy.join()  # names no digest, as workers before BLAKE3 did

        for worker, algorithm, digest in ((modern, "blake3", blake3.blake3), (legacy, "sha256", hashlib.sha256)):
            msg = worker.wait_task()
            other = "sha256" if algorithm == "blake3" else "blake3"
            assert getattr(msg, f"payload_{algorithm}") and not getattr(msg, f"payload_{other}")
            header, payload = worker.download(msg.task_id)
            assert getattr(header, algorithm) == digest(payload).hexdigest() == getattr(msg, f"payload_{algorithm}")
            assert not getattr(header, other)  # one digest per header

            task = task_from_proto(msg)
            update = _delta_payload(task, LAYOUT)
            sent = worker.update_messages(task, update, header=StreamHeader.of(update, algorithm))
            assert worker.upload_messages(sent).outcome == "accepted"

        deadline = time.monotonic() + 30
        while coord.federation.completed_rounds < 1:  # both updates went in: the round closes
            assert time.monotonic() < deadline, "the round did not close"
            time.sleep(0.02)


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_an_update_whose_digest_does_not_match_is_refused_whichever_digest(algorithm: str, tmp_path: Path) -> None:
    with _serving(tmp_path, workers=1) as (_, channel):
        worker = RawWorker(channel, "w")
        worker.join(digests=["blake3"])
        task = task_from_proto(worker.wait_task())
        update = _delta_payload(task, LAYOUT)
        wrong = StreamHeader.of(update[:-1] + bytes([update[-1] ^ 1]), algorithm)

        with pytest.raises(grpc.RpcError) as e:
            worker.upload_messages(worker.update_messages(task, update, header=wrong))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (e.value.details() or "").startswith(f"bad_hash: payload {algorithm} ")
