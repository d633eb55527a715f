"""What a resume may change, with real processes: `--resume --rounds 3` after a run of 2 rounds runs one more
round, logging each setting that changed; a resume with settings that define the run (strategy, lr, ...)
is refused at start with exit status 2 and one line naming each of them, and nothing in the checkpoint dir
changes. `--resume` with nothing to resume is refused the same way; `--resume-or-start` starts the run."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.federation import checkpoint
from feddiff.local import LocalCluster, status
from tests.reliability.support import ENV, LIVENESS, RUN, rounds_log, start_run

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


def _files(folder: Path) -> dict[str, tuple[str, int]]:
    """Each file of `folder` with its content's digest and its modification time."""
    return {f.name: (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) for f in sorted(folder.iterdir())}


def _run(cluster: LocalCluster, args: list[str], name: str) -> str:
    """A coordinator and two workers (started side by side) until the run is done; the coordinator's log."""
    coord, workers = start_run(cluster, args, [[], []], name)
    assert coord.proc.wait(120) == 0, coord.output()[-3000:]
    assert [w.proc.wait(60) for w in workers] == [0, 0]
    return coord.output()


def test_a_resume_extends_the_rounds_and_refuses_settings_that_define_the_run(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    args = ["--insecure", *RUN, "--min-workers", "2", "--round-deadline", "60", *LIVENESS, "--exit-when-done"]
    with LocalCluster(tmp_path, env=ENV) as cluster:
        _run(cluster, [*args, "--rounds", "2"], "coordinator")
        before = _files(ckpt)

        refused = subprocess.run(
            [sys.executable, "-m", "feddiff", "coordinator", "--listen", "127.0.0.1:0", "--metrics-port", "0", "--checkpoint-dir", str(ckpt),
             *args, "--rounds", "3", "--resume", "--strategy", "full", "--lr", "0.01"],
            check=False, capture_output=True, text=True, timeout=120, env={**os.environ, **ENV},
        )  # fmt: skip
        after_refusal = _files(ckpt)

        resumed_log = _run(cluster, [*args, "--rounds", "3", "--resume", "--round-deadline", "90", "--quorum", "1.0"], "coordinator-resumed")

    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines() == [
        f"feddiff coordinator: error: --resume: the run in {ckpt} was made with other settings that define it: strategy (saved 'udec', "
        "given 'full'), lr (saved 0.0001, given 0.01); resume with the saved values, or start a new run in another folder; nothing in it was changed"
    ]
    assert after_refusal == before, "the refused start changed nothing in the checkpoint dir"

    assert "resuming after round 2" in resumed_log
    assert "--resume: settings changed since the run's last checkpoint: rounds 2 -> 3, round_deadline 60.0 -> 90.0, quorum 0.5 -> 1.0" in resumed_log
    assert [r["round"] for r in rounds_log(ckpt)] == [1, 2, 3], "one more round, each once in the round log"
    saved = checkpoint.load_run(ckpt)
    assert saved is not None and saved[1].completed_rounds == 3 and saved[1].config.rounds == 3
    assert (ckpt / checkpoint.FINAL_MODEL).is_file()


def test_a_resume_with_nothing_to_resume_is_refused_and_resume_or_start_begins_the_run(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"  # LocalCluster's
    args = ["--insecure", *RUN, "--min-workers", "2", *LIVENESS]
    refused = subprocess.run(
        [sys.executable, "-m", "feddiff", "coordinator", "--listen", "127.0.0.1:0", "--metrics-port", "0", "--checkpoint-dir", str(ckpt), *args, "--resume"],
        check=False, capture_output=True, text=True, timeout=60, env={**os.environ, **ENV},
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines() == [
        f"feddiff coordinator: error: --resume: --checkpoint-dir {ckpt} does not exist: there is nothing to resume; drop --resume to start a new run there"
    ]
    assert not ckpt.exists(), "the refused start created nothing"

    with LocalCluster(tmp_path, env=ENV) as cluster:
        started = cluster.coordinator(*args, "--resume-or-start", name="coordinator")
        run_id = status(started.ready["address"])["run_id"]
        assert started.stop() == 0, started.output()[-3000:]
        again = cluster.coordinator(*args, "--resume", name="coordinator-again")  # stopped before its first round: the same run
        assert status(again.ready["address"])["run_id"] == run_id
        assert again.stop() == 0, again.output()[-3000:]

    assert f"--resume-or-start: no run in {ckpt}, starting a new one" in started.output()
    assert f"--resume: run {run_id} in {ckpt} committed no round before it stopped: it starts again from round 1" in again.output()
    for log in (started.output(), again.output()):
        assert log.count("coordinator serving on") == 1, log
