"""A coordinator configured by a YAML file, with real processes: values that YAML 1.1 reads as strings
(`lr: 1e-4`, `min_workers: '1'`) are the numbers they spell and the run completes; a value that is no
setting's type stops the coordinator at start with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from feddiff.local import LocalCluster, metric_value, scrape, wait_for_state
from tests.reliability.support import ENV, image_folder

pytestmark = pytest.mark.e2e


def test_a_yaml_config_of_strings_runs_a_round(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.yaml"
    config.write_text("strategy: udec\nmodel: tiny\nrounds: 1\nmin_workers: '1'\nepochs: '1'\nbatch_size: 8\nlr: 1e-4\nround_deadline: '120'\n")
    images = image_folder(tmp_path / "images")
    with LocalCluster(tmp_path, env=ENV) as cluster:
        coord = cluster.coordinator("--insecure", "--config", str(config), "--progress", "log")
        worker = cluster.worker(coord.ready["address"], "w", "--insecure", "--data-dir", str(images), "--threads", "1")
        wait_for_state(coord.ready["address"], "done", 120, [coord, worker])
        metrics = scrape(coord.ready["metrics_port"])

    assert metric_value(metrics, "feddiff_updates_total", outcome="accepted") == 1
    assert "Traceback" not in coord.output() + worker.output()


def test_a_value_of_the_wrong_type_stops_the_coordinator_at_start_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.yaml"
    config.write_text("model: tiny\nmin_workers: 1.5\n")
    cmd = [sys.executable, "-m", "feddiff", "coordinator", "--insecure", "--config", str(config), "--listen", "127.0.0.1:0", "--metrics-port", "0"]

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, **ENV}, check=False)

    assert done.returncode == 2
    assert done.stderr == f"feddiff coordinator: error: min_workers (in {config}) = 1.5: expected an integer >= 1\n"
