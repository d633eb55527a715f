"""Whole federated experiments without a network: the same planning, training, bytes and aggregation as the
gRPC system, with every payload serialized, chunked, reassembled and checked on its way. The clients train in
this process, or in parallel in one process per device (fedcore.experiments.devices), to the same bytes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedcore.atomic import FolderInUse, lock_folder
from fedcore.data.shards import SplitConfig, load_training_pool, shard_indices
from fedcore.errors import ExistingRun
from fedcore.experiments.devices import ClientJob, ClientTraining, DevicePool, InProcessTraining, KeptState
from fedcore.federation import checkpoint
from fedcore.federation.engine import Federation, FederationConfig, OpenRound, RoundOutcome
from fedcore.federation.roundlog import ROUNDS_LOG, RoundRecord, format_round, round_record, truncate_log
from fedcore.federation.strategies import private_parts
from fedcore.model.training import SpeedConfig
from fedcore.payload.pretrained import initial_weights
from fedcore.wire.stream import DEFAULT_CHUNK_SIZE, Reassembler, StreamHeader, iter_chunks

CLIENTS = "clients"  # each client's private parts, by round
RESIDUALS = "residuals"  # each client's error-feedback residuals (a lossy compression), by round


def client_ids(num_clients: int) -> list[str]:
    return [f"client-{i}" for i in range(num_clients)]


def transfer(payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> bytearray | memoryview:
    """Send a payload through the chunked stream format and back, with all the receiver's checks."""
    header = StreamHeader.of(payload)
    receiver = Reassembler(header, max_bytes=len(payload))
    for chunk in iter_chunks(payload, chunk_size):
        receiver.feed(chunk)
    return receiver.finish()


@dataclass(frozen=True)
class SimulationConfig:
    federation: FederationConfig
    data: SplitConfig = SplitConfig()
    speed: SpeedConfig = SpeedConfig()
    chunk_size: int = DEFAULT_CHUNK_SIZE
    init_from: str = ""  # the starting global model: a diffusers UNet or pipeline folder, or a feddiff .safetensors


@dataclass
class SimulatedClient:
    """One client of a simulation as the run keeps it between rounds: its shard and its private tensors."""

    client_id: str
    images: np.ndarray  # (N, C, H, W) uint8: its shard of the training pool
    private_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # on the CPU: the values of the parts it keeps for good
    kept: KeptState = field(default_factory=lambda: KeptState({}, {}, -1))  # a compressed run's residuals and shared model

    @property
    def num_examples(self) -> int:
        return len(self.images)


