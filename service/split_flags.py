"""The data split's flags as every command that cuts Fashion-MNIST into shards takes them (worker, simulate,
reproduce, split, strategies): what each means, and the spellings they had before they were one config
(`fedcore.data.shards.SplitConfig` holds their types, ranges and defaults)."""

from __future__ import annotations

# What each flag of a data split means; a command may say more of K.
SPLIT_MEANING = {
    "num_clients": "K, the clients the training set is split among",
    "split": "how the clients' shards are drawn",
    "beta": "Dirichlet concentration of the skewed splits",
    "split_seed": "seed of the split and of the --max-images sample",
    "max_images": "use only this many training images, drawn before splitting (0 = all)",
    "data_root": "Fashion-MNIST IDX folder (default: Debian's package)",
}
# --clients, K's old spelling, still works with a notice; --seed, the split's seed in the worker and split
# commands but the run's seed elsewhere, is refused there, naming the flag to give instead.
SPLIT_OLD_SPELLINGS = {"num_clients": ("--clients",)}
RETIRED_SEED = "no longer names the split's seed (--seed seeds the run in the coordinator, simulate, reproduce and strategies): give --split-seed"
