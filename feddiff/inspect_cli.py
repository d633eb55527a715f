"""`feddiff model-info`, `strategies` and `split`: what a model preset, the strategies and a data split look
like, counted the paper's way, without training anything."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from fedcore import flags, settings
from fedcore.data.splits import SplitKind
from fedcore.settings import Concentration, ExistingFolder, Positive, Seed
from feddiff.args import RUN_MEANING, Command


def _add_model_flag(p: argparse.ArgumentParser) -> None:
    from fedcore.model.unet import ModelName

    flags.add_flag(p, "model", ModelName, "paper-fmnist", "model preset")
    p.set_defaults(model="paper-fmnist")  # no typed config here: the handler reads the flag as it is


def _add_model_info_flags(p: argparse.ArgumentParser) -> None:
    """model-info's flags."""
    _add_model_flag(p)
    p.add_argument("--json", action="store_true")


def model_info(args: argparse.Namespace) -> int:
    """The parameters of a model preset, by part."""
    from fedcore.model.unet import build_model, layout_of

    layout = layout_of(build_model(args.model))
    parts = {p.value: n for p, n in layout.sizes.items()}
    if args.json:
        print(json.dumps({"model": args.model, "total": layout.total, "parts": parts}))
    else:
        print(f"{args.model}: {layout.total:,} parameters")
        for part, n in parts.items():
            print(f"  {part:<10} {n:>12,}  {n / layout.total:6.1%}")
    return 0


def _add_strategies_flags(p: argparse.ArgumentParser) -> None:
    """strategies' flags."""
    _add_model_flag(p)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--seed", type=int, default=0, help="seeds USplit's random pairing")
    p.add_argument(
        "--compression",
        default="none",
        metavar="CODEC[,CODEC...]",
        help="the bytes with the updates coded by each of these codecs (e.g. none,int8,topk:0.05+int8); with a lossy codec the downloads "
        "are coded changes too, and the first contact is the initial model each client builds from the run's seed (nothing downloaded)",
    )
    p.add_argument("--json", action="store_true")


def strategies(args: argparse.Namespace) -> int:
    """The parameters each strategy exchanges over a run, and the bytes they take with each codec."""
    from fedcore.federation.strategies import Strategy, account, coded_bytes
    from fedcore.model.unet import build_model, layout_of
    from fedcore.payload.codecs import Codec, Identity

    try:
        codecs = [Codec.parse(name.strip()) for name in args.compression.split(",")]
    except ValueError as e:
        print(f"feddiff strategies: --compression: {e}", file=sys.stderr)
        return 2
    layout = layout_of(build_model(args.model))
    summaries = [account(s, layout.sizes, args.clients, args.rounds, seed=args.seed) for s in Strategy]
    rows = [(summary, coded_bytes(summary, layout, c, seed=args.seed)) for summary in summaries for c in codecs]
    if args.json:
        print(json.dumps([{**summary.as_json(), **coded.as_json()} for summary, coded in rows], indent=2))
    else:
        print(f"{args.model}, K={args.clients}, R={args.rounds}; bytes without the payloads' safetensors headers")
        if any(not isinstance(c, Identity) for c in codecs):
            print("  lossy codecs: downloads are coded changes; the first contact builds the initial model from the run's seed (nothing downloaded)")
        for summary, coded in rows:
            print(
                f"  {summary.strategy.value:<8} {coded.compression:<16} {summary.traffic.total:>14,} parameters  reduction {summary.reduction_vs_full:6.1%}  "
                f"{coded.bytes_down / 1e6:9.1f} MB down {coded.bytes_up / 1e6:8.1f} MB up: {coded.bytes_vs_fedavg_fp32:.2f}x fewer than plain FedAvg float32"
            )
    return 0


@dataclass(frozen=True)
class SplitSettings:
    """Every setting of `feddiff split`."""

    __pydantic_config__ = settings.CONFIG

    clients: Positive = 5  # K
    split: SplitKind = "iid"
    beta: Concentration = 0.5
    seed: Seed = 2023
    data_root: ExistingFolder | None = None
    json: bool = False


SPLIT_MEANING = {**RUN_MEANING, "clients": "K", "seed": "seed of the split", "json": "one JSON list for scripts"}


def _add_split_flags(p: argparse.ArgumentParser) -> None:
    """split's flags: one per setting of SplitSettings."""
    flags.add_flags(p, SplitSettings, SPLIT_MEANING)


def split(args: argparse.Namespace) -> int:
    """Each client's size and class histogram under a data split."""
    from fedcore.data.datasets import load_fashion_mnist
    from fedcore.data.splits import describe_split, split_indices

    cfg = flags.build(SplitSettings, args)
    labels = load_fashion_mnist(train=True, root=cfg.data_root).class_labels()
    shards = describe_split(labels, split_indices(labels, cfg.clients, cfg.split, beta=cfg.beta, seed=cfg.seed))
    if cfg.json:
        print(json.dumps([shard.as_json() for shard in shards]))
    else:
        for shard in shards:
            print(f"client {shard.client:>3}: {shard.num_examples:>6} images  classes {list(shard.classes)}")
    return 0


COMMANDS = {
    "model-info": Command(_add_model_info_flags, model_info),
    "strategies": Command(_add_strategies_flags, strategies),
    "split": Command(_add_split_flags, split),
}
