"""Workers that cannot run their tasks, with real processes: their images are 32x32 and the federation
trains the 28x28 `tiny` model. Each refuses each task once (RejectTask) and backs off, each attempt ends
as soon as both refused, and after `--max-failed-attempts` the run stops with the reason: the coordinator
says so in its status (and, with --exit-when-done, in its exit status), the workers are told and exit 1."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from feddiff.local import LocalCluster, status, wait_for_state
from tests.reliability.support import ENV, image_folder, metric, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

DEADLINE = 300  # seconds: no attempt here may wait for it
RUN = [
    "--insecure",
    "--model",
    "tiny",
    "--rounds",
    "2",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--round-deadline",
    str(DEADLINE),
    "--max-failed-attempts",
    "3",
    "--progress",
    "log",
]
MESSAGE = "local images (1, 32, 32) do not fit model 'tiny', which takes (1, 28, 28) (channels, height, width)"


def test_workers_that_refuse_every_task_stop_the_run_after_three_attempts(tmp_path: Path) -> None:
    images = image_folder(tmp_path / "images", size=32)
    with LocalCluster(tmp_path, env=ENV) as cluster:
        coord = cluster.coordinator(*RUN, "--min-workers", "2")
        address, port = coord.ready["address"], coord.ready["metrics_port"]
        start = time.monotonic()
        with ThreadPoolExecutor(2) as pool:  # started side by side
            workers = list(pool.map(lambda i: cluster.worker(address, f"w{i}", "--insecure", "--data-dir", str(images), "--image-size", "32"), range(2)))

        failed = wait_for_state(address, "failed", 120, [coord])
        took = time.monotonic() - start
        codes = [w.proc.wait(60) for w in workers]

        assert took < DEADLINE / 3, f"{took:.0f} s: the attempts waited for their deadline"
        assert (
            failed["error"]
            == f"round 1 failed 3 attempts in a row because workers refused its tasks (data_mismatch, 2 of 2 refusals in the last attempt): worker {failed['error'].split('worker ')[1].split(':')[0]}: {MESSAGE}"
        )
        assert failed["completed_rounds"] == 0
        assert metric(port, "feddiff_updates_total", outcome="rejected_data_mismatch") == 6  # 2 workers x 3 attempts
        assert metric(port, "feddiff_round_attempts_total", outcome="no_quorum") == 3
        assert codes == [1, 1], "the workers were told the run failed"
        for w in workers:
            log = w.output()
            assert log.count("refusing task") == 3, log  # once per attempt: no tight loop
            assert "the coordinator stopped the run: round 1 failed 3 attempts" in log
            assert "Traceback" not in log
        assert "run stopped: round 1 failed 3 attempts in a row" in coord.output()
        assert status(address)["state"] == "failed" and coord.proc.poll() is None  # it still answers, without --exit-when-done


def test_with_exit_when_done_the_coordinator_of_a_failed_run_exits_1(tmp_path: Path) -> None:
    images = image_folder(tmp_path / "images", size=32)
    with LocalCluster(tmp_path, env=ENV) as cluster:
        coord = cluster.coordinator(*RUN, "--min-workers", "1", "--exit-when-done")
        worker = cluster.worker(coord.ready["address"], "w", "--insecure", "--data-dir", str(images), "--image-size", "32")

        assert coord.proc.wait(120) == 1
        assert worker.proc.wait(60) == 1
    assert worker.output().count("refusing task") == 3
    assert "run stopped: round 1 failed 3 attempts in a row because workers refused its tasks (data_mismatch" in coord.output()


def test_a_worker_whose_updates_are_refused_backs_off_instead_of_retraining_at_once(tmp_path: Path) -> None:
    """Every update is refused (a value bound no training meets): the worker waits before each next task,
    doubling as after a refused task, where it used to train the same task again every few seconds. The
    coordinator's round-close line counts the refused updates by outcome."""
    import re

    images = image_folder(tmp_path / "images")
    with LocalCluster(tmp_path, env=ENV) as cluster:
        coord = cluster.coordinator(*RUN, "--min-workers", "1", "--round-deadline", "4", "--max-delta-value", "1e-30")
        worker = cluster.worker(coord.ready["address"], "w0", "--insecure", "--data-dir", str(images))
        wait_until(lambda: len(re.findall(r"refused: out_of_bounds.*asking again in", worker.output())) >= 4, "four refused updates", 120, [coord, worker])
        worker_log, coord_log = worker.output(), coord.output()

    delays = [float(d) for d in re.findall(r"update for \S+ refused: out_of_bounds.*; asking again in ([\d.]+)s", worker_log)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0], worker_log
    assert re.search(r"round 1: 0 of 1 updates \(tasks refused by workers: 0; updates refused: out_of_bounds [1-9]\d*\), quorum 1: round re-run", coord_log), (
        coord_log
    )
