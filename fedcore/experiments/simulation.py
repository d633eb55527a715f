"""Whole federated experiments in one process: the same planning, training, bytes and aggregation as the
gRPC system, with every payload serialized, chunked, reassembled and checked on its way."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedcore.data.datasets import to_model_range
from fedcore.data.shards import DataConfig, load_training_pool
from fedcore.data.splits import split_indices
from fedcore.errors import ExistingRun
from fedcore.federation import checkpoint
from fedcore.federation.client import ClientRuntime
from fedcore.federation.roundlog import ROUNDS_LOG, RoundRecord, format_round, round_record, truncate_log
from fedcore.federation.server import Federation, FederationConfig, RoundOutcome
from fedcore.federation.strategies import private_parts
from fedcore.model.diffusion import Schedule
from fedcore.model.training import LocalTrainer, SpeedConfig
from fedcore.model.unet import build_model
from fedcore.payload.pretrained import initial_weights
from fedcore.wire.stream import DEFAULT_CHUNK_SIZE, Reassembler, StreamHeader, iter_chunks


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
    data: DataConfig = DataConfig()
    speed: SpeedConfig = SpeedConfig()
    chunk_size: int = DEFAULT_CHUNK_SIZE
    init_from: str = ""  # the starting global model: a diffusers UNet or pipeline folder, or a feddiff .safetensors


@dataclass
class Simulation:
    """A resumable run: the federation, K client runtimes over one shared trainer, and the output folder."""

    config: SimulationConfig
    out_dir: Path
    federation: Federation
    clients: dict[str, ClientRuntime]
    log: Callable[[str], None] = print
    records: list[RoundRecord] = field(default_factory=list)  # the rounds this process ran, as logged

    @classmethod
    def create(cls, cfg: SimulationConfig, out_dir: str | Path, *, resume: bool = False, log: Callable[[str], None] = print) -> Simulation:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fcfg = cfg.federation
        federation = Federation.restore(fcfg, out) if resume else None
        existing = None if resume else checkpoint.run_in(out)
        if existing:
            raise ExistingRun(out, existing, "--out")
        if federation is None:
            initial = initial_weights(cfg.init_from, fcfg.model) if cfg.init_from else None
            federation = Federation(fcfg, global_state=initial)
            (out / ROUNDS_LOG).write_text("")
        else:
            truncate_log(out / ROUNDS_LOG, federation.completed_rounds)
        trainer = LocalTrainer(build_model(fcfg.model, seed=fcfg.seed), Schedule(), cfg.speed)
        pool = load_training_pool(cfg.data)
        shards = split_indices(pool.class_labels(), cfg.data.num_clients, cfg.data.split, beta=cfg.data.beta, seed=cfg.data.split_seed)
        clients = {}
        for cid, idx in zip(client_ids(cfg.data.num_clients), shards, strict=True):
            private = None
            if federation.completed_rounds and private_parts(fcfg.strategy):
                found = checkpoint.load_private(out / "clients", cid, federation.completed_rounds)
                private = found[0] if found else None
            data = trainer.prepare_data(to_model_range(pool.images[idx]))
            clients[cid] = ClientRuntime(cid, fcfg.model, trainer, data, private)
        return cls(cfg, out, federation, clients, log)

    def run_round(self) -> RoundOutcome:
        fed = self.federation
        started = time.perf_counter()
        plan = fed.plan(list(self.clients))
        open_round = fed.open_round(plan, {c: self.clients[c].num_examples for c in plan.clients})
        for cid in plan.clients:
            client = self.clients[cid]
            task = open_round.task(cid)
            client.load(transfer(open_round.payload(task.receives), self.config.chunk_size), task)
            open_round.mark_sent(cid)
            result = client.train(task)
            update = transfer(client.update(task), self.config.chunk_size)
            open_round.accept(cid, update, mean_loss=result.mean_loss, images_seen=result.images_seen)
            if task.private:
                checkpoint.save_private(self.out_dir / "clients", cid, task.round_index + 1, client.private)
        outcome = open_round.close()
        fed.save(self.out_dir)
        record = round_record(outcome, fed.ledger, time.perf_counter() - started)
        with open(self.out_dir / ROUNDS_LOG, "a") as f:
            f.write(json.dumps(record.as_json()) + "\n")
        self.records.append(record)
        self.log(format_round(record))
        return outcome

    def run(self) -> list[RoundRecord]:
        while not self.federation.finished:
            self.run_round()
        return self.records
