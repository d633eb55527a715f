"""A worker of several ranks (torch.distributed, gloo on the CPU) with a real coordinator over gRPC: it trains
the delta one process trains, takes part in a run beside a plain worker, and a rank that dies ends it with a
clear error while the round closes by quorum and the restarted worker rejoins with its private parts."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fedcore.model.parts import Part
from fedcore.model.unet import build_model
from fedcore.payload.serialization import load_file, save_file
from feddiff.local import LocalCluster, Process, metric_value, scrape, status, wait_for_state
from tests.reliability.support import ENV, LIVENESS, RUN, TINY, free_port, metric, rounds_log, wait_until

pytestmark = pytest.mark.e2e

TINY_RUN = ["--model", "tiny", "--seed", "7", "--epochs", "2", "--batch-size", "16"]
FP32 = ["--bf16", "off", "--threads", "1"]  # the equivalence holds in fp32 (bf16 rounds each rank's batch apart)


def _one_round(tmp_path: Path, init: Path, ranks: int) -> dict[str, torch.Tensor]:
    """The model after one plain-FedAvg round of one worker (init + its delta) on 35 images: steps of 16, 16
    and 3 images an epoch, so that the ranks' shares of the last batch differ (2 and 1 images): only the loss
    weight N n_r / B makes DDP's average of their gradients the mean over the 3."""
    with LocalCluster(tmp_path, env=ENV) as cluster:
        run = ["--strategy", "full", *TINY_RUN, "--lr", "1e-3", "--rounds", "1", "--min-workers", "1", "--init-from", str(init)]
        coord = cluster.coordinator("--insecure", *run)
        worker = cluster.shard_worker(
            coord.ready["address"], 0, 1, "--max-images", "35", "--nproc-per-node", str(ranks), *FP32, keep_running=False, ready_timeout=120
        )
        wait_for_state(coord.ready["address"], "done", timeout=180, procs=[coord, worker])
        assert worker.proc.wait(60) == 0, worker.output()[-3000:]
    return load_file(tmp_path / "checkpoints" / "final.safetensors")[0]


def test_two_ranks_at_half_the_batch_train_the_delta_of_one_process(tmp_path: Path) -> None:
    """Same seed, same sample order: 2 gloo ranks at 8 images each per step give the delta one process gives at
    16, within a tolerance derived from where they differ. Both take the gradient of the mean over the same 16
    images (and the same t and noise per image), summed in another order: two partial sums added by the
    all-reduce, each scaled by N n_r / B. For most elements that is a relative difference of a few float32
    ulps (~1e-6), which Adam's step lr m/(sqrt(v) + eps) passes on about unchanged: ~1e-9 per step at lr =
    1e-3. Where an element's gradient is a sum that cancels to near zero, the same absolute rounding is a large
    relative error, and Adam's normalisation turns it into a step error of up to a fraction of lr (never more
    than the 2 lr of a flipped sign). So: 99.9% of the elements within 1e-6 (a thousandth of one step), and
    every element within 1e-4 (1/60 of the S * lr = 6e-3 the S = 6 steps can move it). A wrong sample order,
    noise draw or loss scale moves most elements by ~1e-3."""
    init = build_model("tiny").state_dict()
    save_file(tmp_path / "init.safetensors", init)
    with ThreadPoolExecutor(2) as pool:  # two runs of their own, side by side: each is deterministic (fp32, one thread a rank)
        single, ranked = pool.map(lambda ranks: _one_round(tmp_path / f"ranks-{ranks}", tmp_path / "init.safetensors", ranks), [1, 2])
    assert single.keys() == ranked.keys() == init.keys()
    moved = torch.cat([(single[k] - init[k]).flatten() for k in init])
    apart = torch.cat([(single[k] - ranked[k]).flatten() for k in init]).abs()
    assert float(moved.abs().median()) > 1e-3, "the round must move the model for the comparison to mean anything"
    assert float(apart.max()) <= 1e-4, f"an element of 2 ranks' delta differs from one process's by {float(apart.max()):.3g}"
    assert float((apart > 1e-6).float().mean()) <= 1e-3, f"{int((apart > 1e-6).sum())} of {apart.numel()} elements differ by more than 1e-6"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # exited, not yet reaped by its launcher


