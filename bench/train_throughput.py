"""Training throughput of the worker's fast path against the paper-style loop, in one process.

Same model (paper-fmnist), batch 128, real Fashion-MNIST, same device:
- paper loop: a DataLoader over a Dataset with per-item transforms (uint8 -> float in [0, 1] -> [-1, 1]), the
  batch copied to the device every step, fp32, eager, torch.optim.Adam (as "The Annotated Diffusion Model").
- fast path: fedcore.model.training.LocalTrainer as the worker builds it (data on the device, bf16 autocast,
  channels_last, fused Adam, torch.compile with CUDA graphs on CUDA; each of them per the --flags).
The two run in alternating blocks so that both see the same machine load. Also measured: compile time (the
first steps of the fast path less as many steady steps), the steady-state time of a whole round (load the
received weights, train one epoch of a 12,000-image shard, produce the delta payload), and the loss-curve
check: the fast path against fp32 eager from the same init and seed for 200 steps, within bf16 tolerance.

    python -m bench.train_throughput --quick                        # CPU, under 3 minutes
    python -m bench.train_throughput --data-root DIR                # a GPU: everything in one command

With --nproc-per-node N it measures the worker's trainer on N ranks instead (torch.distributed DDP, NCCL on
GPUs, gloo on CPUs, launched as `feddiff worker --nproc-per-node` launches them; N = 1 is the one-process
trainer): the global images/s at the global batch --batch-size (each rank trains B/N of it), and the largest
difference between the weights after --curve-steps steps on N ranks and on one process from the same init and
seed (the delta's equivalence; run with --bf16 off for fp32, where it is float32 rounding).

    python -m bench.train_throughput --quick --nproc-per-node 2     # CPU: 2 gloo ranks
    python -m bench.train_throughput --data-root DIR --nproc-per-node 8   # a host of 8 GPUs
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bench.report import emit, log, machine, median
from fedcore.data.datasets import load_fashion_mnist, to_model_range
from fedcore.federation.client import ClientRuntime, TrainTask
from fedcore.model.diffusion import LossKind, Schedule, training_loss
from fedcore.model.parts import ALL_PARTS
from fedcore.model.ranks import Ranks
from fedcore.model.training import LocalTrainer, ResolvedSpeed, SpeedConfig, Toggle, TrainConfig, resolve_device
from fedcore.model.unet import build_model
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta

MODEL = "paper-fmnist"
BF16_EPS = 2.0**-8  # the loss curves may differ by bf16 rounding: 4 eps at any step, 1 eps on average


def fp32_eager(device: torch.device) -> SpeedConfig:
    return SpeedConfig(device=str(device), bf16="off", channels_last="off", fused_adam="off", compile="off")


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to run (GPU defaults, or small ones for --quick on a CPU)."""

    warmup: int  # fast-path steps before timing (compilation happens here)
    steps: int  # steps per timed block, each side
    blocks: int  # alternating blocks per side
    shard: int  # images in the round's shard
    rounds: int  # timed rounds (after an untimed warm-up round when compiling)
    curve_steps: int  # steps of the loss-curve check


def plan_for(device: torch.device, quick: bool) -> Plan:
    if device.type == "cuda":
        return Plan(warmup=20, steps=100, blocks=3, shard=12_000, rounds=3, curve_steps=200)
    if quick:
        return Plan(warmup=1, steps=2, blocks=2, shard=256, rounds=1, curve_steps=2)
    return Plan(warmup=2, steps=10, blocks=2, shard=12_000, rounds=1, curve_steps=200)


# --- the paper-style loop -----------------------------------------------------------------------------------


class PaperStyleDataset(Dataset):
    """Fashion-MNIST as torchvision would serve it: one image at a time, transformed per item."""

    def __init__(self, images: np.ndarray):
        self.images = images  # (N, 1, 28, 28) uint8

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(self.images[i]).float().div(255)  # ToTensor: [0, 255] -> [0, 1]
        return x * 2 - 1  # Lambda(lambda t: (t * 2) - 1)


