"""`make demo`: a coordinator and 3 workers as separate processes on real Fashion-MNIST, udec; prints a
per-round table, the Frechet distance of worker 0's personalised model after every round (the workers score
their own models: evaluate tasks), and writes a PNG grid of samples from that model.

Sized for about 5 minutes on 2 CPU cores (the `tiny` UNet on a quarter of the data); on a GPU it trains the
paper's model on all of it."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedcore.evaluation.images import save_grid
from fedcore.federation import checkpoint
from fedcore.federation.roundlog import ROUNDS_LOG, EvaluationRecord, LogRecord, RoundRecord, read_round_log
from fedcore.model.diffusion import Schedule
from fedcore.model.diffusion import sample as generate
from fedcore.model.parts import PART_ORDER
from fedcore.model.unet import build_model
from fedcore.payload.serialization import load_file
from feddiff.local import LocalCluster, metric_value, scrape, wait_for_state

FD_WORKER = "client-0"
READY_SECONDS = 300.0  # a process's start (torch's import, the images, the model) on a busy machine


def plan() -> dict[str, Any]:
    # The paper's recipe (lr 1e-4, batch 128) needs thousands of steps per worker before samples look like
    # clothes; the CPU demo gets there in minutes with a larger step size and smaller batches.
    # FD: each worker samples its own model (DDIM, few steps) and scores it against the test set.
    if torch.cuda.is_available():
        return {"model": "paper-fmnist", "workers": 3, "rounds": 5, "epochs": 1, "batch_size": 128, "lr": 1e-3, "max_images": 0, "threads": 0,
                "eval_every": 1, "device": "cuda", "eval_samples": 1000, "eval_steps": 50}  # fmt: skip
    # CPU: two workers of 3,200 images each, short rounds (400 steps of batch 8) so that UDec's averaged decoder
    # and each worker's private encoder stay in step; FD only after round 1 and after the last round.
    workers = 2
    return {"model": "tiny", "workers": workers, "rounds": 10, "epochs": 1, "batch_size": 8, "lr": 1e-3,
            "max_images": 6400, "threads": max(1, (os.cpu_count() or 2) // workers), "eval_every": 10,
            "device": "cpu", "eval_samples": 500, "eval_steps": 25}  # fmt: skip


def print_table(records: list[LogRecord]) -> None:
    print(f"{'round':>5} {'workers':>8} {'MB down':>9} {'MB up':>8} {'reduction vs FedAvg':>20} {'loss':>8} {'seconds':>8}")
    for r in (r for r in records if isinstance(r, RoundRecord)):
        down = sum(r.ledger.bytes_down.values()) / 1e6
        up = sum(r.ledger.bytes_up.values()) / 1e6
        print(
            f"{r.round_number:>5} {len(r.participants):>5}/{len(r.planned):<2} {down:>9.2f} {up:>8.2f} {r.reduction_so_far:>20.1%} {r.mean_loss:>8.4f} {r.seconds:>8.1f}"
        )


def print_quality(records: list[LogRecord], p: dict[str, Any], reduction: float) -> None:
    """The last lines: worker 0's FD after round 1 and after the last round, beside the reduction."""
    fds = {r.round_number: r.fd_by_model[FD_WORKER] for r in records if isinstance(r, EvaluationRecord) and FD_WORKER in r.fd_by_model}
    if 1 not in fds or len(fds) < 2:
        print(f"no FD of {FD_WORKER}'s model after round 1 and the last round: see the coordinator's log")
        return
    last = max(fds)
    how = f"{p['eval_samples']} DDIM-{p['eval_steps']} samples against the 10,000 Fashion-MNIST test images, lower is better"
    print(f"FD of {FD_WORKER}'s personalised model ({how}):")
    print(f"  after round 1: {fds[1]:8.1f}")
    print(f"  after round {last}: {fds[last]:8.1f}   ({fds[last] / fds[1] - 1:+.0%}), with {reduction:.1%} fewer parameters exchanged than plain FedAvg")


