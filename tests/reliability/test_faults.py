"""Faults with real processes: workers killed mid-stream and restarted, the coordinator killed and resumed,
a worker slower than the deadline, and checkpoint writes that fail (a full or read-only filesystem)."""

from __future__ import annotations

import hashlib
import re
import signal
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from fedcore.federation import checkpoint
from fedcore.model.parts import Part
from fedcore.payload.serialization import load_file
from feddiff.local import LocalCluster, Process, status, wait_for_state
from tests.checkpoints import saved_run
from tests.reliability.support import DECODER_BYTES, ENV, LIVENESS, RUN, TINY, free_port, metric, rounds_log, start_run, wait_until
from tests.tmpfs import fill, mount_tmpfs, mounted_tmpfs, remount, unmount

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


def _completed(address: str) -> int:
    return int(status(address)["completed_rounds"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- a worker killed mid-stream ------------------------------------------------------------------------------


class _Kept(NamedTuple):
    """The victim's newest private parts on disk after the kill."""

    path: Path
    round_number: int
    sha: str
    tensors: dict[str, torch.Tensor]


def _mid_stream_args(deadline: int) -> list[str]:
    """3 rounds of 3 workers closing at quorum 0.6 after `deadline` seconds; small chunks, so that a paced
    stream is many messages."""
    return [
        "--insecure",
        *RUN,
        "--rounds",
        "3",
        "--min-workers",
        "3",
        "--quorum",
        "0.6",
        "--round-deadline",
        str(deadline),
        "--chunk-size",
        "16384",
        *LIVENESS,
    ]


def _kill_mid_stream(address: str, victim: Process, phase: str, alive: list[Process]) -> None:
    """SIGKILL the victim once its round-2 stream in `phase` has moved some bytes, and not all of them."""
    direction = {"download": "down", "upload": "up"}[phase]
    port = victim.ready["metrics_port"]
    after_round_1 = metric(port, "feddiff_wire_bytes_total", direction=direction)
    least = DECODER_BYTES // 10 if phase == "upload" else 1  # a tenth of an upload: the coordinator is reading it
    streamed = wait_until(
        lambda: (n := metric(port, "feddiff_wire_bytes_total", direction=direction) - after_round_1) >= least and n,
        f"round 2 {phase}", 30, [*alive, victim], every=0.02,
    )  # fmt: skip
    assert _completed(address) == 1
    victim.stop(signal.SIGKILL)
    assert 0 < streamed < DECODER_BYTES, f"killed after {streamed} of ~{DECODER_BYTES} bytes: not mid-{phase}"


def _kept_private_parts(state_dir: Path, phase: str) -> _Kept:
    private = sorted(state_dir.glob("private-r*.safetensors"))
    assert private, "the victim had private parts (round 1, or round 2 before its upload)"
    kept_round = int(private[-1].stem.rsplit("-r", 1)[1])
    assert kept_round == {"download": 1, "upload": 2}[phase]
    kept_tensors, _ = load_file(private[-1])
    return _Kept(private[-1], kept_round, _sha(private[-1]), kept_tensors)


def _assert_round_2_closed_without_the_victim_and_round_3_with_it(ckpt: Path, deadline: int) -> None:
    rounds = rounds_log(ckpt)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[1]["planned"] == ["client-0", "client-1", "client-2"]
    assert rounds[1]["participants"] == ["client-0", "client-1"], "round 2 closes at its deadline without the victim"
    assert rounds[1]["seconds"] >= deadline
    assert rounds[2]["participants"] == ["client-0", "client-1", "client-2"], "the restarted worker rejoins round 3"
    # It joined with has_private_state: round 3 sent it (and the others) the decoder only.
    down = rounds[2]["parameters"]["down"]
    assert down == {"encoder": 0, "bottleneck": 0, "decoder": 3 * TINY.sizes[Part.DECODER]}


def _assert_private_parts_restored(state_dir: Path, kept: _Kept, restarted_log: str) -> None:
    """Its private parts survived the kill untouched and are the ones it restored."""
    assert f"private parts of round {kept.round_number} restored" in restarted_log
    assert _sha(state_dir / kept.path.name) == kept.sha
    newest = checkpoint.load_private(state_dir, "private")
    assert newest is not None and newest[1] == 3, "it trained round 3 on its own encoder and saved it"
    assert set(newest[0]) == set(kept.tensors)
    assert all(name in TINY.names(frozenset({Part.ENCODER, Part.BOTTLENECK})) for name in kept.tensors)


@pytest.mark.parametrize("phase", ["download", "upload"])
def test_worker_killed_mid_stream_round_closes_with_quorum_and_it_rejoins_with_its_private_parts(phase: str, tmp_path: Path) -> None:
    """SIGKILL in round 2 while the victim's weight stream is half way; it is paced (--*-rate-limit) so that
    "half way" lasts seconds instead of milliseconds."""
    pacing = {"download": ["--download-rate-limit", "150000"], "upload": ["--upload-rate-limit", "50000"]}[phase]
    deadline = 12  # round 1 must fit the paced victim (~4 s of download or ~3 s of upload) on a loaded machine
    ckpt = tmp_path / "checkpoints"
    state_dir = tmp_path / "workers" / "client-2"
    with LocalCluster(tmp_path, env=ENV) as cluster:
        extra = [["--keep-running"], ["--keep-running"], ["--keep-running", *pacing]]
        coord, (healthy_a, healthy_b, victim) = start_run(cluster, _mid_stream_args(deadline), extra)
        address, coord_port = coord.ready["address"], coord.ready["metrics_port"]
        alive = [coord, healthy_a, healthy_b]
        wait_until(lambda: _completed(address) >= 1, "round 1", 90, [*alive, victim])
        _kill_mid_stream(address, victim, phase, alive)
        kept = _kept_private_parts(state_dir, phase)

        wait_until(lambda: _completed(address) >= 2, "round 2 closed at its deadline", deadline + 30, alive)
        coordinator_after_round_2 = (
            metric(coord_port, "feddiff_round_attempts_total", outcome="quorum"),
            metric(coord_port, "feddiff_updates_total", outcome="accepted"),
        )
        restarted = cluster.shard_worker(address, 2, 3, "--max-images", "240")
        wait_for_state(address, "done", 90, [*alive, restarted])
        coordinator_metrics = {outcome: metric(coord_port, "feddiff_round_attempts_total", outcome=outcome) for outcome in ("complete", "quorum", "no_quorum")}
        accepted = metric(coord_port, "feddiff_updates_total", outcome="accepted")
        # A cut upload is dropped and counted "aborted", not refused as a short stream ("bad_size").
        cut = tuple(metric(coord_port, "feddiff_updates_total", outcome=o) for o in ("aborted", "bad_size"))
        restarted_log = restarted.output()

    _assert_round_2_closed_without_the_victim_and_round_3_with_it(ckpt, deadline)
    assert coordinator_after_round_2 == (1, 5)
    assert coordinator_metrics == {"complete": 2, "quorum": 1, "no_quorum": 0}
    assert accepted == 8
    assert cut == (1 if phase == "upload" else 0, 0)
    _assert_private_parts_restored(state_dir, kept, restarted_log)


# --- the coordinator killed mid-round ------------------------------------------------------------------------


def test_coordinator_killed_mid_round_resumes_after_the_last_round_and_workers_reconnect(tmp_path: Path) -> None:
    rounds_total = 3
    address = f"127.0.0.1:{free_port()}"  # the same address for both runs: workers redial it
    args = ["--insecure", *RUN, "--rounds", str(rounds_total), "--min-workers", "3", "--round-deadline", "60", *LIVENESS]
    ckpt = tmp_path / "checkpoints"
    with LocalCluster(tmp_path, env=ENV) as cluster:
        first, workers = start_run(cluster, args, [[], [], []], address=address)
        pids = [w.proc.pid for w in workers]
        # Round 2 is open once round 1 is committed and its tasks are out.
        wait_until(
            lambda: (s := status(address))["completed_rounds"] == 1 and int(s["round_selected"]) == 3, "round 2 open", 120, [first, *workers], every=0.02
        )
        first.stop(signal.SIGKILL)
        saved = checkpoint.load_run(ckpt)
        assert saved is not None and saved[1].completed_rounds == 1

        resumed = cluster.coordinator(*args, "--listen", address, "--resume", name="coordinator-resumed")
        assert resumed.ready["address"] == address
        wait_for_state(address, "done", 120, [resumed, *workers])
        resumed_log = resumed.output()
        for w in workers:
            assert w.proc.wait(30) == 0, w.output()[-2000:]
        worker_logs = [w.output() for w in workers]

    assert [w.proc.pid for w in workers] == pids, "the workers were started once"
    assert "resuming after round 1" in resumed_log
    rounds = rounds_log(ckpt)
    assert [r["round"] for r in rounds] == [1, 2, 3], "each round once in the round log"
    assert all(r["participants"] == ["client-0", "client-1", "client-2"] for r in rounds)
    assert rounds[1]["parameters"]["down"]["encoder"] == 0, "they rejoined with their private parts"
    final = checkpoint.load_run(ckpt)
    assert final is not None and final[1].completed_rounds == rounds_total
    for log in worker_logs:
        assert log.count(": joined ") >= 2, "each worker joined the restarted coordinator by itself"
        assert "coordinator unavailable" in log.split(": joined ", 1)[1], "the kill cut a joined worker off"


# --- a worker slower than the deadline -----------------------------------------------------------------------


def test_worker_slower_than_the_deadline_has_its_late_update_refused_and_counted(tmp_path: Path) -> None:
    """Its update (6 kB/s on a ~150 kB decoder: ~24 s) is still streaming when the round closes at its deadline."""
    deadline = 8
    with LocalCluster(tmp_path, env=ENV) as cluster:
        args = ["--insecure", *RUN, "--rounds", "1", "--min-workers", "3", "--quorum", "0.6", "--round-deadline", str(deadline), *LIVENESS]
        coord, (fast_a, fast_b, slow) = start_run(cluster, args, [[], [], ["--upload-rate-limit", "6000", "--keep-running"]])
        address, port = coord.ready["address"], coord.ready["metrics_port"]
        wait_for_state(address, "done", 90, [coord, fast_a, fast_b, slow])
        wait_until(lambda: metric(port, "feddiff_updates_total", outcome="late"), "the late update", 60, [coord, slow])
        coordinator_metrics = {name: metric(port, "feddiff_updates_total", outcome=name) for name in ("accepted", "late")} | {
            f"attempts_{o}": metric(port, "feddiff_round_attempts_total", outcome=o) for o in ("complete", "quorum")
        }
        duration = metric(port, "feddiff_round_duration_seconds_sum")
        slow_late = wait_until(lambda: metric(slow.ready["metrics_port"], "feddiff_updates_total", outcome="late"), "the slow worker's count", 10, [slow])
        slow_log = slow.output()
        joins = coord.output().count("worker client-2 joined")

    assert coordinator_metrics == {"accepted": 2, "late": 1, "attempts_complete": 0, "attempts_quorum": 1}
    assert duration >= deadline
    assert slow_late == 1
    assert "refused: late: task" in slow_log
    assert joins == 1, "after the last round a --keep-running worker stays joined instead of rejoining in a loop"
    (record,) = rounds_log(tmp_path / "checkpoints")
    assert record["planned"] == ["client-0", "client-1", "client-2"] and record["participants"] == ["client-0", "client-1"]


# --- a checkpoint write that fails -----------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["full", "read_only"])
def test_failed_checkpoint_write_keeps_the_previous_checkpoint_valid_and_the_run_goes_on(failure: str, tmp_path: Path) -> None:
    rounds_total = 4
    ckpt = tmp_path / "checkpoints"
    mount_tmpfs(ckpt, "8m")
    try:
        with LocalCluster(tmp_path, env=ENV) as cluster:
            args = ["--insecure", *RUN, "--rounds", str(rounds_total), "--min-workers", "2", "--round-deadline", "60", *LIVENESS]
            coord, workers = start_run(cluster, args, [["--keep-running"], ["--keep-running"]])
            address = coord.ready["address"]
            # The first checkpoint, then its round log line (never ahead of it): both on disk before the failure.
            wait_until(lambda: rounds_log(ckpt), "the first checkpoint and its round log line", 90, [coord, *workers], every=0.02)
            filler = fill(ckpt) if failure == "full" else None
            if failure == "read_only":
                remount(ckpt, "ro")
            wait_until(lambda: "checkpoint failed" in coord.output(), "a failed checkpoint", 60, [coord, *workers])

            # The committed checkpoint is the previous one, whole and consistent.
            weights, state = saved_run(ckpt)
            failed = re.search(r"checkpoint failed \(writing (\S+): (\w+) .*\); the checkpoint after (\d+) rounds stays the valid one", coord.output())
            assert failed is not None
            assert state.completed_rounds == int(failed.group(3)) >= 1
            assert [r["round"] for r in rounds_log(ckpt)] == list(range(1, state.completed_rounds + 1)), "no round log line ahead of the checkpoint"
            _, meta = load_file(ckpt / state.global_file)
            assert meta["completed_rounds"] == str(state.completed_rounds)
            assert set(weights) == set(TINY.names(frozenset(Part)))
            assert not [f.name for f in ckpt.iterdir() if ".tmp-" in f.name], "a failed write leaves no temporary file"
            assert status(address)["state"] in ("training", "waiting_for_workers", "done"), "the coordinator keeps going"

            # Space (or write access) comes back: the next rounds commit again.
            if filler is not None:
                filler.unlink()
            else:
                remount(ckpt, "rw")
            wait_for_state(address, "done", 120, [coord, *workers])
            log = coord.output()
        final = checkpoint.load_run(ckpt)
        assert final is not None and final[1].completed_rounds == rounds_total
        assert failed.group(1).startswith(f"{ckpt}/") and failed.group(2) == ("ENOSPC" if failure == "full" else "EROFS")
        assert [r["round"] for r in rounds_log(ckpt)] == list(range(1, rounds_total + 1)), "the held round log lines written once space is back"
        assert "nothing is held unsaved any more" in log
    finally:
        unmount(ckpt)


# --- a worker's state dir that fills up ------------------------------------------------------------------------


@pytest.mark.parametrize("then", ["space_comes_back", "stopped_while_full"])
def test_a_full_worker_state_dir_keeps_the_saved_files_and_the_round_still_gets_the_update(then: str, tmp_path: Path) -> None:
    """The victim's state dir (a 2 MB tmpfs) fills up after round 1's save: round 2's save fails, its update
    goes up anyway, and the save is retried while it idles (--keep-running, --wait-timeout 1)."""
    state_dir = tmp_path / "workers" / "client-1"
    first = state_dir / "private-r0001.safetensors"
    with mounted_tmpfs(state_dir, "2m"), LocalCluster(tmp_path, env=ENV) as cluster:
        idle = ["--keep-running", "--wait-timeout", "1"]
        args = ["--insecure", *RUN, "--rounds", "2", "--min-workers", "2", "--quorum", "1.0", "--round-deadline", "60", *LIVENESS]
        coord, (steady, victim) = start_run(cluster, args, [idle, idle])
        address, coord_port = coord.ready["address"], coord.ready["metrics_port"]
        wait_until(first.exists, "round 1's private parts", 90, [coord, steady, victim], every=0.01)
        filler = fill(state_dir)
        saved_sha = _sha(first)

        wait_for_state(address, "done", 90, [coord, steady, victim])
        port = victim.ready["metrics_port"]
        unsaved_while_full = metric(port, "feddiff_private_state_unsaved")
        failed_saves = metric(port, "feddiff_state_saves_total", outcome="failed")
        files_while_full = sorted(f.name for f in state_dir.iterdir())
        intact = _sha(first) == saved_sha
        attempts = {o: metric(coord_port, "feddiff_round_attempts_total", outcome=o) for o in ("complete", "quorum", "no_quorum")}

        if then == "space_comes_back":
            filler.unlink()
            wait_until(lambda: metric(port, "feddiff_private_state_unsaved") == 0, "the retried save", 30, [victim])
            saved = checkpoint.load_private(state_dir, "private")
            assert victim.stop() == 0
        else:
            assert victim.stop() == 1, "it ends with private parts it could not save"
        log = victim.output()

    assert unsaved_while_full == 1 and failed_saves >= 1
    assert files_while_full == ["filler", "identity.json", "lock", "private-r0001.safetensors", "run.json"], "no temporary file, nothing pruned"
    assert intact, "round 1's private parts are untouched"
    assert attempts == {"complete": 2, "quorum": 0, "no_quorum": 0}, "round 2 closed with the victim's update"
    assert [r["participants"] for r in rounds_log(tmp_path / "checkpoints")] == [["client-0", "client-1"]] * 2
    assert f"saving the private parts of round 2 to {state_dir} failed ([Errno 28] No space left on device)" in log
    if then == "space_comes_back":
        assert saved is not None and saved[1] == 2
        assert f"private parts of round 2 saved to {state_dir}; nothing is held unsaved any more" in log
    else:
        assert f"exiting with the private parts of round 2 unsaved: {state_dir} holds those of an earlier round" in log
