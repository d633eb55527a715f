"""Evaluation reports (ReportEvaluation) against a real coordinator in its evaluate phase: each report that does
not fit its task refused with the status of what is wrong with it, counted by reason, and a good report taken
even when its shared sample grid cannot be written."""

from __future__ import annotations

import io
import math
from pathlib import Path

import grpc
import pytest
import torch
from PIL import Image

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator
from fedcore.model.unet import build_model, layout_of
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta
from fedcore.wire.convert import task_from_proto
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from tests.reliability.support import wait_until
from tests.system.raw_client import RawWorker

Code = grpc.StatusCode
LAYOUT = layout_of(build_model("tiny", seed=0))
SAMPLES = 8  # eval_samples: what each evaluate task asks for


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("L", (8, 8)).save(out, format="PNG")
    return out.getvalue()


def _train_round(worker: RawWorker) -> str:
    """Take the round's task, download its weights and deliver a zero update; the task's id."""
    task = task_from_proto(worker.wait_task())
    worker.download(task.task_id)
    zeros = {n: torch.zeros(s.shape) for n, s in LAYOUT.specs(task.returns).items()}
    payload = serialization.encode(zeros, PayloadMeta(kind="delta", model="tiny", wire_round=task.round_index, parts=task.returns))
    assert worker.upload_messages(worker.update_messages(task, payload)).outcome == "accepted"
    return task.task_id


def _report(worker: RawWorker, task: pb.Task, **fields: object) -> None:
    report = {"task_id": task.task_id, "round": task.round, "frechet_distance": 12.5, "feature_extractor": "fmnist-classifier", "num_samples": SAMPLES}
    request = pb.EvaluationReport(session_id=worker.session_id, **{**report, **fields})  # type: ignore[arg-type]
    worker.stub.ReportEvaluation(request, timeout=10)


def _refused(coord: Coordinator, outcome: str) -> float:
    return coord.metrics.registry.get_sample_value("feddiff_refusals_total", {"rpc": "ReportEvaluation", "outcome": outcome}) or 0.0


def test_reports_that_do_not_fit_their_task_are_refused_with_their_own_status(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    checkpoint_dir = tmp_path / "ckpt"
    checkpoint_dir.mkdir()
    (checkpoint_dir / "samples").write_text("a file where the grids' folder would go")  # no grid can be written
    cfg = CoordinatorConfig(
        model="tiny", strategy="udec", rounds=1, min_workers=3, quorum=1.0, round_deadline=120.0, eval_samples=SAMPLES, share_samples=True,
        listen="localhost:0", metrics_port=-1, insecure=True, progress="off", checkpoint_dir=str(checkpoint_dir),
    )  # fmt: skip
    coord = Coordinator(cfg, Metrics()).start()
    try:
        with grpc.insecure_channel(coord.address) as channel:
            a, b, c = (RawWorker(channel, name) for name in "abc")
            for w in (a, b, c):
                w.join()
            train_task_of_a = _train_round(a)
            _train_round(b)
            _train_round(c)
            wait_until(lambda: coord.driver.state == "evaluating", "the evaluate phase", 30)
            ta, tb = a.wait_task(), b.wait_task()
            assert ta.kind == pb.Task.EVALUATE and ta.eval.num_samples == SAMPLES

            cases: list[tuple[dict[str, object], Code, str]] = [
                ({"frechet_distance": math.nan}, Code.INVALID_ARGUMENT, "bad_field"),  # the wire contract's bound, at the edge
                ({"frechet_distance": -1.0}, Code.INVALID_ARGUMENT, "bad_field"),
                ({"num_samples": SAMPLES + 1}, Code.INVALID_ARGUMENT, "bad_evaluation"),  # not what its task asked for
                ({"round": ta.round + 1}, Code.FAILED_PRECONDITION, "wrong_round"),
                ({"task_id": tb.task_id}, Code.PERMISSION_DENIED, "not_assigned"),  # b's task
                ({"task_id": train_task_of_a}, Code.FAILED_PRECONDITION, "late"),  # its training task, of a round that closed
                ({"task_id": f"e{ta.round + 5}-a"}, Code.FAILED_PRECONDITION, "wrong_round"),  # no task of the phase in progress
            ]
            for fields, code, reason in cases:
                before = _refused(coord, reason)
                with pytest.raises(grpc.RpcError) as refused:
                    _report(a, ta, **fields)
                assert (refused.value.code(), str(refused.value.details()).split(":")[0]) == (code, reason), fields
                assert _refused(coord, reason) == before + 1, fields

            _report(a, ta, sample_grid_png=_png())  # taken, though its grid cannot be written
            with pytest.raises(grpc.RpcError) as again:
                _report(a, ta)
            assert again.value.code() == Code.ALREADY_EXISTS

            b.stub.RejectTask(pb.RejectTaskRequest(session_id=b.session_id, task_id=tb.task_id, reason="out_of_memory", message="oom"), timeout=10)
            with pytest.raises(grpc.RpcError) as after_refusal:
                _report(b, tb)
            assert (after_refusal.value.code(), _refused(coord, "not_assigned")) == (Code.PERMISSION_DENIED, 2.0)

            _report(c, c.wait_task(), frechet_distance=20.0)  # the last answer: the phase ends at once
            wait_until(lambda: coord.driver.state == "done", "the end of the run", 30)
            status = a.stub.GetStatus(pb.StatusRequest(), timeout=10)
            assert dict(status.frechet_distance) == {"a": 12.5, "c": 20.0}
            assert coord.metrics.registry.get_sample_value("feddiff_fd", {"model": "a"}) == 12.5
    finally:
        coord.stop(grace=0)
    assert any("cannot write the sample grid of worker a" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info], "no refusal or failed write ends in a traceback"
