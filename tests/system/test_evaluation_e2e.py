"""Evaluation inside the federation, over gRPC with real processes: personalised models are scored where they
live (udec: each worker reports its own FD), the global model by the coordinator (full)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from feddiff.local import LocalCluster, metric_value, scrape, wait_for_state

pytestmark = pytest.mark.e2e

RUN = ["--model", "tiny", "--rounds", "1", "--epochs", "1", "--batch-size", "32", "--min-workers", "2"]
EVAL = ["--eval-samples", "64", "--eval-steps", "4", "--eval-final-sampler", "ddim"]


def _workers(cluster: LocalCluster, address: str) -> list:
    return cluster.shard_workers(address, 2, "--max-images", "128")


def _evaluations(workdir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (workdir / "checkpoints" / "rounds.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("kind") == "evaluation"]


def test_udec_workers_score_their_own_models(tmp_path: Path) -> None:
    with LocalCluster(tmp_path) as cluster:
        coord = cluster.coordinator("--insecure", "--strategy", "udec", *RUN, *EVAL, "--share-samples")
        workers = _workers(cluster, coord.ready["address"])
        status = wait_for_state(coord.ready["address"], "done", timeout=180, procs=[coord, *workers])
        metrics = scrape(coord.ready["metrics_port"])
        worker_metrics = [scrape(w.ready["metrics_port"]) for w in workers]

    [evaluation] = _evaluations(tmp_path)
    assert evaluation["models"] == "personalised"
    assert sorted(evaluation["fd"]) == ["client-0", "client-1"]
    fds = evaluation["fd"]
    assert all(math.isfinite(v) and v > 0 for v in fds.values())
    assert fds["client-0"] != fds["client-1"], "each worker scores its own model"
    assert evaluation["fd_mean"] == pytest.approx(sum(fds.values()) / 2)
    for i, m in enumerate(worker_metrics):
        assert metric_value(metrics, "feddiff_fd", model=f"client-{i}") == pytest.approx(fds[f"client-{i}"])
        assert metric_value(m, "feddiff_fd", model=f"client-{i}") == pytest.approx(fds[f"client-{i}"])
        assert Image.open(tmp_path / "workers" / f"client-{i}" / "samples" / "r0001.png").size[0] > 28
        assert Image.open(tmp_path / "checkpoints" / "samples" / f"client-{i}-r0001.png").size[0] > 28  # --share-samples
    assert status["frechet_distance"] == pytest.approx(fds)


def test_udec_without_share_samples_keeps_images_on_the_workers(tmp_path: Path) -> None:
    with LocalCluster(tmp_path) as cluster:
        coord = cluster.coordinator("--insecure", "--strategy", "udec", *RUN, *EVAL)
        workers = _workers(cluster, coord.ready["address"])
        wait_for_state(coord.ready["address"], "done", timeout=180, procs=[coord, *workers])
    assert len(_evaluations(tmp_path)[0]["fd"]) == 2
    assert not (tmp_path / "checkpoints" / "samples").exists()


def test_full_global_model_is_scored_by_the_coordinator(tmp_path: Path) -> None:
    with LocalCluster(tmp_path) as cluster:
        coord = cluster.coordinator("--insecure", "--strategy", "full", *RUN, *EVAL, "--eval-device", "cpu")
        workers = _workers(cluster, coord.ready["address"])
        wait_for_state(coord.ready["address"], "done", timeout=180, procs=[coord, *workers])
        metrics = scrape(coord.ready["metrics_port"])
    [evaluation] = _evaluations(tmp_path)
    assert evaluation["models"] == "global" and math.isfinite(evaluation["fd"]["global"])
    assert metric_value(metrics, "feddiff_fd", model="global") == pytest.approx(evaluation["fd"]["global"])
    assert (tmp_path / "checkpoints" / "samples" / "global-r0001.png").exists()