class PaperLoop:
    """The training loop of the paper's code: fp32, eager, a fresh DataLoader epoch after epoch."""

    def __init__(self, images: np.ndarray, device: torch.device, batch_size: int, workers: int, seed: int):
        self.device = device
        self.schedule = Schedule()
        self.model = build_model(MODEL, seed=seed).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.loader = DataLoader(PaperStyleDataset(images), batch_size=batch_size, shuffle=True, num_workers=workers)
        self._batches = self._forever()
        self.step_count = 0

    def _forever(self) -> Iterator[torch.Tensor]:
        while True:
            yield from self.loader

    def run(self, steps: int) -> tuple[int, float]:
        """(images, seconds) of `steps` training steps, timed to the last kernel."""
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False  # the paper's code leaves it off; the fast trainer turns it on
        try:
            sync(self.device)
            start, images = time.perf_counter(), 0
            for _ in range(steps):
                batch = next(self._batches).to(self.device)
                self.optimizer.zero_grad()
                loss = training_loss(self.model, self.schedule, batch, "huber")
                if self.step_count % 100 == 0:
                    log(f"paper loop step {self.step_count}: loss {loss.item():.4f}")
                loss.backward()
                self.optimizer.step()
                images += batch.shape[0]
                self.step_count += 1
            sync(self.device)
            return images, time.perf_counter() - start
        finally:
            torch.backends.cudnn.benchmark = benchmark


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the fast path ------------------------------------------------------------------------------------------


def fast_block(trainer: LocalTrainer, data: torch.Tensor, steps: int, batch: int, seed: int, loss: LossKind = "huber") -> tuple[int, float]:
    """One epoch over `steps` full batches of `data` (TrainResult.seconds ends with the losses on the host)."""
    n = steps * batch
    start = (seed * n) % max(1, data.shape[0] - n + 1)
    result = trainer.train(data[start : start + n], TrainConfig(epochs=1, batch_size=batch, loss=loss), seed=seed)
    return result.images_seen, result.seconds


def compare(
    name: str, run_reference: Callable[[int], tuple[int, float]], fast: LocalTrainer, data: torch.Tensor,
    *, batch: int, warmup: int, steps: int, blocks: int, loss: LossKind = "huber",
) -> dict[str, float | bool]:  # fmt: skip
    """A reference loop (`run_reference(steps)` -> images, seconds) against the fast path in alternating blocks,
    after the fast path's warm-up: each side's images/s as `<name>_images_per_s` and `fast_images_per_s`, the
    compile time (the warm-up less as many steady steps) and the fast path's settings."""
    run_reference(1)  # allocator and DataLoader warm-up
    sync(fast.speed.device)
    start = time.perf_counter()
    fast_block(fast, data, warmup, batch, seed=10_000, loss=loss)
    warm_seconds = time.perf_counter() - start
    totals = {name: [0, 0.0], "fast": [0, 0.0]}
    for b in range(blocks):
        for side in (name, "fast"):
            n, s = run_reference(steps) if side == name else fast_block(fast, data, steps, batch, seed=b, loss=loss)
            totals[side][0] += n
            totals[side][1] += s
            log(f"block {b} {side}: {n / s:.1f} images/s")
    fast_ips = totals["fast"][0] / totals["fast"][1]
    compile_seconds = max(0.0, warm_seconds - warmup * batch / fast_ips) if fast.speed.compile else 0.0
    figures: dict[str, float | bool] = {f"fast_{k}": getattr(fast.speed, k) for k in ("bf16", "channels_last", "fused_adam", "compile")}
    figures.update({f"{name}_images_per_s": totals[name][0] / totals[name][1], "fast_images_per_s": fast_ips, "compile_seconds": compile_seconds})
    return figures


def round_seconds(trainer: LocalTrainer, shard: torch.Tensor, batch: int, rounds: int) -> float:
    """Median steady-state time of a whole round: load the received weights, one epoch, the delta payload."""
    runtime = ClientRuntime("bench", MODEL, trainer, shard)
    state = {k: v.detach().float().cpu().clone() for k, v in trainer.model.state_dict().items()}
    times = []
    warmup = 1 if trainer.speed.compile else 0  # the first compiled round also compiles the last batch's shape
    for r in range(rounds + warmup):
        task = TrainTask(r, f"r{r}", ALL_PARTS, ALL_PARTS, frozenset(), TrainConfig(epochs=1, batch_size=batch), seed=r)
        payload = bytearray(serialization.encode(state, PayloadMeta(kind="weights", model=MODEL, wire_round=r, parts=ALL_PARTS)))
        sync(trainer.speed.device)
        start = time.perf_counter()
        runtime.load(payload, task)
        runtime.train(task)
        delta_payload = runtime.delta_payload(task)
        seconds = time.perf_counter() - start
        log(f"round {r}: {seconds:.2f}s for {shard.shape[0]} images ({len(delta_payload) / 1e6:.1f} MB delta)")
        if r >= warmup:
            times.append(seconds)
    return median(times)