def test_a_two_rank_worker_and_a_plain_one_run_udec_and_sigterm_stops_every_rank(tmp_path: Path) -> None:
    """Coordinator + one worker of 2 ranks + one plain worker, UDec, 2 rounds: both take part in every round with
    their image counts as FedAvg weights; rank 0 alone serves the metrics, which count the worker's whole shard;
    SIGTERM to the launcher stops both ranks, and it exits 0. 49 images at batch 16 end each epoch with a batch
    of one image, of which rank 1's share is empty (it trains one image at weight 0)."""
    with LocalCluster(tmp_path, env=ENV) as cluster:
        coord = cluster.coordinator("--insecure", "--strategy", "udec", *TINY_RUN, "--rounds", "2", "--min-workers", "2", "--round-deadline", "120")
        address = coord.ready["address"]
        with ThreadPoolExecutor(2) as pool:  # started side by side
            ranked_start = pool.submit(cluster.shard_worker, address, 0, 2, "--max-images", "98", "--nproc-per-node", "2", ready_timeout=120)
            plain = cluster.shard_worker(address, 1, 2, "--max-images", "98")
            ranked = ranked_start.result()
        wait_for_state(address, "done", timeout=180, procs=[coord, ranked, plain])
        pids = ranked.ready["rank_pids"]
        images = metric(ranked.ready["metrics_port"], "feddiff_train_images_total")
        assert ranked.stop() == 0, ranked.output()[-3000:]
        wait_until(lambda: all(_gone(p) for p in pids), "every rank gone after SIGTERM", 30)
    rounds = rounds_log(tmp_path / "checkpoints")
    assert [r["participants"] for r in rounds] == [["client-0", "client-1"]] * 2
    assert [r["weights"] for r in rounds] == [{"client-0": 49, "client-1": 49}] * 2, "the FedAvg weight is the worker's image count"
    assert len(pids) == 2 and pids[0] == ranked.ready["pid"]
    assert images == 2 * 2 * 49, "2 rounds of 2 epochs over the worker's 49 images, counted once (on rank 0)"


def _training_round_2(metrics_port: int) -> bool:
    """Round 2's weights (a decoder) are in and its update is not yet out."""
    m = scrape(metrics_port)
    decoder_down = metric_value(m, "feddiff_parameters_total", direction="down", part="decoder")
    return decoder_down == 2 * TINY.sizes[Part.DECODER] and metric_value(m, "feddiff_updates_total", outcome="accepted") == 1


