"""`feddiff model-info`, `strategies` and `split`: what a model preset, the strategies and a data split look
like, counted the paper's way, without training anything."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Annotated

from pydantic import BeforeValidator

from fedcore import settings
from fedcore.data.shards import SplitConfig
from fedcore.model.unet import ModelName, build_model, layout_of
from fedcore.payload.codecs import Codec, Identity
from fedcore.settings import Positive, Seed
from feddiff.args import RUN_MEANING, Command
from service import flags
from service.split_flags import RETIRED_SEED, SPLIT_MEANING, SPLIT_OLD_SPELLINGS


def _codec_names(value: object) -> object:
    """A comma list of codec names ('none,int8,topk:0.05+int8') as a tuple of them; ValueError naming the first
    that is no codec (`Codec.parse`, the check of a run's `compression`)."""
    if not isinstance(value, str):
        return value  # a tuple already (the default)
    names = tuple(name.strip() for name in value.split(","))
    for name in names:
        Codec.parse(name)
    return names


CodecNames = Annotated[tuple[str, ...], BeforeValidator(_codec_names), settings.Described("codec names, comma-separated")]


@dataclass(frozen=True)
class ModelInfoSettings:
    """Every setting of `feddiff model-info`."""

    __pydantic_config__ = settings.CONFIG

    model: ModelName = "paper-fmnist"  # model preset
    json: bool = False


MODEL_INFO_MEANING = {"model": RUN_MEANING["model"], "json": "one JSON object for scripts"}


def _add_model_info_flags(p: argparse.ArgumentParser) -> None:
    """model-info's flags: one per setting of ModelInfoSettings."""
    flags.add_flags(p, ModelInfoSettings, MODEL_INFO_MEANING)


def model_info(args: argparse.Namespace) -> int:
    """The parameters of a model preset, by part."""
    cfg = flags.build(ModelInfoSettings, args)
    layout = layout_of(build_model(cfg.model))
    parts = {p.value: n for p, n in layout.sizes.items()}
    if cfg.json:
        print(json.dumps({"model": cfg.model, "total": layout.total, "parts": parts}))
    else:
        print(f"{cfg.model}: {layout.total:,} parameters")
        for part, n in parts.items():
            print(f"  {part:<10} {n:>12,}  {n / layout.total:6.1%}")
    return 0


@dataclass(frozen=True)
class StrategiesSettings:
    """Every setting of `feddiff strategies`."""

    __pydantic_config__ = settings.CONFIG

    model: ModelName = "paper-fmnist"  # model preset
    num_clients: Positive = 5  # K, every one in every round
    rounds: Positive = 15  # R
    seed: Seed = 0  # USplit's pairing; the initial model the clients build (lossy codecs)
    compression: CodecNames = ("none",)  # the bytes are counted with each of these codecs
    json: bool = False

    def __post_init__(self) -> None:
        if self.num_clients * self.rounds > MAX_CLIENT_ROUNDS:
            raise ValueError(
                f"{flags.shown(self, 'num_clients')} and {flags.shown(self, 'rounds')} are {self.num_clients * self.rounds:,} "
                f"client-rounds, each counted one by one: give at most {MAX_CLIENT_ROUNDS:,}"
            )

    @property
    def codecs(self) -> list[Codec]:
        return [Codec.parse(name) for name in self.compression]


MAX_CLIENT_ROUNDS = 1_000_000  # K x R that `strategies` counts in about a minute
STRATEGIES_MEANING = {
    "model": RUN_MEANING["model"],
    "num_clients": "K, every client in every round",
    "rounds": "R, federated rounds",
    "seed": "the run's seed: it draws USplit's pairing and the initial model clients build",
    "compression": "the bytes with the updates coded by each of these codecs (e.g. none,int8,topk:0.05+int8); with a lossy codec the downloads "
    "are coded changes too, and the first contact is the initial model each client builds from the run's seed (nothing downloaded)",
    "json": "one JSON list for scripts",
}


def _add_strategies_flags(p: argparse.ArgumentParser) -> None:
    """strategies' flags: one per setting of StrategiesSettings."""
    flags.add_flags(p, StrategiesSettings, STRATEGIES_MEANING, metavars={"compression": "CODEC[,CODEC...]"}, old=SPLIT_OLD_SPELLINGS)


def strategies(args: argparse.Namespace) -> int:
    """The parameters each strategy exchanges over a run, and the bytes they take with each codec."""
    from fedcore.federation.strategies import Strategy, account, coded_bytes

    cfg = flags.build(StrategiesSettings, args)
    codecs = cfg.codecs
    layout = layout_of(build_model(cfg.model))
    summaries = [account(s, layout.sizes, cfg.num_clients, cfg.rounds, seed=cfg.seed) for s in Strategy]
    rows = [(summary, coded_bytes(summary, layout, c, seed=cfg.seed)) for summary in summaries for c in codecs]
    if cfg.json:
        print(json.dumps([{**summary.as_json(), **coded.as_json()} for summary, coded in rows], indent=2))
    else:
        print(f"{cfg.model}, K={cfg.num_clients}, R={cfg.rounds}; bytes without the payloads' safetensors headers")
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

    data: SplitConfig = SplitConfig()  # the split shown
    json: bool = False


def _add_split_flags(p: argparse.ArgumentParser) -> None:
    """split's flags: one per setting of SplitSettings; --seed, this command's split seed once, is refused."""
    flags.add_flags(p, SplitSettings, {**SPLIT_MEANING, "json": "one JSON list for scripts"}, old=SPLIT_OLD_SPELLINGS)
    flags.add_retired(p, "--seed", RETIRED_SEED)


def split(args: argparse.Namespace) -> int:
    """Each client's size and class histogram under a data split."""
    from fedcore.data.datasets import FASHION_MNIST_NUM_CLASSES
    from fedcore.data.shards import load_training_pool, shard_indices
    from fedcore.data.splits import describe_split

    cfg = flags.build(SplitSettings, args)
    pool = load_training_pool(cfg.data)  # the images the workers' shards are cut from (--max-images: a sample)
    shards = describe_split(pool.class_labels(), shard_indices(cfg.data, pool), FASHION_MNIST_NUM_CLASSES)
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
