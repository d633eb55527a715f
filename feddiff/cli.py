"""The `feddiff` command: one entry point, a subcommand per job; configs are built here, at the edge."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Handler] = {}


def _command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = fn
        return fn

    return register


# --- fedcore commands ---------------------------------------------------------------------------------------


@_command("model-info")
def _model_info(args: argparse.Namespace) -> int:
    from fedcore.model import build_model, layout_of

    layout = layout_of(build_model(args.model))
    info = {"model": args.model, "total": layout.total, "parts": {p.value: n for p, n in layout.sizes.items()}}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{args.model}: {layout.total:,} parameters")
        for part, n in info["parts"].items():  # type: ignore[union-attr]
            print(f"  {part:<10} {n:>12,}  {n / layout.total:6.1%}")
    return 0


@_command("strategies")
def _strategies(args: argparse.Namespace) -> int:
    from fedcore.model import build_model, layout_of
    from fedcore.strategies import Strategy, account

    sizes = layout_of(build_model(args.model)).sizes
    rows = [account(s, sizes, args.clients, args.rounds, seed=args.seed).as_json() for s in Strategy]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{args.model}, K={args.clients}, R={args.rounds}")
        for r in rows:
            print(f"  {r['strategy']:<8} {r['parameters_total']:>14,} parameters  reduction {r['reduction_vs_full']:.1%}")
    return 0


@_command("split")
def _split(args: argparse.Namespace) -> int:
    from fedcore.data import load_fashion_mnist
    from fedcore.splits import describe_split, split_indices

    labels = load_fashion_mnist(train=True, root=args.data_root).labels
    parts = split_indices(labels, args.clients, args.split, beta=args.beta, seed=args.seed)
    rows = describe_split(labels, parts)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"client {r['client']:>3}: {r['size']:>6} images  classes {r['classes']}")
    return 0


def _federation_config(args: argparse.Namespace):  # -> FederationConfig
    from fedcore.federation import FederationConfig
    from fedcore.strategies import Strategy
    from fedcore.training import TrainConfig

    return FederationConfig(
        strategy=Strategy(args.strategy),
        model=args.model,
        rounds=args.rounds,
        clients_per_round=args.clients_per_round,
        seed=args.seed,
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, loss=args.loss),
    )


def _speed_config(args: argparse.Namespace):  # -> SpeedConfig
    from fedcore.training import SpeedConfig

    return SpeedConfig(
        device=args.device,
        bf16=args.bf16,
        channels_last=args.channels_last,
        fused_adam=args.fused_adam,
        compile="off" if args.no_compile else args.compile,
        threads=args.threads,
    )


@_command("simulate")
def _simulate(args: argparse.Namespace) -> int:
    from fedcore.simulation import DataConfig, Simulation, SimulationConfig

    cfg = SimulationConfig(
        federation=_federation_config(args),
        data=DataConfig(
            num_clients=args.clients,
            split=args.split,
            beta=args.beta,
            split_seed=args.split_seed,
            max_images=args.max_images,
            root=args.data_root,
        ),
        speed=_speed_config(args),
    )
    sim = Simulation.create(cfg, args.out, resume=args.resume)
    sim.run()
    print(f"done: {sim.federation.completed_rounds} rounds, checkpoints in {args.out}")
    return 0


# --- argument parsing ---------------------------------------------------------------------------------------


def add_training_args(p: argparse.ArgumentParser) -> None:
    """The run's shape: shared by simulate and the coordinator (which sends it to the workers)."""
    p.add_argument("--strategy", choices=["full", "usplit", "udec", "ulatdec"], default="udec")
    p.add_argument("--model", default="paper-fmnist", help="model preset: paper-fmnist, paper-celeba64, tiny")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--clients-per-round", type=int, default=0, help="0 = every client, else a seeded sample")
    p.add_argument("--epochs", type=int, default=5, help="local epochs per round")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--loss", choices=["huber", "mse"], default="huber")
    p.add_argument("--seed", type=int, default=0)


def add_speed_args(p: argparse.ArgumentParser) -> None:
    toggles = ["auto", "on", "off"]
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--bf16", choices=toggles, default="auto", help="bf16 autocast (auto: on GPUs that support it)")
    p.add_argument("--channels-last", choices=toggles, default="auto")
    p.add_argument("--fused-adam", choices=toggles, default="auto")
    p.add_argument("--compile", choices=toggles, default="auto", help="torch.compile with CUDA graphs (auto: on CUDA)")
    p.add_argument("--no-compile", action="store_true", help="same as --compile off")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=["iid", "quantity", "label"], default="iid")
    p.add_argument("--beta", type=float, default=0.5, help="Dirichlet concentration of the skewed splits")
    p.add_argument("--split-seed", type=int, default=2023)
    p.add_argument("--max-images", type=int, default=0, help="use only this many training images (0 = all)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: Debian's package)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddiff", description="Federated training of diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("model-info", help="parameter counts of a model preset, by part")
    p.add_argument("--model", default="paper-fmnist")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("strategies", help="parameters each strategy exchanges, counted the paper's way")
    p.add_argument("--model", default="paper-fmnist")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--seed", type=int, default=0, help="seeds USplit's random pairing")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("split", help="each client's size and class histogram under a data split")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--split", choices=["iid", "quantity", "label"], default="iid")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=2023)
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("simulate", help="a whole federated run in one process (experiments on one GPU)")
    add_training_args(p)
    add_data_args(p)
    add_speed_args(p)
    p.add_argument("--clients", type=int, default=5, help="K; --clients 1 --strategy full is the centralised baseline")
    p.add_argument("--out", default="runs/simulate", help="output folder: rounds.jsonl and checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"feddiff {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
