"""A round that no attempt can close, with real processes: a round deadline shorter than the workers' local
training stops the run after `--max-failed-attempts` attempts with an error naming the round, the attempts and
the training time the workers reported; the run resumes from its checkpoint once the deadline is raised."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedcore.federation import checkpoint
from feddiff.local import LocalCluster, status
from tests.reliability.support import ENV, LIVENESS, RUN, rounds_log, start_run, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

DEADLINE = 1.0  # seconds: shorter than a round of local training at these settings (4 epochs: 2.5 to 7 s on one thread)
ATTEMPTS = 15  # long enough in all (15 s) for a late update to report its training time before the last one ends


def test_a_deadline_shorter_than_training_stops_the_run_naming_it_and_a_resume_with_a_longer_one_finishes(tmp_path: Path) -> None:
    args = ["--insecure", *RUN, "--epochs", "4", "--rounds", "1", "--min-workers", "2", *LIVENESS, "--exit-when-done"]
    with LocalCluster(tmp_path, env=ENV) as cluster:
        coord, workers = start_run(cluster, [*args, "--round-deadline", str(DEADLINE), "--max-failed-attempts", str(ATTEMPTS)], [[], []])
        assert coord.proc.wait(120) == 1, coord.output()[-3000:]
        first_log = coord.output()
        for w in workers:  # one that was training when the run failed retries the coordinator that has gone
            w.stop()

        # A third of the images: the round that finishes the run need not be long.
        resumed, workers = start_run(cluster, [*args, "--resume", "--round-deadline", "120"], [["--max-images", "80"]] * 2, "coordinator-resumed")
        address = resumed.ready["address"]
        wait_until(lambda: status(address)["state"] in ("done", "failed"), "the resumed run's end", 120, [resumed, *workers])
        assert resumed.proc.wait(60) == 0, resumed.output()[-3000:]
        resumed_log = resumed.output()

    (error,) = re.findall(r"run stopped: (.*)", first_log)
    reported = re.fullmatch(
        rf"round 1 failed {ATTEMPTS} attempts in a row because no update was accepted within round_deadline {DEADLINE:g} s "
        r"\((?:none arrived|updates refused: late \d+)\); worker client-\d reported (\d+\.\d) s of local training, longer than the deadline: "
        r"raise round_deadline above the workers' training time \(or lower epochs\)",
        error,
    )
    assert reported is not None, error
    assert float(reported.group(1)) >= DEADLINE
    assert first_log.count("round 1: 0 of 2 updates") == ATTEMPTS, "no attempt beyond the limit"

    assert "resuming after round 0" in resumed_log
    assert "round_deadline 1.0 -> 120.0" in resumed_log
    assert [r["round"] for r in rounds_log(tmp_path / "checkpoints")] == [1]
    saved = checkpoint.load_run(tmp_path / "checkpoints")
    assert saved is not None and saved[1].completed_rounds == 1
    assert saved[1].tally.round_attempts["no_quorum"] == ATTEMPTS, "the failed attempts are in the run's tally"
