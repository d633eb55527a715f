"""A checkpoint dir that fills up before the end of the run, with real processes: the checkpoints and the final
model that fail are held in memory and retried with backoff, the files before them stay valid, the round log
never gets ahead of the checkpoint on disk; at the end the final model is retried for `--final-save-timeout`
seconds, and the coordinator exits 1 with one line when it could never be written (0 once space came back)."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from fedcore.federation import checkpoint
from feddiff.local import LocalCluster, Process, status
from tests.checkpoints import saved_run
from tests.reliability.support import ENV, LIVENESS, RUN, metric, rounds_log, start_run, wait_until
from tests.tmpfs import fill, mounted_tmpfs

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

ROUNDS = 3


def _full_after_round_1(cluster: LocalCluster, ckpt: Path, *extra: str) -> tuple[Process, list[Process], Path]:
    """A coordinator of ROUNDS rounds and two workers, the checkpoint dir filled up once round 1 is checkpointed
    (round 2 cannot close meanwhile: the workers are paused); the file that fills it."""
    args = ["--insecure", *RUN, "--rounds", str(ROUNDS), "--min-workers", "2", "--round-deadline", "60", *LIVENESS, *extra]
    coord, workers = start_run(cluster, args, [[], []])
    # The checkpoint, then its round log line (never ahead of it): both on disk before the dir fills up.
    wait_until(lambda: [r["round"] for r in rounds_log(ckpt)] == [1], "round 1's checkpoint and round log line", 90, [coord, *workers], every=0.01)
    for w in workers:
        w.proc.send_signal(signal.SIGSTOP)
    filler = fill(ckpt)
    for w in workers:
        w.proc.send_signal(signal.SIGCONT)
    return coord, workers, filler


@pytest.mark.parametrize("space", ["never_back", "back_before_the_timeout"])
def test_a_full_checkpoint_dir_at_the_end_is_retried_and_a_final_model_never_written_exits_1(space: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    timeout = 3 if space == "never_back" else 300
    with mounted_tmpfs(ckpt, "8m"), LocalCluster(tmp_path, env=ENV) as cluster:
        coord, workers, filler = _full_after_round_1(cluster, ckpt, "--exit-when-done", "--final-save-timeout", str(timeout))
        address, port = coord.ready["address"], coord.ready["metrics_port"]
        wait_until(lambda: int(status(address)["completed_rounds"]) == ROUNDS, "the last round", 120, [coord, *workers])
        unsaved = metric(port, "feddiff_checkpoint_unsaved")
        _, state = saved_run(ckpt)
        log_while_full = [r["round"] for r in rounds_log(ckpt)]
        if space == "back_before_the_timeout":
            wait_until(lambda: metric(port, "feddiff_checkpoint_saves_total", outcome="failed") >= ROUNDS, "a retry of the final model", 60, [coord])
            filler.unlink()
        code = coord.proc.wait(120)
        log = coord.output()
        after = checkpoint.load_run(ckpt)
        files = sorted(f.name for f in ckpt.iterdir())
        final_exists = (ckpt / checkpoint.FINAL_MODEL).exists()
        log_at_end = [r["round"] for r in rounds_log(ckpt)]

    # While full: round 1 stays the valid checkpoint, the round log holds it alone, and the rest is held in memory.
    assert unsaved == 1
    assert state.completed_rounds == 1 and log_while_full == [1]
    assert re.search(rf"checkpoint failed \(writing {ckpt}/\S+: ENOSPC \(No space left on device\)\); the checkpoint after 1 rounds stays the valid one", log)
    assert not [f for f in files if ".tmp-" in f], "a failed write leaves no temporary file"
    assert after is not None
    if space == "never_back":
        assert code == 1
        (error,) = re.findall(r"run stopped: (.*)", log)
        assert error == (
            f"the final model could not be written to {ckpt}/final.safetensors in 3 s of retries (writing {ckpt}/global-r0003.safetensors: "
            f"ENOSPC (No space left on device)); {ckpt}/state.json holds 1 of 3 rounds: make room (or make it writable) and run the "
            "coordinator again with --resume"
        )
        assert after[1].completed_rounds == 1 and log_at_end == [1] and not final_exists
    else:
        assert code == 0, log[-3000:]
        assert after[1].completed_rounds == ROUNDS and final_exists
        assert log_at_end == [1, 2, 3], "the held round log lines follow their checkpoint, once each"
        assert "nothing is held unsaved any more" in log


def test_a_coordinator_stopped_with_a_checkpoint_held_exits_1_naming_it(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    with mounted_tmpfs(ckpt, "8m"), LocalCluster(tmp_path, env=ENV) as cluster:
        coord, workers, _ = _full_after_round_1(cluster, ckpt, "--rounds", "10")  # the run is far from its end
        address = coord.ready["address"]
        wait_until(lambda: int(status(address)["completed_rounds"]) >= 2, "round 2 in memory", 120, [coord, *workers])
        code = coord.stop()
        log = coord.output()
        _, state = saved_run(ckpt)

    assert code == 1
    held = re.search(
        r"stopping with the checkpoint after (\d) rounds unsaved \(writing \S+: ENOSPC \(No space left on device\)\): \S+/state.json holds 1 rounds", log
    )
    assert held is not None and int(held.group(1)) >= 2, log[-3000:]
    assert state.completed_rounds == 1
