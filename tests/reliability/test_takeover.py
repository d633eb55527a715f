"""A worker that holds none of the private parts its open task counts on (another installation took its id
over mid-round, or it lost its state) is never handed that task: a training task is given again with the
whole model, so it trains that same round, and the run's ledger counts one whole model, not a download per
rejoin."""

from __future__ import annotations

import logging
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
from coordinator.server import Coordinator
from fedcore.federation.strategies import Strategy, shared_parts
from fedcore.model.parts import ALL_PARTS, PART_ORDER
from fedcore.model.unet import build_model, layout_of
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta
from fedcore.wire.convert import task_from_proto
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from feddiff.local import LocalCluster
from tests.reliability.support import ENV, image_folder, rounds_log, wait_until
from tests.system.raw_client import RawWorker

TINY = layout_of(build_model("tiny", seed=0))
SHARED = shared_parts(Strategy.UDEC)  # the decoder
FIRST, SECOND = "a" * 32, "b" * 32  # installation ids


@contextmanager
def _coordinator(tmp_path: Path, rounds: int = 2, **settings: Any) -> Iterator[tuple[Coordinator, grpc.Channel]]:
    cfg = CoordinatorConfig(
        model="tiny", strategy="udec", rounds=rounds, epochs=1, batch_size=8, min_workers=1, round_deadline=120.0,
        heartbeat_interval=0.5, heartbeat_timeout=2.0, listen="localhost:0", metrics_port=-1, insecure=True, progress="off",
        checkpoint_dir=str(tmp_path / "ckpt"), **settings,
    )  # fmt: skip
    coord = Coordinator(cfg, Metrics()).start()
    try:
        with grpc.insecure_channel(coord.address) as channel:
            yield coord, channel
    finally:
        coord.stop(grace=0)


def _first_round(coord: Coordinator, worker: RawWorker) -> None:
    """`worker` gets the whole model, sends a small decoder update; the round closes."""
    msg = worker.wait_task()
    assert set(msg.receives) == {p.value for p in ALL_PARTS}
    worker.download(msg.task_id)
    task = task_from_proto(msg)
    delta = {n: torch.full(s.shape, 1e-4) for n, s in TINY.specs(task.returns).items()}
    payload = serialization.encode(delta, PayloadMeta(kind="delta", model="tiny", wire_round=task.round_index, parts=task.returns))
    assert worker.upload_messages(worker.update_messages(task, payload)).outcome == "accepted"
    wait_until(lambda: coord.federation.completed_rounds == 1, "round 1 closed", 30)


def test_a_worker_that_says_it_lost_its_state_gets_its_task_again_with_the_whole_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "feddiff.coordinator")
    with _coordinator(tmp_path) as (coord, channel):
        worker = RawWorker(channel, "hospital-1", installation_id=FIRST, instance_id="p1")
        worker.join()
        _first_round(coord, worker)
        decoder_only = worker.wait_task()
        assert set(decoder_only.receives) == {p.value for p in SHARED}

        worker.join(has_private_state=False)  # its private parts are gone; it says so when it joins again
        again = worker.wait_task()

        assert again.task_id == decoder_only.task_id and set(again.receives) == {p.value for p in ALL_PARTS}
        header, payload = worker.download(again.task_id)
        assert len(payload) == header.total_bytes == again.payload_bytes
        assert f"worker hospital-1 holds no private parts: task {again.task_id} now carries the whole model" in caplog.text


def test_an_evaluate_task_of_a_worker_that_lost_its_state_is_withdrawn_and_the_phase_ends_at_once(tmp_path: Path) -> None:
    with _coordinator(tmp_path, rounds=1, eval_samples=1, eval_steps=1) as (coord, channel):
        worker = RawWorker(channel, "hospital-1", installation_id=FIRST, instance_id="p1")
        worker.join()
        _first_round(coord, worker)
        assert worker.wait_task().kind == pb.Task.EVALUATE  # its own model: the private parts it no longer has

        started = time.monotonic()
        worker.join(has_private_state=False)
        wait_until(lambda: coord.driver.state == "done", "the run done", 30)

        assert time.monotonic() - started < 10, "the phase did not wait for the 120 s deadline"
        resp = worker.stub.WaitTask(pb.WaitTaskRequest(session_id=worker.session_id, timeout_ms=1000), timeout=10)
        assert resp.WhichOneof("outcome") == "done"


@pytest.mark.faults
@pytest.mark.e2e
def test_a_takeover_mid_round_by_another_installation_trains_that_round_with_the_whole_model(tmp_path: Path) -> None:
    """The first installation goes silent with a decoder-only task; a worker process of another installation
    (a fresh state dir) takes the id over. It trains that round with the whole model, joins once, and the
    ledger counts the first round's model and one whole model more."""
    images = image_folder(tmp_path / "images", n=8)
    with _coordinator(tmp_path) as (coord, channel), LocalCluster(tmp_path / "cluster", env=ENV) as cluster:
        first = RawWorker(channel, "hospital-1", installation_id=FIRST, instance_id="p1")
        first.join(has_private_state=False)
        _first_round(coord, first)
        assert set(first.wait_task().receives) == {p.value for p in SHARED}  # round 2: decoder only, never done
        wait_until(lambda: not coord.registry.connected(), "the first installation's session timed out", 30)

        second = cluster.worker(coord.address, "hospital-1", "--insecure", "--data-dir", str(images), "--threads", "1", "--compile", "off")
        assert second.proc.wait(120) == 0, second.output()[-3000:]
        log = second.output()

    total = sum(TINY.sizes.values())
    decoder = sum(TINY.sizes[p] for p in SHARED)
    down = coord.federation.ledger.traffic.down
    assert [r["participants"] for r in rounds_log(tmp_path / "ckpt")] == [["hospital-1"], ["hospital-1"]]
    assert sum(down[p] for p in PART_ORDER) == 2 * total, "round 1's whole model, and one whole model for the new installation"
    assert sum(coord.federation.ledger.traffic.up[p] for p in PART_ORDER) == 2 * decoder
    assert log.count("worker hospital-1: joined ") == 1, log[-3000:]
    assert "holds no private tensor" not in log and "rejoining" not in log
    assert sorted(p.name for p in (tmp_path / "cluster" / "workers" / "hospital-1").glob("private-r*")) == ["private-r0002.safetensors"]
