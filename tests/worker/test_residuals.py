"""A worker's error-feedback residuals: read from its state dir when it starts, added to its next update, and saved
again beside its private parts once the update is coded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedcore.model.parts import ALL_PARTS, Part
from fedcore.model.training import SpeedConfig
from fedcore.model.unet import build_model, layout_of
from fedcore.payload import coded, serialization
from fedcore.payload.codecs import Codec
from fedcore.payload.serialization import PayloadMeta, PayloadReader
from fedcore.wire.convert import task_from_proto
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from tests.reliability.support import image_folder
from worker.config import WorkerConfig
from worker.daemon import WorkerDaemon
from worker.metrics import Metrics
from worker.state_dir import StateDir

LAYOUT = layout_of(build_model("tiny", seed=0))
DECODER = frozenset({Part.DECODER})


class Coordinator:
    """The calls of one task the daemon makes: the weights it downloads, the update it uploads."""

    def __init__(self, weights: bytes):
        self.weights = weights
        self.uploaded = b""  # the payload of the delta it uploads

    def download(self, task: Any, *, max_bytes: int, on_wire: Any) -> memoryview:
        return memoryview(bytearray(self.weights))

    def upload(self, task: Any, payload: bytes, report: Any, *, on_wire: Any) -> None:
        self.uploaded = payload


def test_a_restarted_worker_adds_the_residuals_it_saved_to_its_next_update(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    saved = {n: torch.randn(s.shape, generator=g) * 1e-3 for n, s in LAYOUT.specs(DECODER).items()}
    state = StateDir.open(tmp_path / "state", "w", Metrics())
    state.save_residuals(3, saved)
    state.close()  # the worker process that saved them ended
    cfg = WorkerConfig(
        coordinator="127.0.0.1:9", data_dir=str(image_folder(tmp_path / "images", n=4, size=28)), image_size=28,
        state_dir=str(tmp_path / "state"), speed=SpeedConfig(device="cpu", compile="off"), progress="off",
    )  # fmt: skip
    daemon = WorkerDaemon(cfg)
    daemon._build("tiny")
    train = pb.TrainSpec(epochs=1, batch_size=4, lr=1e-3, loss="huber", seed=0, compression="int4")
    task = task_from_proto(
        pb.Task(kind=pb.Task.TRAIN, round=3, task_id="r3.1-w", receives=["encoder", "bottleneck", "decoder"], returns=["decoder"], train=train)
    )
    initial = build_model("tiny", seed=1).state_dict()
    coordinator = Coordinator(serialization.encode(initial, PayloadMeta(kind="weights", model="tiny", wire_round=3, parts=ALL_PARTS)))

    assert daemon._train(coordinator, task) is None  # type: ignore[arg-type]

    runtime = daemon.runtime
    assert runtime is not None
    local = runtime.sampling_model().state_dict()
    sent, _ = coded.decode(PayloadReader(LAYOUT, kind="delta"), Codec.parse("int4"), coordinator.uploaded, DECODER)
    kept = daemon.state.load_residuals()
    assert kept is not None and kept[1] == 4
    for name, before in saved.items():  # what went up plus what is kept is the true delta plus what was kept before
        assert torch.allclose(sent[name] + kept[0][name], local[name] - initial[name] + before, atol=1e-6)
        assert torch.equal(kept[0][name], runtime.residuals[name])
