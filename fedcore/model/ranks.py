"""The ranks of a data-parallel trainer (torch.distributed): which samples of a global batch each one trains,
and the few collectives they share besides DistributedDataParallel's gradient averaging.

One process is world size 1 and calls no collective. With N ranks, every rank draws the same global batch (the
same generator, seeded alike) and trains its slice of it: rank r takes positions r, r + N, r + 2N, ... of the
batch, as `torch.utils.data.DistributedSampler` strides an epoch, so the N slices of batch k are exactly the B
images one process trains at step k. Each rank's loss is scaled so that DDP's average of the ranks' gradients
is the gradient of the mean over the global batch (`Ranks.loss_weight`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of one worker (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the rank's index on its host: its GPU is cuda:local_rank

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(f"rank {self.rank} (local rank {self.local_rank}) is not one of the {self.world_size} ranks")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Ranks:
        """The ranks torchrun (or `feddiff worker --nproc-per-node`) set in the environment; one rank without them."""
        env = os.environ if environ is None else environ
        try:
            return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))
        except ValueError as e:
            values = {k: env.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            raise ValueError(f"the environment's ranks {values} are not ranks of one worker: {e}") from e

    @property
    def leader(self) -> bool:
        """Rank 0: the one that talks to the coordinator and takes the delta."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, batch_size: int) -> slice:
        """This rank's positions in a global batch of `batch_size`: r, r + N, ... (empty when batch_size <= r)."""
        return slice(self.rank, batch_size, self.world_size)

    def share_size(self, batch_size: int) -> int:
        return len(range(self.rank, batch_size, self.world_size))

    def loss_weight(self, batch_size: int) -> float:
        """What this rank's loss (a mean over its n_r samples) is multiplied by: N n_r / B. DDP divides the sum
        of the ranks' gradients by N, so the result is sum_r n_r grad(mean_r) / B, the gradient of the mean over
        all B samples, for any split of the batch (the last one of an epoch may be short). 1.0 for one rank."""
        return self.world_size * self.share_size(batch_size) / batch_size

    # --- collectives (none with one rank) -------------------------------------------------------------------
    def any(self, flag: bool, group: dist.ProcessGroup | None = None) -> bool:
        """True on every rank when it is True on any (a stop asked of one rank stops all at the same step)."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32)  # on the CPU: `group` is a gloo group
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return bool(value.item())

    @torch.no_grad()
    def broadcast_model(self, model: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers copied into every other rank's model, in place."""
        if self.distributed:
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)

    def global_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """The per-step losses of the global batches from each rank's weighted ones: their sum over ranks / N."""
        if not self.distributed:
            return losses
        total = losses.detach().float().clone()
        dist.all_reduce(total)
        return total / self.world_size
