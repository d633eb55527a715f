"""Hostile workers whose traffic is well-formed, against a real coordinator (tiny model, full strategy, loopback):
an update of absurd values, an aggregate that would overflow, absurd FedAvg weight claims, a scaled update under
norm clipping, oversized join fields, a registry of departed workers and a status reply of many workers. Each
checks the global model: byte-identical to a run where the hostile worker stays silent, or changed by exactly
what the bounded average allows; and the health service answers within 100 ms throughout."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator
from fedcore.federation.aggregate import RunningAggregate
from fedcore.federation.client import TrainTask
from fedcore.model.parts import ALL_PARTS, PART_ORDER, Part
from fedcore.model.unet import build_model, layout_of
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta, PayloadReader
from fedcore.wire.bounds import MAX_STATUS_WORKERS
from fedcore.wire.convert import task_from_proto
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2_grpc as pb_grpc
from feddiff.cli import main
from tests.reliability.support import HealthProbe
from tests.system.raw_client import RawWorker

pytestmark = pytest.mark.badinput

MODEL = "tiny"
LAYOUT = layout_of(build_model(MODEL, seed=0))
IMAGES = 64  # each worker's declared images: one step of batch 128 per epoch, so values up to 8 x lr pass
CHUNK = 64 << 10
DEADLINE = 3.0  # seconds a round waits for the hostile worker, then closes with the honest one (quorum: 1 of 2)
BOTH: dict[str, Any] = {"round_deadline": 60.0}  # where both workers deliver: the round closes as the second update is in
HEALTH_BUDGET = 0.1  # seconds the median health check may take, throughout every test (each one: PROBE_TIMEOUT)
Code = grpc.StatusCode
Tensors = dict[str, torch.Tensor]


# --- payloads and models -----------------------------------------------------------------------------------
def _delta(seed: int, scale: float = 1e-3) -> Tensors:
    """An update of the whole model; at 1e-3 within what one step at lr 1e-3 can reach (8e-3)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s.shape, generator=g) * scale for n, s in LAYOUT.specs(ALL_PARTS).items()}


def _payload(task: TrainTask, tensors: Tensors | bytes) -> bytes:
    """An update of `tensors` for `task` (bytes: encoded already, for round 0 of every part)."""
    if isinstance(tensors, bytes):
        return tensors
    return serialization.encode(tensors, PayloadMeta(kind="delta", model=MODEL, wire_round=task.round_index, parts=task.returns))


def _round_zero(tensors: Tensors) -> bytes:
    """`tensors` encoded ahead of the round, so that the upload starts as soon as the task is in."""
    return serialization.encode(tensors, PayloadMeta(kind="delta", model=MODEL, wire_round=0, parts=ALL_PARTS))


def _bits(state: Tensors) -> dict[str, bytes]:
    return {n: t.contiguous().view(torch.int32).numpy().tobytes() for n, t in sorted(state.items())}


def _averaged(before: Tensors, updates: list[tuple[Tensors, float]], clip: dict[Part, float] | None = None) -> Tensors:
    """`before` plus the streaming FedAvg of `updates` (delta, weight), folded as the coordinator folds them."""
    reader = PayloadReader(LAYOUT, kind="delta", wire_round=0, model=MODEL)
    aggregate = RunningAggregate(LAYOUT, ALL_PARTS)
    for tensors, weight in updates:
        aggregate.fold_decoded(reader.read(bytearray(_round_zero(tensors)), ALL_PARTS), weight, clip)
    state = {n: t.clone() for n, t in before.items()}
    aggregate.apply_to(state)
    return state


def _norms(tensors: Tensors) -> dict[Part, float]:
    """Each part's L2 norm as the coordinator takes it when it clips (RunningAggregate.fold_decoded)."""
    reader = PayloadReader(LAYOUT, kind="delta", wire_round=0, model=MODEL)
    return RunningAggregate(LAYOUT, ALL_PARTS).fold_decoded(reader.read(bytearray(_round_zero(tensors)), ALL_PARTS), 1.0, {})


def _part_norm(tensors: Tensors, part: Part) -> float:
    return float(torch.cat([tensors[n].double().flatten() for n in LAYOUT.tensors[part]]).norm())