def test_a_rank_killed_mid_round_ends_the_worker_the_round_closes_by_quorum_and_it_rejoins_with_its_private_parts(tmp_path: Path) -> None:
    """One rank SIGKILLed while round 2 trains: the worker exits 1 naming it, well within the collective
    timeout; round 2 closes at its deadline with the plain worker; the worker, restarted under torchrun on its
    state dir, rejoins with its round-1 private parts and gets the decoder only in round 3."""
    deadline = 20  # rounds 1 and 3 (5 to 15 s here, a worker building its model included) must fit on a loaded machine
    timeout = 20  # --collective-timeout
    run = ["--strategy", "udec", "--model", "tiny", "--seed", "7", "--epochs", "2", "--batch-size", "16"]  # a second or more of training
    ranked_flags = ["--max-images", "160", "--nproc-per-node", "2", "--collective-timeout", str(timeout)]
    with LocalCluster(tmp_path, env=ENV) as cluster:
        coord = cluster.coordinator("--insecure", *run, "--rounds", "3", "--min-workers", "2", "--quorum", "0.5", "--round-deadline", str(deadline), *LIVENESS)
        address, coord_port = coord.ready["address"], coord.ready["metrics_port"]
        with ThreadPoolExecutor(2) as pool:  # started side by side
            victim_start = pool.submit(cluster.shard_worker, address, 0, 2, *ranked_flags, keep_running=False, ready_timeout=120)
            healthy = cluster.shard_worker(address, 1, 2, "--max-images", "160")  # stays up after the run: stopped at the end
            victim = victim_start.result()
        port = victim.ready["metrics_port"]
        wait_until(lambda: int(status(address)["completed_rounds"]) >= 1, "round 1", 120, [coord, victim, healthy])
        wait_until(lambda: _training_round_2(port), "the worker training round 2", 60, [coord, victim, healthy], every=0.02)
        killed_at = time.monotonic()
        os.kill(victim.ready["rank_pids"][1], signal.SIGKILL)
        exit_code = victim.proc.wait(timeout + 10)
        ended_after = time.monotonic() - killed_at
        wait_until(lambda: int(status(address)["completed_rounds"]) >= 2, "round 2 closed by quorum", deadline + 30, [coord, healthy])
        # Restarted under torchrun this time: the same worker, its ranks from torchrun's environment.
        torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        restarted = cluster.shard_worker(address, 0, 2, *ranked_flags[:2], *ranked_flags[4:], ready_timeout=120, launcher=torchrun)
        wait_for_state(address, "done", 120, [coord, healthy, restarted])
        quorum = metric(coord_port, "feddiff_round_attempts_total", outcome="quorum")
        restarted_log = restarted.output()
    assert exit_code == 1 and ended_after < timeout, f"exit code {exit_code} after {ended_after:.1f}s"
    log = victim.output()
    assert "rank 1 of 2" in log and "signal SIGKILL" in log and "the other ranks were stopped" in log, log[-3000:]
    rounds = rounds_log(tmp_path / "checkpoints")
    assert [r["participants"] for r in rounds] == [["client-0", "client-1"], ["client-1"], ["client-0", "client-1"]]
    assert quorum == 1
    assert "private parts of round 1 restored" in restarted_log
    assert "rank 1 of 2 on cpu (gloo)" in restarted_log and "with 2 ranks" in restarted_log
    # It rejoined with its private parts: round 3 sent the decoder only, to both workers.
    assert rounds[2]["parameters"]["down"] == {"encoder": 0, "bottleneck": 0, "decoder": 2 * TINY.sizes[Part.DECODER]}


def test_sigterm_mid_round_stops_both_ranks_between_two_steps(tmp_path: Path) -> None:
    """SIGTERM to the launcher while its ranks train: torch's launcher forwards it, the ranks agree to stop at
    the same step (a stop asked of any rank stops all), rank 0 leaves the session, and the worker exits 0."""
    with LocalCluster(tmp_path, env=ENV) as cluster:
        run = ["--strategy", "udec", *TINY_RUN[:4], "--epochs", "500", "--batch-size", "16", "--min-workers", "1"]
        coord, worker = _side_by_side(cluster, run, 1, "--max-images", "200", "--nproc-per-node", "2")
        wait_until(lambda: "worker client-0: round 1: epoch" in worker.output(), "round 1 training", 60, [coord, worker])
        worker.proc.send_signal(signal.SIGTERM)
        exit_code = worker.proc.wait(30)
        log = worker.output()
        left = wait_until(lambda: int(status(coord.ready["address"])["workers_connected"]) == 0 or None, "the worker gone", 30)
    assert exit_code == 0, log[-3000:]
    assert "worker client-0: training interrupted" in log and "rank 1: training interrupted" in log, log[-3000:]
    assert left and all(_gone(pid) for pid in worker.ready["rank_pids"])


def _side_by_side(cluster: LocalCluster, run: list[str], clients: int, *flags: str) -> tuple[Process, Process]:
    """A coordinator of `run` and worker client-0 (shard 0 of `clients`, of `flags`, exiting when done), started
    side by side: the coordinator on a port picked beforehand, which the worker dials until it is up."""
    address = f"127.0.0.1:{free_port()}"
    with ThreadPoolExecutor(1) as pool:
        coord = pool.submit(cluster.coordinator, "--insecure", *run, "--listen", address)
        worker = cluster.shard_worker(address, 0, clients, *flags, keep_running=False, ready_timeout=120)
        return coord.result(), worker