def loss_curve_check(fast: LocalTrainer, images: torch.Tensor, steps: int, batch: int, seed: int) -> dict[str, object]:
    """The fast path (reused, weights reset in place) against a fresh fp32 eager trainer: same init, same seed."""
    init = build_model(MODEL, seed=seed).state_dict()
    fast.model.load_state_dict(init)  # copies in place: the compiled graphs keep their parameters
    reference = LocalTrainer(build_model(MODEL, seed=seed), Schedule(), fp32_eager(fast.speed.device))
    cfg = TrainConfig(epochs=1, batch_size=batch)
    data = images[: steps * batch]
    a = fast.train(fast.prepare_data(data), cfg, seed=seed).losses
    b = reference.train(reference.prepare_data(data), cfg, seed=seed).losses
    rel = [abs(x - y) / y for x, y in zip(a, b, strict=True)]
    ok = max(rel) <= 4 * BF16_EPS and sum(rel) / len(rel) <= BF16_EPS
    return {
        "curve_steps": len(rel),
        "curve_max_rel_diff": max(rel),
        "curve_mean_rel_diff": sum(rel) / len(rel),
        "curve_within_bf16_tolerance": ok,
    }


# --- ranks ----------------------------------------------------------------------------------------------------


def ranks_figures(args: argparse.Namespace, plan: Plan) -> dict[str, object]:
    """On every rank (from the environment; one rank without it): the trainer's images/s in `plan.blocks` blocks
    of `plan.steps` global batches after `plan.warmup`, then the equivalence check; rank 0's figures count."""
    from worker.launch import rank_speed
    from worker.team import Team

    ranks = Ranks.from_env()
    device = resolve_device(args.device)
    if args.threads == 0 and device.type == "cpu":  # the cores shared among the ranks, as the worker does
        args.threads = max(1, (os.cpu_count() or 1) // ranks.world_size)
    speed = rank_speed(speed_from(args, device), ranks)
    team = Team(ranks, resolve_device(speed.device), collective_timeout=300) if ranks.distributed else None
    trainer = LocalTrainer(build_model(MODEL, seed=args.seed), Schedule(), speed, ranks, team.stop_group if team else None)
    images = to_model_range(load_fashion_mnist(train=True, root=args.data_root).images[: plan.shard])
    data = trainer.prepare_data(images)
    batch = args.batch_size
    fast_block(trainer, data, plan.warmup, batch, seed=10_000)  # builds DDP (and compiles)
    blocks = []
    for b in range(plan.blocks):
        n, seconds = fast_block(trainer, data, plan.steps, batch, seed=b)
        blocks.append(n / seconds)
        log(f"rank {ranks.rank}: block {b}: {n / seconds:.1f} images/s")
    figures: dict[str, object] = {
        **machine(), "device": str(trainer.speed.device), "model": MODEL, "ranks": ranks.world_size,
        "backend": "nccl" if trainer.speed.device.type == "cuda" else "gloo" if team else "none",
        "threads_per_rank": torch.get_num_threads(), "batch_size": batch, "batch_per_rank": batch / ranks.world_size,
        "bf16": trainer.speed.bf16, "compile": trainer.speed.compile, "images_per_s": median(blocks),
    }  # fmt: skip
    figures.update(_equivalence(trainer, images, speed, plan.curve_steps, batch, args.seed))
    if team is not None:
        team.close()
    return figures


def _equivalence(trainer: LocalTrainer, images: torch.Tensor, speed: SpeedConfig, steps: int, batch: int, seed: int) -> dict[str, object]:
    """`steps` steps from the same init and seed on the ranks and, on rank 0, in one process: the largest
    element of the delta and the largest difference between the two (0 on one rank, where they are the same)."""
    init = build_model(MODEL, seed=seed).state_dict()
    trainer.model.load_state_dict(init)  # in place: DDP and compiled graphs keep their parameters
    cfg = TrainConfig(epochs=1, batch_size=batch)
    trainer.train(trainer.prepare_data(images[: steps * batch]), cfg, seed=seed)
    if not trainer.ranks.leader:
        return {}
    ranked = {k: v.detach().float().cpu() for k, v in trainer.model.state_dict().items()}
    alone = ranked
    if trainer.ranks.distributed:
        single = LocalTrainer(build_model(MODEL, seed=seed), Schedule(), speed)
        single.train(single.prepare_data(images[: steps * batch]), cfg, seed=seed)
        alone = {k: v.detach().float().cpu() for k, v in single.model.state_dict().items()}
    return {
        "equivalence_steps": steps,
        "delta_max_abs": max(float((alone[k] - init[k].float()).abs().max()) for k in init),
        "delta_max_abs_diff_vs_one_process": max(float((ranked[k] - alone[k]).abs().max()) for k in init),
    }


def _rank_main(args: argparse.Namespace, plan: Plan) -> dict[str, object]:
    """A spawned rank (module level: the launcher pickles it by name)."""
    return ranks_figures(args, plan)


def run_ranks(args: argparse.Namespace, plan: Plan) -> dict[str, object]:
    """`ranks_figures` on --nproc-per-node ranks of this host, started by torch's launcher (one: in-process)."""
    if args.nproc_per_node == 1:
        return ranks_figures(args, plan)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=args.nproc_per_node, run_id=f"bench-{os.getpid()}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, start_method="spawn",
    )  # fmt: skip
    return elastic_launch(config, _rank_main)(args, plan)[0]