def coordinator_flags(p: dict[str, Any]) -> list[str]:
    """The coordinator's flags for the plan: the run (udec) and the evaluation of the workers' models."""
    run = [
        "--model",
        str(p["model"]),
        "--strategy",
        "udec",
        "--rounds",
        str(p["rounds"]),
        "--epochs",
        str(p["epochs"]),
        "--batch-size",
        str(p["batch_size"]),
        "--lr",
        str(p["lr"]),
    ]
    evaluate = [
        "--eval-every",
        str(p["eval_every"]),
        "--eval-samples",
        str(p["eval_samples"]),
        "--eval-steps",
        str(p["eval_steps"]),
        "--eval-final-sampler",
        "ddim",
    ]
    return [*run, *evaluate]


def run_cluster(workdir: Path, p: dict[str, Any]) -> dict:
    """The coordinator and the workers as processes until the run is done; the coordinator's last /metrics."""
    data = ["--num-clients", str(p["workers"]), "--max-images", str(p["max_images"]), "--threads", str(p["threads"])]
    with LocalCluster(workdir) as cluster:
        coord = cluster.coordinator(
            "--insecure", *coordinator_flags(p), "--min-workers", str(p["workers"]), "--round-deadline", "900", ready_timeout=READY_SECONDS
        )
        address = coord.ready["address"]
        print(f"coordinator on {address}, metrics on http://127.0.0.1:{coord.ready['metrics_port']}/metrics")
        flags = {f"client-{i}": ["--insecure", "--client-index", str(i), *data, "--keep-running"] for i in range(int(p["workers"]))}
        workers = cluster.workers(address, flags, ready_timeout=READY_SECONDS)
        wait_for_state(address, "done", timeout=3600, procs=[coord, *workers])
        return scrape(coord.ready["metrics_port"])


def print_reduction(metrics: dict) -> float:
    """The parameters exchanged against plain FedAvg's, from /metrics; the reduction."""
    exchanged = sum(metric_value(metrics, "feddiff_parameters_total", direction=d, part=q.value) for d in ("down", "up") for q in PART_ORDER)
    full = metric_value(metrics, "feddiff_full_fedavg_parameters_total")
    reduction = 1 - exchanged / full
    print(f"\nparameters exchanged {exchanged:,.0f}, plain FedAvg would have {full:,.0f}: {reduction:.1%} less (from /metrics)")
    return reduction


def save_personalised_samples(workdir: Path, p: dict[str, Any]) -> Path:
    """A grid of samples of one worker's personalised model: the shared decoder of the final global model, its
    own encoder and bottleneck."""
    global_state, _ = load_file(workdir / "checkpoints" / "final.safetensors")
    loaded = checkpoint.load_private(workdir / "workers" / "client-0", "private")
    if loaded is None:
        raise SystemExit(f"{workdir / 'workers' / 'client-0'}: client-0 saved no private parts")
    private_tensors, _ = loaded
    model = build_model(str(p["model"]))
    model.load_state_dict(checkpoint.personalised_state(global_state, private_tensors))
    model.to(str(p["device"]))
    images = generate(model, Schedule(), 64, sampler="ddim", steps=100, seed=0, device=str(p["device"]))
    return save_grid(images, workdir / "samples-client-0.png", nrow=8, scale=3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    p = plan()
    print(f"feddiff demo: udec, {p['workers']} workers, {p['model']} on {p['device']}, {p['rounds']} rounds; logs in {args.workdir}")
    started = time.perf_counter()
    try:
        metrics = run_cluster(args.workdir, p)
    except (RuntimeError, TimeoutError) as e:  # a process that failed to start or to finish: what it logged
        print(f"feddiff demo: {e}", file=sys.stderr)
        return 1
    rounds = read_round_log(args.workdir / "checkpoints" / ROUNDS_LOG)
    print()
    print_table(rounds)
    reduction = print_reduction(metrics)
    out = save_personalised_samples(args.workdir, p)
    print(f"samples of {FD_WORKER}'s personalised model: {out}")
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    print_quality(rounds, p, reduction)
    return 0


if __name__ == "__main__":
    sys.exit(main())
