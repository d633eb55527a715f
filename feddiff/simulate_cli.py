"""`feddiff simulate`: a whole federated run in one process (or its clients over several devices), its flags turned into a `SimulateConfig` at the
edge: every value converted to its setting's type, or refused in one line before anything runs."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from fedcore import settings
from fedcore.data.shards import SplitConfig
from fedcore.experiments.devices import DeviceList
from fedcore.experiments.simulation import SimulationConfig
from fedcore.federation.checkpoint import STATE_FILE
from fedcore.federation.engine import FederationConfig
from fedcore.federation.strategies import Strategy, StrategyName
from fedcore.model.training import SpeedConfig, TrainConfig
from fedcore.model.unet import ModelName
from fedcore.payload.codecs import CompressionBlock, CompressionName, compression_codec, settle_compression
from fedcore.settings import ExistingPath, Folder, NonNegative, Rounds, Seed
from feddiff.args import DEVICES_MEANING, OUT_DIR_OLD_SPELLINGS, RUN_MEANING, SPEED_MEANING, Command, add_speed_flags, check_folder_path
from service import flags
from service.split_flags import SPLIT_MEANING, SPLIT_OLD_SPELLINGS


@dataclass(frozen=True)
class SimulateConfig:
    """Every setting of `feddiff simulate`; its types carry the ranges (the training's are TrainConfig's, the
    ones a worker runs)."""

    __pydantic_config__ = settings.CONFIG

    strategy: StrategyName = "udec"
    model: ModelName = "paper-fmnist"  # model preset
    rounds: Rounds = 15  # R
    clients_per_round: NonNegative = 0  # 0 = every client, else a seeded sample
    train: TrainConfig = TrainConfig()  # epochs, batch size, learning rate, loss
    seed: Seed = 0  # initial model, plans, client samples, training seeds
    compression: CompressionName = "none"  # how clients code their deltas, with error feedback (fedcore.payload.codecs)
    compression_block: CompressionBlock = 0  # int8 / int4 elements per scale; 0: the codec name's (64 unless it says)
    data: SplitConfig = SplitConfig()  # K and how the training set is split among the clients
    out_dir: Folder = "runs/simulate"  # rounds.jsonl and checkpoints
    resume: bool = False  # continue the run in `out_dir` from its last checkpoint
    init_from: ExistingPath = ""  # a diffusers UNet or pipeline folder, or a feddiff .safetensors
    devices: DeviceList | None = None  # train each round's clients in parallel, one process per device
    speed: SpeedConfig = SpeedConfig()

    def __post_init__(self) -> None:
        if self.devices and self.speed.device != "auto":
            raise ValueError(f"--device {self.speed.device} and --devices {','.join(self.devices)}: give one (--devices trains on each device it names)")
        settle_compression(self)  # ValueError for a block the codec has no use for, or one its name gives otherwise
        if self.clients_per_round > self.data.num_clients:
            raise ValueError(
                f"{flags.shown(self, 'clients_per_round')} is more than {flags.shown(self, 'data.num_clients')}: "
                "a round samples its clients from those K; give at most K (0: every client)"
            )

    @property
    def simulation(self) -> SimulationConfig:
        """The run these settings describe."""
        codec = compression_codec(self.compression, self.compression_block)
        federation = FederationConfig(Strategy(self.strategy), self.model, self.rounds, self.clients_per_round, self.seed, self.train, codec)
        return SimulationConfig(federation=federation, data=self.data, speed=self.speed, init_from=self.init_from)


MEANING = {
    **RUN_MEANING,
    **SPEED_MEANING,
    **SPLIT_MEANING,
    "num_clients": "K; --num-clients 1 --strategy full is the centralised baseline",
    "out_dir": "output folder: rounds.jsonl and checkpoints",
    "resume": "continue the run in --out-dir from its last checkpoint (refused when there is none)",
    "init_from": "start the global model from a diffusers UNet or pipeline folder, or a feddiff .safetensors",
    "devices": DEVICES_MEANING,
}


def add_simulate_flags(p: argparse.ArgumentParser) -> None:
    """simulate's flags: one per setting of SimulateConfig."""
    flags.add_flags(p, SimulateConfig, MEANING, skip=("speed",), old={**SPLIT_OLD_SPELLINGS, **OUT_DIR_OLD_SPELLINGS}, metavars={"out_dir": "DIR"})
    add_speed_flags(p)


def simulate(args: argparse.Namespace) -> int:
    """The run of the flags, from its start or (--resume) its last checkpoint."""
    from fedcore.errors import TrainingProcessFailed
    from fedcore.experiments.devices import device_pool
    from fedcore.experiments.simulation import Simulation

    cfg = flags.build(SimulateConfig, args)
    check_folder_path(Path(cfg.out_dir), "--out-dir")
    if cfg.resume:
        _check_resumable(Path(cfg.out_dir))
    try:
        with device_pool(cfg.devices or (), cfg.speed) as pool:
            if pool is not None:
                print(f"training on {pool}")
            with Simulation.create(cfg.simulation, cfg.out_dir, resume=cfg.resume, pool=pool) as sim:
                sim.run()
    except TrainingProcessFailed as e:
        print(f"feddiff simulate: error: {e}", file=sys.stderr)
        return 1
    rounds = sim.federation.completed_rounds
    print(f"done: {rounds} round{'' if rounds == 1 else 's'}, checkpoints in {cfg.out_dir}")
    return 0


def _check_resumable(out: Path) -> None:
    """ValueError, naming --out-dir, when --resume finds no checkpoint there: a new run would start from round 1
    as if --resume had not been given."""
    if (out / STATE_FILE).is_file():
        return
    where = "does not exist" if not out.exists() else f"holds no checkpoint (no {STATE_FILE})"
    raise ValueError(f"--resume: --out-dir {out} {where}: there is nothing to resume; drop --resume to start a new run there")


COMMANDS = {"simulate": Command(add_simulate_flags, simulate)}
