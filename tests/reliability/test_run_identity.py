"""One worker state dir, several runs: a worker keeps its private parts for the run that made them. Joining a new
run (another coordinator, another checkpoint dir) it neither loads nor deletes another run's parts: they are moved
to previous-runs/<run id>/ and the new run starts from its global model; a resumed run keeps its id, and its
worker gets its own parts back."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedcore.federation.checkpoint import RUN_FILE, load_private
from feddiff.local import LocalCluster, Process, status
from tests.reliability.support import ENV, RUN, free_port
from worker.state_dir import PREVIOUS_RUNS, PRIVATE_STEM

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

DATA = ["--max-images", "64", "--threads", "1"]  # rounds of a second or two: what is checked is where the parts go


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob(f"{PRIVATE_STEM}-r*.safetensors"))}


def _run_id(folder: Path) -> str:
    return str(json.loads((folder / RUN_FILE).read_text())["run_id"])


def _one_run(cluster: LocalCluster, name: str, checkpoints: Path, rounds: int, state: Path, *, resume: bool = False) -> Process:
    """A coordinator run of `rounds` tiny udec rounds and one worker on `state`, which is through (exit status
    0); the worker's process. Resumed, the run is over already: the worker joins, hears it is done and exits. Both
    start side by side, the coordinator on a port picked beforehand: the worker connects once it is up."""
    address = f"127.0.0.1:{free_port()}"
    with ThreadPoolExecutor(1) as pool:
        coord_start = pool.submit(
            cluster.coordinator,
            *RUN, "--rounds", str(rounds), "--min-workers", "1", "--insecure", "--progress", "log", "--checkpoint-dir", str(checkpoints),
            "--listen", address, *(["--resume"] if resume else ["--exit-when-done"]), name=name,
        )  # fmt: skip
        worker = cluster.worker(address, "hospital-1", "--insecure", "--client-index", "0", *DATA, "--state-dir", str(state), name=f"{name}-worker")
        coord = coord_start.result()
    assert worker.proc.wait(180) == 0, worker.output()[-3000:]
    if resume:  # serving the finished run: `feddiff status` names it
        assert status(coord.ready["address"])["run_id"] == _run_id(checkpoints)
    assert coord.stop(timeout=60) == 0 if resume else coord.proc.wait(60) == 0, coord.output()[-3000:]
    return worker


def test_a_state_dir_reused_for_a_new_run_keeps_the_runs_apart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with LocalCluster(tmp_path / "cluster", env=ENV) as cluster:
        _one_run(cluster, "a", tmp_path / "run-a", 2, state)
        run_a, parts_a = _run_id(tmp_path / "run-a"), _digests(state)
        assert _run_id(state) == run_a and set(parts_a) == {"private-r0001.safetensors", "private-r0002.safetensors"}

        worker_b = _one_run(cluster, "b", tmp_path / "run-b", 1, state)

        run_b = _run_id(tmp_path / "run-b")
        assert run_b != run_a and _run_id(state) == run_b
        assert _digests(state / PREVIOUS_RUNS / run_a) == parts_a, "run A's parts, moved aside as they were"
        assert set(_digests(state)) == {"private-r0001.safetensors"}, "run B's parts alone; A's newest would be loaded after them"
        # Same seed, same images, same initial global model: a worker that started from B's global model, not from
        # A's parts, ends B's round 1 with exactly the parts it ended A's round 1 with.
        assert _digests(state)["private-r0001.safetensors"] == parts_a["private-r0001.safetensors"]
        found = load_private(state, PRIVATE_STEM)
        assert found is not None and found[1] == 1
        moved = [line for line in worker_b.output().splitlines() if "were moved to" in line]
        assert len(moved) == 1 and f"run {run_a}" in moved[0] and f"joining run {run_b}" in moved[0] and "starts from the global model" in moved[0]
        assert "private parts of round 2 restored" not in worker_b.output().split("were moved to", 1)[1], "A's parts never used in B"

        # Run A resumed (its id kept): its worker gets A's parts back, and B's go aside in turn.
        parts_b = _digests(state)
        worker_a2 = _one_run(cluster, "a-resumed", tmp_path / "run-a", 2, state, resume=True)

        assert _run_id(tmp_path / "run-a") == run_a and _run_id(state) == run_a
        assert _digests(state / PREVIOUS_RUNS / run_b) == parts_b
        assert not (state / PREVIOUS_RUNS / run_a).exists()
        now = _digests(state)
        assert now == parts_a
        assert f"run {run_a} again: its private parts, moved aside before, are back" in worker_a2.output()


def test_a_worker_rejoining_its_resumed_run_keeps_its_parts_in_place(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with LocalCluster(tmp_path / "cluster", env=ENV) as cluster:
        _one_run(cluster, "a", tmp_path / "run-a", 1, state)
        parts = _digests(state)

        worker = _one_run(cluster, "a-resumed", tmp_path / "run-a", 1, state, resume=True)

    assert not (state / PREVIOUS_RUNS).exists() and "were moved to" not in worker.output()
    assert _digests(state) == parts and "private parts of round 1 restored" in worker.output()
