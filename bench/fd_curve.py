"""What image quality costs on this machine: the centralised cell of a reproduction protocol trained for more
rounds, its FD scored after every round on the protocol's full sample count, and the images it took to reach
one tenth of the FD of uniform noise (the level at which samples read as garments rather than noise).

It runs `feddiff reproduce`'s own cell runner (fedcore.experiments.reproduce.run_cell) with the protocol's settings and
only the round count changed, so every point is what a longer `cpu` row would have scored.

    python -m bench.fd_curve --rounds 15                 # the cpu protocol, 15 x 60,000 images (51 min on 2 CPU cores)
    python -m bench.fd_curve --rounds 5 --batch-size 160 # as many optimizer steps as the cpu protocol's FedAvg (K = 5)
    python -m bench.fd_curve --quick                     # 2 rounds of 2,000 images, seconds
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from bench.report import emit, log, machine
from fedcore.data.shards import SplitConfig
from fedcore.experiments.reproduce import ALL_DATA, CENTRALISED, PROTOCOLS, Cell, Evaluator, ReproduceConfig, run_cell
from fedcore.model.training import SpeedConfig

TENTH = 0.1  # the target: FD at most one tenth of uniform noise's


def curve(
    protocol: str, rounds: int, max_images: int, samples: int, out: Path, data_root: str | None,
    batch_size: int = 0, lr: float = 0.0,
) -> dict[str, object]:  # fmt: skip
    p = PROTOCOLS[protocol]
    p = replace(
        p, rounds=rounds, eval_every=1, curve_samples=samples, samples=samples, max_images=max_images or p.max_images,
        batch_size=batch_size or p.batch_size, lr=lr or p.lr,
    )  # fmt: skip
    cell = Cell(CENTRALISED, ALL_DATA)
    cfg = ReproduceConfig(
        protocol=p, cells=(cell,), out=out, results=out / "results.jsonl", docs=None, data=SplitConfig(data_root=data_root), speed=SpeedConfig()
    )
    evaluator = Evaluator.create(cfg, log)
    row = run_cell(cfg, cell, evaluator, log)
    per_round = row.images * p.epochs
    figures: dict[str, object] = {"protocol": protocol, "model": p.model, "lr": p.lr, "batch_size": p.batch_size}
    figures.update(machine())
    figures["samples"] = samples
    figures["sampler"] = row.sampler
    figures["noise_fd"] = evaluator.baselines.noise
    figures["floor_fd"] = evaluator.baselines.floor
    figures["images_per_second"] = rounds * per_round / row.train_seconds
    reached = None
    for point in row.curve:
        seen = point.round_number * per_round
        figures[f"fd_after_{seen}_images"] = point.fd_mean
        if reached is None and point.fd_mean <= TENTH * evaluator.baselines.noise:
            reached = seen
    figures["images_to_tenth_of_noise"] = reached if reached is not None else f"not_reached_in_{rounds * per_round}"
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default="cpu", choices=sorted(PROTOCOLS), help="settings of the centralised cell")
    parser.add_argument("--rounds", type=int, default=15, help="rounds (epochs over the data) to train")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="batch size (default: the protocol's); K x the protocol's batch gives a centralised run as many optimizer steps as K clients' FedAvg",
    )
    parser.add_argument("--lr", type=float, default=0.0, help="Adam's lr (default: the protocol's)")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: Debian's package)")
    parser.add_argument("--out", default="", help="run folder (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2,000 images, 200 samples: checks that it runs")
    args = parser.parse_args()
    rounds, max_images, samples = (2, 2000, 200) if args.quick else (args.rounds, 0, PROTOCOLS[args.protocol].samples)
    if rounds < 1:
        raise SystemExit(f"--rounds is {rounds}, expected >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        emit(curve(args.protocol, rounds, max_images, samples, out, args.data_root, args.batch_size, args.lr))


if __name__ == "__main__":
    main()
