"""The ranks of one multi-process worker as a team: their process group, and rank 0's word to the others.

Rank 0 alone talks to the coordinator. For each train task it sends the other ranks the task's training
settings and seed through the process group's TCP store, then broadcasts the weights it loaded, and all ranks
train together (DistributedDataParallel); the delta is taken on rank 0. Between tasks the other ranks wait on
the store, not in a collective: a worker may wait for its next round far longer than any collective timeout.
Every collective of training is bounded by `collective_timeout`, so a rank that dies ends the others with an
error instead of a hang (the launcher, torchrun's agent, ends them at once when it sees a rank exit)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from fedcore.federation.client import TrainTask
from fedcore.model.ranks import Ranks
from fedcore.model.training import TrainConfig, TrainingInterrupted

log = logging.getLogger("feddiff.worker")

POLL_SECONDS = 0.2  # how often a waiting rank looks for rank 0's next command


class RanksLost(Exception):
    """The team cannot go on: a rank, or the store rank 0 serves, is gone."""


@dataclass(frozen=True)
class Command:
    """What rank 0 asks of the other ranks: train `model` as `train` says, seeded by `seed` (a task's training),
    or stop with `exit_code`."""

    kind: Literal["train", "stop"]
    model: str = ""
    train: TrainConfig = TrainConfig()
    seed: int = 0
    exit_code: int = 0

    def encode(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> Command:
        d = json.loads(raw)
        return cls(**{**d, "train": TrainConfig(**d["train"])})


class Team:
    """This process's rank, the process group of all ranks (NCCL on GPUs, gloo on CPUs) with a gloo group
    beside it for the stop flag, and the store rank 0 posts its commands in (one key per command, numbered)."""

    def __init__(self, ranks: Ranks, device: torch.device, collective_timeout: float):
        self.ranks = ranks
        self.device = device
        self.timeout = datetime.timedelta(seconds=collective_timeout)
        env = os.environ
        # Under torchrun's agent the agent serves the store (TORCHELASTIC_USE_AGENT_STORE); otherwise rank 0 does.
        hosts_store = ranks.leader and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        try:
            address, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{ranks.world_size} ranks need MASTER_ADDR and MASTER_PORT (torchrun sets them): {e}") from e
        store = dist.TCPStore(address, port, ranks.world_size, is_master=hosts_store, timeout=self.timeout)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=ranks.rank, world_size=ranks.world_size, timeout=self.timeout)
        self.stop_group = dist.new_group(backend="gloo", timeout=self.timeout) if backend != "gloo" else None
        self.store = dist.PrefixStore("feddiff", store)
        self.sent = 0  # commands posted (rank 0) or read (the others)
        self.store.set(f"pid/{ranks.rank}", str(os.getpid()))
        log.info("rank %d of %d on %s (%s), pid %d", ranks.rank, ranks.world_size, device, backend, os.getpid())

    def pids(self) -> list[int]:
        """Every rank's process id, by rank (each posts its own as it starts; waits for them up to the timeout)."""
        return [int(self.store.get(f"pid/{r}")) for r in range(self.ranks.world_size)]

    # --- rank 0 ---------------------------------------------------------------------------------------------
    def _claim(self, command: Command) -> Command:
        """The team's next command: `command`, unless a rank has claimed its place first (rank 0 posts each
        command; a rank stopped as it waits claims the place of the next with a stop). The store's compare-and-set
        decides: a command and a stop are never both taken, and rank 0 never waits on a rank that is gone."""
        stored = self.store.compare_set(f"command/{self.sent}", "", command.encode())
        self.sent += 1
        return Command.decode(stored)

    def start_training(self, model_name: str, task: TrainTask, model: torch.nn.Module) -> None:
        """Rank 0: the others are told to train `task`, then get the weights rank 0 loaded (shared and private);
        TrainingInterrupted when a rank stopped first (it ends: all stop), RanksLost when a rank is gone."""
        if self._claim(Command("train", model_name, task.train, task.seed)).kind == "stop":
            raise TrainingInterrupted(f"rank 0: a rank stopped before task {task.task_id}")
        try:
            self.ranks.broadcast_model(model)
        except (RuntimeError, dist.DistError) as e:
            raise RanksLost(f"rank 0: the other ranks did not take the weights of task {task.task_id}: {e}") from e

    def stop(self, exit_code: int) -> None:
        """Rank 0: the others end with `exit_code` (they may be gone already)."""
        try:
            self._claim(Command("stop", exit_code=exit_code))
        except (RuntimeError, dist.DistError) as e:
            log.warning("rank 0: could not tell the other ranks to stop: %s", e)

    # --- the other ranks ------------------------------------------------------------------------------------
    def next_command(self, stopped: threading.Event | None = None) -> Command:
        """Rank 0's next command; RanksLost when the store is gone (rank 0 served it and died). Once `stopped` is
        set as this rank waits, it claims the next command's place with a stop (exit code 0) and returns that, or
        the command rank 0 posted first: a task then trains, and stops at its first step on every rank. A rank
        stopped alone thus ends at once, and its launcher ends the others."""
        key = f"command/{self.sent}"
        try:
            while not self.store.check([key]):
                if stopped is not None and stopped.is_set():
                    return self._claim(Command("stop"))
                time.sleep(POLL_SECONDS)
            self.sent += 1
            return Command.decode(self.store.get(key))
        except (RuntimeError, dist.DistError) as e:
            raise RanksLost(f"rank {self.ranks.rank}: rank 0's store is gone: {e}") from e

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
