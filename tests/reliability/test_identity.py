"""One worker id, one live worker: a second installation claiming a live worker's id is refused with
ALREADY_EXISTS and counted, while the first keeps its session and trains on; a restart of the same
installation takes its session over at once; two processes on one state dir are refused at start."""

from __future__ import annotations

import functools
import json
import logging
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from feddiff.local import LocalCluster, wait_for_state
from tests.reliability.support import DATA, ENV, LIVENESS, RUN, free_port, metric, rounds_log, start_run, wait_until
from tests.system.raw_client import RawWorker
from worker.metrics import Metrics as WorkerMetrics
from worker.state_dir import IDENTITY_FILE, StateDir

TOKEN = "token-of-hospital-1"
FIRST, SECOND = "a" * 32, "b" * 32  # installation ids


@pytest.fixture(params=["insecure", "tokens"])
def coordinator(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Coordinator, tuple[tuple[str, str], ...]]]:
    """A coordinator waiting for workers (no round starts), plain or with worker tokens; the metadata a
    caller holding hospital-1's credentials sends."""
    settings: dict[str, Any] = {}
    metadata: tuple[tuple[str, str], ...] = ()
    if request.param == "tokens":
        (tmp_path / "tokens.json").write_text(json.dumps({"hospital-1": TOKEN}))
        settings["tokens_file"] = str(tmp_path / "tokens.json")
        metadata = (("authorization", f"Bearer {TOKEN}"),)
    cfg = CoordinatorConfig(
        model="tiny", rounds=1, min_workers=3, listen="localhost:0", metrics_port=-1, insecure=True, progress="off",
        checkpoint_dir=str(tmp_path / "ckpt"), **settings,
    )  # fmt: skip
    coord = Coordinator(cfg, Metrics()).start()
    try:
        yield coord, metadata
    finally:
        coord.stop(grace=0)


def _joins(coord: Coordinator, outcome: str) -> float:
    return coord.metrics.registry.get_sample_value("feddiff_joins_total", {"outcome": outcome}) or 0.0


def test_a_second_installation_of_a_live_worker_id_is_refused_counted_and_the_first_keeps_its_session(
    coordinator: tuple[Coordinator, tuple[tuple[str, str], ...]],
) -> None:
    coord, metadata = coordinator
    with grpc.insecure_channel(coord.address) as channel:
        first = RawWorker(channel, "hospital-1", metadata=metadata, installation_id=FIRST, instance_id="p1")
        twin = RawWorker(channel, "hospital-1", metadata=metadata, installation_id=SECOND, instance_id="p2")
        first.join()

        with pytest.raises(grpc.RpcError) as refused:
            twin.join()

        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert (refused.value.details() or "").startswith(
            f"duplicate_worker: worker id 'hospital-1' is held by a live session of another installation (installation '{FIRST[:12]}'"
        )
        assert (_joins(coord, "accepted"), _joins(coord, "duplicate_worker")) == (1, 1)
        first.stub.Heartbeat(pb.HeartbeatRequest(session_id=first.session_id), timeout=10, metadata=metadata)
        assert [(r.worker_id, r.info.installation_id) for r in coord.registry.connected()] == [("hospital-1", FIRST)]

        # Once the first one has left, the identity is free.
        first.stub.Leave(pb.LeaveRequest(session_id=first.session_id), timeout=10, metadata=metadata)
        twin.join()
        assert _joins(coord, "accepted") == 2
        assert [r.info.installation_id for r in coord.registry.connected()] == [SECOND]


def _join_after(barrier: threading.Barrier, worker: RawWorker) -> grpc.RpcError | None:
    """Join once every thread of `barrier` is ready; the refusal, or None."""
    barrier.wait(timeout=10)
    try:
        worker.join()
    except grpc.RpcError as e:
        return e
    return None


def test_two_installations_joining_as_one_id_at_once_get_one_session_and_one_refusal(
    coordinator: tuple[Coordinator, tuple[tuple[str, str], ...]],
) -> None:
    """Two worker processes started together under one --worker-id (a copied config): their joins race. Each
    time exactly one gets the id; the other is refused with ALREADY_EXISTS naming the id and the winner's
    installation, and the winner's session goes on untouched."""
    coord, metadata = coordinator
    attempts = 10
    with grpc.insecure_channel(coord.address) as channel, ThreadPoolExecutor(2) as pool:
        for attempt in range(attempts):
            twins = [RawWorker(channel, "hospital-1", metadata=metadata, installation_id=i, instance_id=f"p{attempt}-{i[0]}") for i in (FIRST, SECOND)]
            outcomes = list(pool.map(functools.partial(_join_after, threading.Barrier(2)), twins))

            [(winner, _)] = [(w, e) for w, e in zip(twins, outcomes, strict=True) if e is None]
            [refused] = [e for e in outcomes if e is not None]
            assert refused.code() == grpc.StatusCode.ALREADY_EXISTS
            assert (refused.details() or "").startswith(
                f"duplicate_worker: worker id 'hospital-1' is held by a live session of another installation (installation '{winner.installation_id[:12]}'"
            )
            winner.stub.Heartbeat(pb.HeartbeatRequest(session_id=winner.session_id), timeout=10, metadata=metadata)
            assert [(r.worker_id, r.info.installation_id, r.info.instance_id) for r in coord.registry.connected()] == [
                ("hospital-1", winner.installation_id, winner.instance_id)
            ]
            winner.stub.Leave(pb.LeaveRequest(session_id=winner.session_id), timeout=10, metadata=metadata)  # the id is free for the next pair
    assert (_joins(coord, "accepted"), _joins(coord, "duplicate_worker")) == (attempts, attempts)