# --- main ---------------------------------------------------------------------------------------------------


def add_speed_flags(p: argparse.ArgumentParser) -> None:
    """--threads and the fast path's toggles (speed_from reads them)."""
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    for name in ("bf16", "channels-last", "fused-adam", "compile"):
        p.add_argument(f"--{name}", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--no-compile", action="store_true")


def speed_from(args: argparse.Namespace, device: torch.device) -> SpeedConfig:
    """The fast path's settings from add_speed_flags' flags; sets torch's CPU threads."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    compile_: Toggle = "off" if args.no_compile else args.compile
    return SpeedConfig(device=str(device), bf16=args.bf16, channels_last=args.channels_last, fused_adam=args.fused_adam, compile=compile_)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few steps and a small round shard (CPU, under 3 minutes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: Debian's package)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--paper-workers", type=int, default=0, help="DataLoader workers of the paper loop")
    p.add_argument("--seed", type=int, default=0)
    add_speed_flags(p)
    p.add_argument("--nproc-per-node", type=int, default=0, help="measure the trainer on this many ranks instead (see above)")
    for name in ("warmup", "steps", "blocks", "shard", "rounds", "curve-steps"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the plan")
    args = p.parse_args()

    device = resolve_device(args.device)
    plan = plan_for(device, args.quick)
    plan = Plan(**{f: getattr(args, f) if getattr(args, f) is not None else getattr(plan, f) for f in Plan.__dataclass_fields__})
    if args.nproc_per_node < 0:
        p.error(f"--nproc-per-node {args.nproc_per_node}: expected a number of ranks (1 or more)")
    if args.nproc_per_node:
        emit(run_ranks(args, plan))
        return 0
    speed = speed_from(args, device)
    resolved = ResolvedSpeed.of(speed)
    batch = args.batch_size
    images = load_fashion_mnist(train=True, root=args.data_root).images  # (60000, 1, 28, 28) uint8
    log(f"device {device}, fast path {resolved}, plan {plan}")

    paper = PaperLoop(images, device, batch, args.paper_workers, args.seed)
    fast = LocalTrainer(build_model(MODEL, seed=args.seed), Schedule(), speed)
    data = fast.prepare_data(to_model_range(images))

    speeds = compare("paper", paper.run, fast, data, batch=batch, warmup=plan.warmup, steps=plan.steps, blocks=plan.blocks)

    shard = data[: plan.shard]
    round_s = round_seconds(fast, shard, batch, plan.rounds)
    curve = loss_curve_check(fast, to_model_range(images), plan.curve_steps, batch, args.seed)

    figures: dict[str, object] = {**machine(), "device": str(device), "model": MODEL, "batch_size": batch, **speeds}
    figures.update(
        {
            "round_shard_images": int(shard.shape[0]),
            "round_seconds": round_s,
            **curve,
            "speedup_vs_paper_loop": float(speeds["fast_images_per_s"]) / float(speeds["paper_images_per_s"]),
        }
    )
    emit(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