@dataclass
class Simulation:
    """A resumable run: the federation, K clients, what trains them (one trainer in this process, or a pool of
    processes over several devices), and the output folder."""

    config: SimulationConfig
    out_dir: Path
    federation: Federation
    clients: dict[str, SimulatedClient]
    training: ClientTraining
    log: Callable[[str], None] = print
    records: list[RoundRecord] = field(default_factory=list)  # the rounds this process ran, as logged
    lock_fd: int | None = None  # this process's lock on out_dir (`close` releases it)

    @classmethod
    def create(
        cls,
        cfg: SimulationConfig,
        out_dir: str | Path,
        *,
        resume: bool = False,
        log: Callable[[str], None] = print,
        pool: DevicePool | None = None,
    ) -> Simulation:
        """The run in `out_dir` (resumed from its last checkpoint, or new); its clients train on `pool`'s
        processes when one is given, else in this process on `cfg.speed`'s device. The folder is locked for this
        process until `close` (or the process's end): ValueError naming --out-dir when another one holds it.
        Nothing is written before every check has passed."""
        out = Path(out_dir)
        fcfg = cfg.federation
        federation = Federation.restore(fcfg, out) if resume else None
        existing = None if resume else checkpoint.run_in(out)
        if existing:
            raise ExistingRun(out, existing, "--out-dir")
        pool_images = load_training_pool(cfg.data)  # before anything is written: a refused split leaves no folder
        shards = shard_indices(cfg.data, pool_images)
        initial = initial_weights(cfg.init_from, fcfg.model) if cfg.init_from and federation is None else None
        out.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock_run(out)
        try:
            sim = cls._open(cfg, out, federation, initial, [pool_images.images[idx] for idx in shards], pool, log)
        except BaseException:
            os.close(lock_fd)
            raise
        sim.lock_fd = lock_fd
        return sim

    @classmethod
    def _open(
        cls,
        cfg: SimulationConfig,
        out: Path,
        federation: Federation | None,
        initial: dict[str, torch.Tensor] | None,
        shard_images: list[np.ndarray],
        pool: DevicePool | None,
        log: Callable[[str], None],
    ) -> Simulation:
        """The run once its folder is locked: a new federation and round log, or the restored one's clients."""
        fcfg = cfg.federation
        if federation is None:
            federation = Federation(fcfg, global_state=initial)
            (out / ROUNDS_LOG).write_text("")
        else:
            truncate_log(out / ROUNDS_LOG, federation.completed_rounds)
        clients = {}
        for cid, shard in zip(client_ids(cfg.data.num_clients), shard_images, strict=True):
            clients[cid] = SimulatedClient(cid, shard)
            if federation.completed_rounds and private_parts(fcfg.strategy):
                found = checkpoint.load_private(out / CLIENTS, cid, federation.completed_rounds)
                clients[cid].private_tensors = found[0] if found else {}
            if federation.completed_rounds:
                found = checkpoint.load_private(out / RESIDUALS, cid, federation.completed_rounds)
                clients[cid].kept = KeptState(found[0] if found else {}, {}, -1)
        images = {cid: c.images for cid, c in clients.items()}
        training = pool.setup(fcfg.model, fcfg.seed, images) if pool else InProcessTraining(fcfg.model, fcfg.seed, cfg.speed, images)
        return cls(cfg, out, federation, clients, training, log)

    def run_round(self) -> RoundOutcome:
        """Plan a round, train its clients, fold their updates in the plan's order, checkpoint and log it."""
        fed = self.federation
        started = time.perf_counter()
        plan = fed.plan(list(self.clients))
        open_round = fed.open_round(plan, {c: self.clients[c].num_examples for c in plan.clients})
        for trained in self.training.train(self._job(open_round, cid) for cid in plan.clients):
            cid, task = trained.client_id, open_round.task(trained.client_id)
            payload = transfer(trained.delta_payload, self.config.chunk_size)
            open_round.accept(cid, payload, mean_loss=trained.mean_loss, images_seen=trained.images_seen)
            self.clients[cid].private_tensors, self.clients[cid].kept = dict(trained.private_tensors), trained.kept
            if task.private_parts:
                checkpoint.save_private(self.out_dir / CLIENTS, cid, task.round_index + 1, self.clients[cid].private_tensors)
            if trained.kept.residuals:
                checkpoint.save_private(self.out_dir / RESIDUALS, cid, task.round_index + 1, dict(trained.kept.residuals))
        outcome = open_round.close()
        fed.save(self.out_dir)
        record = round_record(outcome, fed.ledger, time.perf_counter() - started)
        with open(self.out_dir / ROUNDS_LOG, "a") as f:
            f.write(json.dumps(record.as_json()) + "\n")
        self.records.append(record)
        self.log(format_round(record))
        return outcome

    def _job(self, open_round: OpenRound, cid: str) -> ClientJob:
        """A client's training this round, its weights payload sent through the stream format (and counted as sent)."""
        task = open_round.task(cid)
        payload = transfer(open_round.payload_for(cid), self.config.chunk_size)
        open_round.mark_sent(cid)
        return ClientJob(cid, task, payload, self.clients[cid].private_tensors, self.clients[cid].kept)

    def run(self) -> list[RoundRecord]:
        while not self.federation.finished:
            self.run_round()
        return self.records

    def close(self) -> None:
        """Release the run folder's lock (another process may then go on with the run)."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _lock_run(out: Path) -> int:
    """This process's lock on a run folder (`lock_folder`); ValueError naming --out-dir when another holds it."""
    try:
        return lock_folder(out)
    except FolderInUse as e:
        raise ValueError(
            f"--out-dir {str(out)!r} is in use by another process (pid {e.holder}): one process per run; wait for it, or give another folder"
        ) from None