def test_a_restart_of_the_same_installation_takes_its_session_over_at_once(
    coordinator: tuple[Coordinator, tuple[tuple[str, str], ...]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "feddiff.coordinator")
    coord, metadata = coordinator
    with grpc.insecure_channel(coord.address) as channel:
        before = RawWorker(channel, "hospital-1", metadata=metadata, installation_id=FIRST, instance_id="p1")
        before.join()
        after = RawWorker(channel, "hospital-1", metadata=metadata, installation_id=FIRST, instance_id="p2")

        after.join()

        with pytest.raises(grpc.RpcError) as ended:
            before.stub.Heartbeat(pb.HeartbeatRequest(session_id=before.session_id), timeout=10, metadata=metadata)
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        after.stub.Heartbeat(pb.HeartbeatRequest(session_id=after.session_id), timeout=10, metadata=metadata)
        assert (_joins(coord, "accepted"), _joins(coord, "duplicate_worker")) == (2, 0)
    assert "worker hospital-1 joined after a restart, ending its earlier session" in caplog.text


def test_installation_and_instance_ids_out_of_range_are_refused(coordinator: tuple[Coordinator, tuple[tuple[str, str], ...]]) -> None:
    coord, metadata = coordinator
    with grpc.insecure_channel(coord.address) as channel:
        cases: list[dict[str, Any]] = [{"installation_id": "x" * 129}, {"instance_id": "../p"}]
        for fields in cases:
            with pytest.raises(grpc.RpcError) as refused:
                RawWorker(channel, "hospital-1", metadata=metadata, **fields).join()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and (refused.value.details() or "").startswith("bad_worker_info: ")
    assert _joins(coord, "bad_worker_info") == 2


# --- real processes ----------------------------------------------------------------------------------------
@pytest.mark.faults
@pytest.mark.e2e
def test_a_second_worker_process_with_the_same_worker_id_is_refused_and_the_first_trains_to_the_end(tmp_path: Path) -> None:
    """Two processes run as client-1 on different shards and state dirs; the one that comes second is refused
    (and keeps retrying), the first one takes part in every round."""
    rounds_total = 3
    with LocalCluster(tmp_path, env=ENV) as cluster:
        args = ["--insecure", *RUN, "--rounds", str(rounds_total), "--min-workers", "2", "--round-deadline", "60", *LIVENESS]
        coord, (client_0, client_1) = start_run(cluster, args, [[], []])
        address, coord_port = coord.ready["address"], coord.ready["metrics_port"]
        wait_until(lambda: metric(coord_port, "feddiff_joins_total", outcome="accepted") >= 2, "both workers joined", 60, [coord, client_0, client_1])
        twin = cluster.worker(address, "client-1", "--insecure", "--client-index", "0", "--num-clients", "2", *DATA, name="client-1-twin")
        wait_until(
            lambda: metric(coord_port, "feddiff_joins_total", outcome="duplicate_worker") >= 1, "the twin refused", 60, [coord, client_0, client_1, twin]
        )

        wait_for_state(address, "done", 120, [coord, client_0, client_1, twin])
        assert client_1.proc.wait(30) == 0, client_1.output()[-2000:]
        # Read before the first one's session times out (3 s): then the twin may take the identity over.
        coordinator_joins = {o: metric(coord_port, "feddiff_joins_total", outcome=o) for o in ("accepted", "duplicate_worker")}
        twin_refusals = metric(twin.ready["metrics_port"], "feddiff_joins_total", outcome="duplicate_worker")
        coord_log = coord.output()
        assert twin.stop(signal.SIGTERM) == 0
        twin_log = twin.output()

    installation = json.loads((tmp_path / "workers" / "client-1" / IDENTITY_FILE).read_text())["installation_id"]
    assert coordinator_joins["accepted"] == 2 and coordinator_joins["duplicate_worker"] >= 1
    assert twin_refusals >= 1
    assert coord_log.count("worker client-1 joined") == 1, "the first one kept its session all along"
    assert (
        f"join refused, another worker runs under this id: duplicate_worker: worker id 'client-1' is held by a live session of another installation (installation '{installation[:12]}'"
        in twin_log
    )
    assert "coordinator unavailable" not in twin_log
    assert [r["participants"] for r in rounds_log(tmp_path / "checkpoints")] == [["client-0", "client-1"]] * rounds_total
    assert sorted(p.name for p in (tmp_path / "workers" / "client-1").glob("private-r*")) == ["private-r0002.safetensors", "private-r0003.safetensors"]
    assert list((tmp_path / "workers" / "client-1-twin").glob("private-r*")) == [], "the twin never trained"


@pytest.mark.faults
@pytest.mark.e2e
def test_a_second_worker_process_on_the_same_state_dir_is_refused_at_start(tmp_path: Path) -> None:
    nobody = f"127.0.0.1:{free_port()}"  # the lock is taken before any coordinator is dialled
    with LocalCluster(tmp_path, env=ENV) as cluster:
        first = cluster.worker(nobody, "client-0", "--insecure", "--client-index", "0", "--num-clients", "2", *DATA)
        state_dir = tmp_path / "workers" / "client-0"

        with pytest.raises(RuntimeError) as refused:
            cluster.worker(nobody, "client-1", "--insecure", "--client-index", "1", "--num-clients", "2", *DATA, "--state-dir", str(state_dir), name="same-dir")

        assert first.proc.poll() is None, "the first one runs on"
    assert "exited with 2 before it was ready" in str(refused.value)
    assert f"feddiff worker: error: --state-dir '{state_dir}' is in use by another worker process (pid {first.proc.pid})" in str(refused.value)
    assert json.loads((state_dir / IDENTITY_FILE).read_text())["worker_id"] == "client-0", "the refused one wrote nothing"
    StateDir.open(state_dir, "", WorkerMetrics()).close()  # free again once the first one ended