def _waiting_worker(cluster: LocalCluster, *flags: str, training: bool = False) -> tuple[Process, Process]:
    """A coordinator and one worker (of `flags`): in its long poll (the coordinator waits for a second worker),
    or `training` round 1 (for minutes)."""
    run = [*TINY_RUN[:4], "--epochs", "500", "--batch-size", "16", "--min-workers", "1"] if training else [*RUN, "--min-workers", "2"]
    coord, worker = _side_by_side(cluster, run, 2, "--max-images", "200" if training else "40", *flags)
    if training:
        wait_until(lambda: "worker client-0: round 1: epoch" in worker.output(), "round 1 training", 60, [coord, worker])
    else:
        wait_until(lambda: "worker client-0: joined" in worker.output(), "the worker joined", 60, [coord, worker])
        time.sleep(1)  # well into its first long poll
    return coord, worker


def _stopped_after(worker: Process, pid: int, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, float]:
    """`sig` to `pid`: the worker's exit code and the seconds it took to exit."""
    sent = time.monotonic()
    os.kill(pid, sig)
    exit_code = worker.proc.wait(timeout)
    return exit_code, time.monotonic() - sent


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_stops_a_worker_in_its_long_poll_at_once_and_it_leaves(tmp_path: Path, ranks: int) -> None:
    """SIGTERM to a worker (one process, or the launcher of 2 ranks) that waits in a 30 s long poll: the poll is
    cancelled, the worker leaves the session and exits 0 within seconds, every rank gone."""
    with LocalCluster(tmp_path, env=ENV) as cluster:
        coord, worker = _waiting_worker(cluster, "--nproc-per-node", str(ranks))
        exit_code, took = _stopped_after(worker, worker.proc.pid)
        log = worker.output()
        left = wait_until(lambda: int(status(coord.ready["address"])["workers_connected"]) == 0 or None, "the worker gone", 10)
    assert exit_code == 0 and took < 8, f"exit code {exit_code} after {took:.1f}s (the long poll lasts 30 s):\n{log[-3000:]}"
    assert "worker client-0: stopped" in log and left
    assert all(_gone(pid) for pid in worker.ready.get("rank_pids", [worker.proc.pid]))


@pytest.mark.parametrize(("rank", "training"), [(1, False), (0, False), (1, True)])
def test_sigterm_to_one_rank_ends_the_worker_naming_the_rank_and_the_signal(tmp_path: Path, rank: int, training: bool) -> None:
    """SIGTERM to one rank of a 2-rank worker (not to its launcher), as it waits for its next task or as it
    trains: that rank stops (training stops on both at the same step) and ends by the signal, the launcher ends
    the other rank and exits 1 with one line naming the rank and the signal, long before the collective timeout."""
    timeout = 60
    with LocalCluster(tmp_path, env=ENV) as cluster:
        _, worker = _waiting_worker(cluster, "--nproc-per-node", "2", "--collective-timeout", str(timeout), training=training)
        pids = worker.ready["rank_pids"]
        exit_code, took = _stopped_after(worker, pids[rank], timeout=timeout)
        log = worker.output()
    assert exit_code == 1 and took < 15, f"exit code {exit_code} after {took:.1f}s:\n{log[-3000:]}"
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert errors == [
        f"{errors[0][:8]} ERROR feddiff.worker: worker: rank {rank} of 2 (pid {pids[rank]}) ended by signal SIGTERM; the other ranks were stopped"
    ], log
    assert "Traceback" not in log, log
    if training:
        assert "worker client-0: training interrupted" in log and "rank 1: training interrupted" in log, log[-3000:]
    wait_until(lambda: all(_gone(p) for p in pids), "every rank gone", 10)
