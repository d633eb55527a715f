"""The ranks of a data-parallel trainer: their shares of a global batch and the loss weight that makes DDP's
average of their gradients the global batch's."""

from __future__ import annotations

import pytest
import torch

from fedcore.model.ranks import Ranks


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 2, 3, 7, 16, 33])
def test_the_shares_of_a_batch_split_it_as_a_distributed_sampler_strides_it(world: int, batch: int) -> None:
    positions = [list(range(batch))[Ranks(r, world).share(batch)] for r in range(world)]

    assert sorted(p for share in positions for p in share) == list(range(batch)), "disjoint, and all of the batch"
    assert positions == [list(range(r, batch, world)) for r in range(world)]
    assert [Ranks(r, world).share_size(batch) for r in range(world)] == [len(p) for p in positions]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 3, 5, 16])
def test_ddp_average_of_weighted_share_means_is_the_mean_of_the_batch(world: int, batch: int) -> None:
    values = torch.rand(batch, dtype=torch.float64)  # per-sample losses (or a gradient's per-sample terms)
    weighted = []
    for r in range(world):
        ranks = Ranks(r, world)
        share = values[ranks.share(batch)]
        weighted.append(share.mean() * ranks.loss_weight(batch) if len(share) else torch.zeros((), dtype=torch.float64))

    assert torch.allclose(torch.stack(weighted).sum() / world, values.mean())  # DDP divides the sum over ranks by N


def test_one_rank_trains_at_weight_one_and_calls_no_collective() -> None:
    ranks = Ranks()

    assert ranks.loss_weight(7) == 1.0 and ranks.share(7) == slice(0, 7, 1)
    assert ranks.any(True) and not ranks.any(False)
    losses = torch.tensor([0.5, 0.25])
    assert ranks.global_losses(losses) is losses


def test_ranks_from_the_environment_are_checked() -> None:
    assert Ranks.from_env({}) == Ranks()
    assert Ranks.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Ranks(1, 2, 1)
    with pytest.raises(ValueError, match=r"rank 2 .* is not one of the 2 ranks"):
        Ranks.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        Ranks.from_env({"RANK": "0", "WORLD_SIZE": "two"})
