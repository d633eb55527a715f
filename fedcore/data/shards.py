"""One client's shard: the training pool every shard is cut from, and client `index`'s images under a split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedcore import settings
from fedcore.data.datasets import ImageDataset, load_fashion_mnist
from fedcore.data.splits import SplitKind, split_indices
from fedcore.settings import Concentration, ExistingFolder, NonNegative, Positive, Seed


@dataclass(frozen=True)
class SplitConfig:
    """How Fashion-MNIST's training set is cut into the clients' shards: the same on every machine for one
    config. Every command that splits it holds one (flags --num-clients, --split, --beta, --split-seed,
    --max-images, --data-root), and `settings.build` checks each range once."""

    __pydantic_config__ = settings.CONFIG

    num_clients: Positive = 5  # K, the shards
    split: SplitKind = "iid"
    beta: Concentration = 0.5  # Dirichlet concentration of the skewed splits
    split_seed: Seed = 2023
    max_images: NonNegative = 0  # 0 = all 60,000; else the first n of a seeded shuffle (small experiments, tests)
    data_root: ExistingFolder | None = None  # Fashion-MNIST directory (default: Debian's dataset-fashion-mnist)


def load_training_pool(cfg: SplitConfig) -> ImageDataset:
    """The training images every client's shard is cut from (the same on every machine for a config)."""
    ds = load_fashion_mnist(train=True, root=cfg.data_root)
    if 0 < cfg.max_images < len(ds):
        rng = torch.Generator().manual_seed(cfg.split_seed)
        keep = torch.randperm(len(ds), generator=rng)[: cfg.max_images].sort().values.numpy()
        ds = ds.subset(keep)
    return ds


def shard_indices(cfg: SplitConfig, pool: ImageDataset) -> list[np.ndarray]:
    """Every client's shard of `pool` under the split of `cfg`: one sorted index array per client, in client order."""
    return split_indices(pool.class_labels(), cfg.num_clients, cfg.split, beta=cfg.beta, seed=cfg.split_seed)


def client_shard(cfg: SplitConfig, index: int, pool: ImageDataset | None = None) -> ImageDataset:
    """Client `index`'s private images under the split of `cfg`."""
    pool = pool if pool is not None else load_training_pool(cfg)
    if not 0 <= index < cfg.num_clients:
        raise ValueError(f"client index {index} is outside 0..{cfg.num_clients - 1}")
    return pool.subset(shard_indices(cfg, pool)[index])
