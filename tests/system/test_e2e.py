"""End to end over gRPC with real processes on loopback: the model equals `feddiff simulate`'s, the metrics
equal fedcore's accounting, and a worker that joins mid-round waits for the next round."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from fedcore.federation.strategies import Strategy, account
from fedcore.model.parts import PART_ORDER
from fedcore.model.unet import build_model, layout_of
from fedcore.payload.serialization import load_file
from feddiff.cli import main
from feddiff.local import LocalCluster, metric_value, scrape, wait_for_state

pytestmark = pytest.mark.e2e

K, R = 3, 2
RUN = ["--model", "tiny", "--rounds", str(R), "--epochs", "1", "--batch-size", "32", "--seed", "7"]
DATA = ["--max-images", "144"]  # 48 images a client: a full batch of 32 and a partial one each round


def simulate(strategy: str, out: Path, *flags: str) -> dict[str, torch.Tensor]:
    """`feddiff simulate` through its CLI handler, in this process (torch is imported once, not once a run)."""
    assert main(["simulate", "--strategy", strategy, "--num-clients", str(K), *RUN, *DATA, "--threads", "1", "--out-dir", str(out), *flags]) == 0
    return load_file(out / f"global-r{R:04d}.safetensors")[0]


@pytest.mark.parametrize("strategy", [s.value for s in Strategy])
def test_grpc_run_equals_simulation_and_metrics_equal_accounting(strategy: str, tmp_path: Path) -> None:
    expected = simulate(strategy, tmp_path / "sim")
    with LocalCluster(tmp_path / "grpc") as cluster:
        coord = cluster.coordinator("--insecure", "--strategy", strategy, *RUN, "--min-workers", str(K), "--round-deadline", "120")
        address = coord.ready["address"]
        workers = cluster.shard_workers(address, K, *DATA)
        status = wait_for_state(address, "done", timeout=240, procs=[coord, *workers])
        coordinator_metrics = scrape(coord.ready["metrics_port"])
        worker_metrics = [scrape(w.ready["metrics_port"]) for w in workers]

    got = load_file(tmp_path / "grpc" / "checkpoints" / "final.safetensors")[0]
    assert got.keys() == expected.keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-6, f"{strategy}: gRPC model differs from the simulation by {worst}"

    acct = account(Strategy(strategy), layout_of(build_model("tiny")).sizes, K, R, seed=7)
    for direction, counts in (("down", acct.traffic.down), ("up", acct.traffic.up)):
        for part in PART_ORDER:
            want = counts[part]
            assert metric_value(coordinator_metrics, "feddiff_parameters_total", direction=direction, part=part.value) == want
            assert sum(metric_value(m, "feddiff_parameters_total", direction=direction, part=part.value) for m in worker_metrics) == want
    assert metric_value(coordinator_metrics, "feddiff_full_fedavg_parameters_total") == acct.full_fedavg
    assert metric_value(coordinator_metrics, "feddiff_round") == R
    assert metric_value(coordinator_metrics, "feddiff_updates_total", outcome="accepted") == K * R
    assert status["parameters_exchanged"] == str(acct.traffic.total)
    # Bytes: what the coordinator sent is what the workers received, and the wire adds under 1%.
    for direction in ("down", "up"):
        payload = sum(metric_value(coordinator_metrics, "feddiff_payload_bytes_total", direction=direction, part=p.value) for p in PART_ORDER)
        assert payload == sum(
            sum(metric_value(m, "feddiff_payload_bytes_total", direction=direction, part=p.value) for p in PART_ORDER) for m in worker_metrics
        )
        wire = metric_value(coordinator_metrics, "feddiff_wire_bytes_total", direction=direction)
        assert payload < wire <= payload * 1.01


def test_worker_joining_mid_round_waits_for_the_next_round(tmp_path: Path) -> None:
    with LocalCluster(tmp_path) as cluster:
        # client-1 is frozen while the late worker starts: these timeouts outlast a slow start
        patient = ["--heartbeat-timeout", "120", "--download-idle-timeout", "120", "--upload-idle-timeout", "120"]
        run = ["--strategy", "udec", "--model", "tiny", "--rounds", "2", "--epochs", "1", "--batch-size", "16", "--min-workers", "2"]
        coord = cluster.coordinator("--insecure", *run, *patient)
        address = coord.ready["address"]
        first = cluster.shard_workers(address, 3, "--max-images", "300", count=2)
        wait_for_state(address, "training", timeout=60, procs=[coord, *first])
        # frozen before it can upload (it has yet to download and train 100 images): round 1 stays open
        os.kill(first[1].proc.pid, signal.SIGSTOP)
        try:
            late = cluster.shard_worker(address, 2, 3, "--max-images", "300")
            joined = _wait_until_known(address, "client-2")
        finally:
            os.kill(first[1].proc.pid, signal.SIGCONT)
        assert joined["completed_rounds"] == 0 and joined["state"] == "training", "the late worker must join during round 1"
        wait_for_state(address, "done", timeout=240, procs=[coord, *first, late])
        rounds = [json.loads(line) for line in (tmp_path / "checkpoints" / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["participants"] == ["client-0", "client-1"], "the late worker must not enter the round in progress"
    assert rounds[1]["participants"] == ["client-0", "client-1", "client-2"]
    # Its first round is its first contact: it received the whole model, the others only the decoder.
    sizes = layout_of(build_model("tiny")).sizes
    assert rounds[1]["parameters"]["down"]["encoder"] == sizes[PART_ORDER[0]]


def _wait_until_known(address: str, worker_id: str, timeout: float = 60.0) -> dict:
    import time

    from feddiff.local import status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = status(address)
        if any(w["worker_id"] == worker_id for w in s["workers"]):
            return s
        time.sleep(0.05)
    raise TimeoutError(f"{worker_id} never joined")