def _in_windows(call: grpc.UnaryUnaryMultiCallable[Any, Any], requests: list, window: int = 32) -> list:
    """`call.future` on each request, at most `window` in flight (of a thousand concurrent calls on one
    channel, about half end CANCELLED: a limit of the transport, not of these checks)."""
    out = []
    for start in range(0, len(requests), window):
        futures = [call.future(r, timeout=60) for r in requests[start : start + window]]
        out += [f.result() for f in futures]
    return out


def _wait_for(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --- a coordinator with an honest and a hostile worker ------------------------------------------------------
@dataclass
class Run:
    coord: Coordinator
    channel: grpc.Channel
    checkpoint_dir: Path
    honest: RawWorker
    hostile: RawWorker
    honest_task: TrainTask = field(init=False)  # set by next_tasks
    hostile_task: TrainTask = field(init=False)

    def metric(self, name: str, **labels: str) -> float:
        return self.coord.metrics.registry.get_sample_value(name, labels) or 0.0

    def next_tasks(self) -> Tensors:
        """Both workers' tasks of the next round attempt; the global model it starts from."""
        self.honest_task, self.hostile_task = task_from_proto(self.honest.wait_task()), task_from_proto(self.hostile.wait_task())
        return {n: t.clone() for n, t in self.coord.federation.global_state.items()}

    def send(self, worker: RawWorker, task: TrainTask, tensors: Tensors | bytes, **report: Any) -> pb.UploadResponse:
        return worker.upload_messages(worker.update_messages(task, _payload(task, tensors), chunk_size=CHUNK, **report), timeout=30)

    def refused(self, worker: RawWorker, task: TrainTask, tensors: Tensors | bytes) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as e:
            self.send(worker, task, tensors)
        return e.value

    def done(self) -> None:
        _wait_for(lambda: self.coord.driver.state == "done", "the run to finish")

    def global_file(self, completed_rounds: int = 1) -> bytes:
        return (self.checkpoint_dir / f"global-r{completed_rounds:04d}.safetensors").read_bytes()


@contextmanager
def _run(tmp_path: Path, *, hostile_images: int = IMAGES, **settings: Any) -> Iterator[Run]:
    """A coordinator, its health asked every 50 ms throughout, and both workers (not joined yet)."""
    values: dict[str, Any] = {
        "model": MODEL, "strategy": "full", "rounds": 1, "epochs": 1, "lr": 1e-3, "min_workers": 2, "quorum": 0.5,
        "round_deadline": DEADLINE, "listen": "localhost:0", "metrics_port": -1, "insecure": True, "progress": "off",
        "checkpoint_dir": str(tmp_path), **settings,
    }  # fmt: skip
    coord = Coordinator(CoordinatorConfig(**values), Metrics()).start()
    try:
        with grpc.insecure_channel(coord.address) as channel, HealthProbe(coord.address) as probe:
            run = Run(coord, channel, tmp_path, RawWorker(channel, "honest", IMAGES), RawWorker(channel, "hostile", hostile_images))
            yield run
            time.sleep(10 * probe.every)  # a few more checks after the test's last call, however short it was
        probe.assert_answered_within(HEALTH_BUDGET)
    finally:
        coord.stop(grace=0)


HONEST = _delta(seed=2)
HONEST_R0 = _round_zero(HONEST)


@pytest.fixture(scope="module")
def silent_run(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The global model after a round in which the hostile worker takes its task and stays silent."""
    with _run(tmp_path_factory.mktemp("silent")) as run:
        run.honest.join()
        run.hostile.join()
        run.next_tasks()
        run.send(run.honest, run.honest_task, HONEST_R0)
        run.done()
        return run.global_file()


# --- absurd values, and an aggregate that would overflow ----------------------------------------------------
def test_an_update_of_1e38_everywhere_is_refused_and_the_model_is_the_silent_runs(tmp_path: Path, silent_run: bytes) -> None:
    with _run(tmp_path) as run:
        run.honest.join()
        run.hostile.join()
        bomb = _round_zero({n: torch.full(t.shape, 1e38) for n, t in HONEST.items()})
        before = run.next_tasks()

        e = run.refused(run.hostile, run.hostile_task, bomb)
        assert e.code() == Code.INVALID_ARGUMENT and (e.details() or "").startswith("out_of_bounds: tensor "), e.details()
        assert "holds a value of magnitude 1e+38; an update of this task holds at most 0.008" in (e.details() or "")
        assert _bits(run.coord.federation.global_state) == _bits(before), "refused before it was folded"
        run.send(run.honest, run.honest_task, HONEST_R0)
        run.done()

        assert run.metric("feddiff_updates_total", outcome="out_of_bounds") == 1
        assert run.global_file() == silent_run
        assert all(torch.isfinite(t).all() for t in run.coord.federation.global_state.values())


def test_an_aggregate_that_would_overflow_is_not_committed_and_the_rerun_is_the_silent_runs(tmp_path: Path, silent_run: bytes) -> None:
    bomb = _round_zero({n: torch.full(t.shape, 1e38) for n, t in HONEST.items()})
    with _run(tmp_path, max_delta_value=3e38, **BOTH) as run:  # an operator's bound loose enough to let 1e38 through
        run.honest.join()
        run.hostile.join()
        before = run.next_tasks()
        assert run.send(run.hostile, run.hostile_task, bomb).outcome == "accepted"
        run.send(run.honest, run.honest_task, HONEST_R0)  # both in: 64 x 1e38 overflows

        _wait_for(lambda: run.metric("feddiff_round_attempts_total", outcome="non_finite") == 1, "the attempt to fail")
        assert run.coord.federation.completed_rounds == 0
        assert _bits(run.coord.federation.global_state) == _bits(before), "the previous global model stays"
        assert not (run.checkpoint_dir / "global-r0001.safetensors").exists(), "nothing non-finite was written"
        again = run.next_tasks()  # the round is run again; the hostile worker sends nothing this time
        assert run.honest_task.task_id.startswith("r0.2-") and _bits(again) == _bits(before)
        run.send(run.honest, run.honest_task, HONEST_R0)
        reject = pb.RejectTaskRequest(session_id=run.hostile.session_id, task_id=run.hostile_task.task_id, reason="other")
        run.hostile.stub.RejectTask(reject, timeout=10)  # ends the attempt at once instead of at the deadline
        run.done()

        assert run.global_file() == silent_run
        assert json.loads((run.checkpoint_dir / "state.json").read_text())["tally"]["round_attempts"]["non_finite"] == 1


# --- FedAvg weight claims ------------------------------------------------------------------------------------
@pytest.mark.parametrize("claim", [10**12, 2**64 - 1])
def test_a_claim_beyond_the_contract_is_refused_at_join(claim: int, tmp_path: Path) -> None:
    with _run(tmp_path, hostile_images=claim) as run:
        with pytest.raises(grpc.RpcError) as e:
            run.hostile.join()

        assert e.value.code() == Code.INVALID_ARGUMENT
        assert e.value.details() == f"bad_worker_info: WorkerInfo.num_examples is {claim}: expected 1..2^32-1"
        assert run.metric("feddiff_joins_total", outcome="bad_worker_info") == 1
        assert run.coord.registry.all() == []


HOSTILE = _delta(seed=3)


@pytest.mark.parametrize(
    ("settings", "bound"),
    [
        pytest.param({}, "share", id="share-cap-by-default"),
        pytest.param({"max_weight_share": 1.0, "worker_sizes": {"honest": IMAGES, "hostile": IMAGES}}, "registered", id="registered-sizes"),
    ],
)
def test_the_largest_claim_the_contract_allows_weighs_no_more_than_the_honest_worker(settings: dict, bound: str, tmp_path: Path) -> None:
    claim = 2**32 - 1
    with _run(tmp_path, hostile_images=claim, **BOTH, **settings) as run:
        run.honest.join()
        run.hostile.join()
        before = run.next_tasks()
        run.send(run.hostile, run.hostile_task, HOSTILE, mean_loss=999.0)  # reports one epoch of its claim
        run.send(run.honest, run.honest_task, HONEST)
        run.done()

        assert run.metric("feddiff_weights_bounded_total", bound=bound) == 1
        expected = _averaged(before, [(HOSTILE, IMAGES), (HONEST, IMAGES)])  # as if it had claimed the honest 64
        assert _bits(run.coord.federation.global_state) == _bits(expected)
        record = json.loads((run.checkpoint_dir / "rounds.jsonl").read_text().splitlines()[0])
        assert record["weights"] == {"honest": IMAGES, "hostile": IMAGES}
        assert record["mean_loss"] == pytest.approx((999.0 + 0.5) / 2), "its report weighs what its update weighs"


def test_a_worker_without_a_registered_size_is_refused(tmp_path: Path) -> None:
    with _run(tmp_path, worker_sizes={"honest": IMAGES, "hostile": IMAGES}) as run:
        with pytest.raises(grpc.RpcError) as e:
            RawWorker(run.channel, "stranger").join()

        assert (e.value.code(), (e.value.details() or "").split(":")[0]) == (Code.PERMISSION_DENIED, "unregistered")
        assert run.metric("feddiff_joins_total", outcome="unregistered") == 1
        assert [r.worker_id for r in run.coord.registry.all()] == []


# --- norm clipping -------------------------------------------------------------------------------------------
def test_a_scaled_update_cannot_dominate_a_round_with_a_fixed_clipping_bound(tmp_path: Path) -> None:
    bound = 0.5  # above the honest update's norm per part (about 0.1 to 0.35), far below the scaled one's
    scaled = {n: t * 1e6 for n, t in HOSTILE.items()}
    with _run(tmp_path, clip_norm=bound, max_delta_value=1e30, **BOTH) as run:  # the value bound alone would refuse it
        run.honest.join()
        run.hostile.join()
        before = run.next_tasks()
        run.send(run.honest, run.honest_task, HONEST)
        run.send(run.hostile, run.hostile_task, scaled)
        run.done()

        state = run.coord.federation.global_state
        assert _bits(state) == _bits(_averaged(before, [(HONEST, IMAGES), (scaled, IMAGES)], dict.fromkeys(PART_ORDER, bound)))
        change = {n: state[n] - before[n] for n in state}
        for p in PART_ORDER:
            assert _part_norm(HONEST, p) < bound < _part_norm(scaled, p) / 1e4, p
            assert _part_norm(change, p) <= (_part_norm(HONEST, p) + bound) / 2 * (1 + 1e-4), p
            assert run.metric("feddiff_clipped_updates_total", part=p.value) == 1


def test_adaptive_clipping_holds_a_scaled_update_to_twice_the_last_rounds_median(tmp_path: Path) -> None:
    with _run(tmp_path, rounds=2, clip_multiplier=2.0, max_delta_value=1e30, **BOTH) as run:
        run.honest.join()
        run.hostile.join()
        run.next_tasks()
        run.send(run.honest, run.honest_task, HONEST)
        run.send(run.hostile, run.hostile_task, HOSTILE)  # round 1: an honest-sized update
        _wait_for(lambda: run.coord.federation.completed_rounds == 1, "round 1")
        before = run.next_tasks()
        second = _delta(seed=4)
        scaled = {n: t * 1e6 for n, t in HOSTILE.items()}
        run.send(run.honest, run.honest_task, second)
        run.send(run.hostile, run.hostile_task, scaled)
        run.done()

        first_norms = (_norms(HONEST), _norms(HOSTILE))
        bounds = {p: 2.0 * min(n[p] for n in first_norms) for p in PART_ORDER}  # twice the lower median of two: the smaller
        state = run.coord.federation.global_state
        change = {n: state[n] - before[n] for n in state}
        assert _bits(state) == _bits(_averaged(before, [(second, IMAGES), (scaled, IMAGES)], bounds))
        for p in PART_ORDER:
            assert _part_norm(change, p) <= (_part_norm(second, p) + bounds[p]) / 2 * (1 + 1e-4), p
        record = json.loads((run.checkpoint_dir / "rounds.jsonl").read_text().splitlines()[1])
        assert set(record["clipped"]) == {"hostile"} and set(record["clipped"]["hostile"]) == {p.value for p in PART_ORDER}


# --- join fields, departed workers, a status reply of many workers -------------------------------------------
def test_a_1mb_device_string_is_refused_naming_the_field_and_status_keeps_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with _run(tmp_path) as run:
        before = {n: t.clone() for n, t in run.coord.federation.global_state.items()}
        with caplog.at_level(logging.INFO, logger="feddiff.coordinator"):
            for i in range(5):
                info = pb.WorkerInfo(worker_id=f"big-{i}", device="x" * 1_000_000, num_examples=IMAGES)
                with pytest.raises(grpc.RpcError) as e:
                    pb_grpc.CoordinatorStub(run.channel).Join(pb.JoinRequest(worker=info), timeout=10)
                assert e.value.code() == Code.INVALID_ARGUMENT
                assert e.value.details() == "bad_worker_info: WorkerInfo.device has 1000000 characters: expected 0..64 printable characters"
        status = pb_grpc.CoordinatorStub(run.channel).GetStatus(pb.StatusRequest(), timeout=10)

        assert main(["status", "--coordinator", run.coord.address, "--insecure"]) == 0
        assert "workers: 0 connected of 0 known" in capsys.readouterr().out
        assert list(status.workers) == [] and run.metric("feddiff_joins_total", outcome="bad_worker_info") == 5
        assert max(len(r.getMessage()) for r in caplog.records) < 1000, "no megabyte in the log"
        assert _bits(run.coord.federation.global_state) == _bits(before)


def test_departed_workers_are_forgotten_after_the_retention_time(tmp_path: Path) -> None:
    with _run(tmp_path, departed_retention=0.5, heartbeat_timeout=600.0, min_workers=1000) as run:
        before = {n: t.clone() for n, t in run.coord.federation.global_state.items()}
        stub = pb_grpc.CoordinatorStub(run.channel)
        stayer = RawWorker(run.channel, "stayer")
        stayer.join()
        joined = _in_windows(stub.Join, [pb.JoinRequest(worker=pb.WorkerInfo(worker_id=f"gone-{i}", num_examples=IMAGES)) for i in range(500)])
        assert stub.GetStatus(pb.StatusRequest(), timeout=10).workers_connected == 501
        _in_windows(stub.Leave, [pb.LeaveRequest(session_id=j.session_id) for j in joined])

        _wait_for(lambda: len(run.coord.registry.all()) == 1, "the departed workers to be forgotten", timeout=30)
        status = stub.GetStatus(pb.StatusRequest(), timeout=10)

        assert [(w.worker_id, w.connected) for w in status.workers] == [("stayer", True)] and status.workers_omitted == 0
        with pytest.raises(grpc.RpcError) as e:
            stub.Heartbeat(pb.HeartbeatRequest(session_id=joined[0].session_id), timeout=10)
        assert e.value.code() == Code.UNAUTHENTICATED
        stayer.stub.Heartbeat(pb.HeartbeatRequest(session_id=stayer.session_id), timeout=10)
        assert _bits(run.coord.federation.global_state) == _bits(before)


def test_status_lists_at_most_a_thousand_workers_and_counts_the_rest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = MAX_STATUS_WORKERS + 5
    with _run(tmp_path, min_workers=10 * n, heartbeat_timeout=600.0) as run:
        before = {n: t.clone() for n, t in run.coord.federation.global_state.items()}
        stub = pb_grpc.CoordinatorStub(run.channel)
        largest = [
            pb.JoinRequest(
                worker=pb.WorkerInfo(
                    worker_id=f"w{i:04d}-" + "x" * 122,
                    device="d" * 64,
                    gpu_name="g" * 128,
                    num_examples=2**32 - 1,
                    software_version="v" * 128,
                    installation_id="i" * 128,
                    instance_id="j" * 128,
                )
            )
            for i in range(n)
        ]  # fmt: skip: every string at its bound
        assert all(j.session_id for j in _in_windows(stub.Join, largest))

        status = stub.GetStatus(pb.StatusRequest(), timeout=10)
        assert main(["status", "--coordinator", run.coord.address, "--insecure"]) == 0
        text = capsys.readouterr().out
        assert main(["status", "--coordinator", run.coord.address, "--insecure", "--json"]) == 0
        reply = json.loads(capsys.readouterr().out)

        assert (len(status.workers), status.workers_omitted, status.workers_connected) == (MAX_STATUS_WORKERS, 5, n)
        assert status.ByteSize() < 1 << 20, "far below gRPC's 4 MiB message limit"
        assert f"workers: {n} connected of {n} known" in text and "... and 5 more not listed" in text
        assert len(reply["workers"]) == MAX_STATUS_WORKERS and reply["workers_omitted"] == 5
        assert _bits(run.coord.federation.global_state) == _bits(before)
