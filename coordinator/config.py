"""The coordinator's configuration: built once from a YAML file and command-line flags (flags win)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from fedcore.chunking import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE
from fedcore.federation import FederationConfig
from fedcore.strategies import Strategy


@dataclass(frozen=True)
class CoordinatorConfig:
    strategy: str = "udec"  # full | usplit | udec | ulatdec
    model: str = "paper-fmnist"  # model preset
    rounds: int = 15  # R
    clients_per_round: int = 0  # 0 = every connected worker, else a seeded sample
    min_workers: int = 2  # connected workers needed to start a round
    round_deadline: float = 3600.0  # seconds a round waits for updates before closing with quorum
    quorum: float = 0.5  # fraction of a round's selected workers whose updates must be in to close it
    epochs: int = 5  # local epochs per round (sent with each task)
    batch_size: int = 128
    lr: float = 1e-4
    loss: str = "huber"
    seed: int = 0  # initial model, plans, client samples, training seeds
    checkpoint_dir: str = "runs/coordinator"
    listen: str = "0.0.0.0:50051"  # gRPC address; port 0 picks a free one
    health_port: int = -1  # plain-text gRPC port serving only the health service (Kubernetes probes); -1 = off
    metrics_port: int = 9100  # Prometheus /metrics; 0 picks a free one, -1 disables
    chunk_size: int = DEFAULT_CHUNK_SIZE  # bytes per stream chunk, both directions
    max_concurrent_uploads: int = 2  # updates received and decoded at once; the rest wait (back-pressure)
    heartbeat_interval: float = 5.0  # seconds between worker heartbeats
    heartbeat_timeout: float = 30.0  # a worker unheard of for this long is no longer connected
    progress: str = "auto"  # "auto" (a live line on a terminal, log lines otherwise), "bar", "log", "off"
    ready_file: str = ""  # once serving, write {"address", "metrics_port"} here (for scripts and tests)
    resume: bool = False  # continue from the checkpoint in checkpoint_dir
    exit_when_done: bool = False  # exit after the last round instead of serving status
    eval_every: int = 0  # evaluate every N rounds (0 = only after the last round, when evaluation is on)
    eval_samples: int = 0  # samples per evaluated model (0 = no evaluation)
    eval_steps: int = 100  # DDIM steps for evaluations during training
    eval_final_sampler: str = "ddpm"  # after the last round: "ddpm" (all 1000 steps, the paper) or "ddim"
    share_samples: bool = False  # workers send a grid of their samples back (off: no image leaves a worker)
    eval_device: str = "auto"  # where the coordinator scores the global model (full, usplit)
    eval_data_root: str = ""  # Fashion-MNIST folder for the real test images (default: Debian's package)
    inception_weights: str = ""  # pytorch-fid Inception weights file; default features: the bundled classifier
    # Security (mTLS / tokens): paths, empty = not used
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""  # with tls_ca set, workers must present a certificate signed by it (mutual TLS)
    tokens_file: str = ""  # YAML/JSON map worker_id -> token, for identity without mTLS
    insecure: bool = False  # plain-text gRPC (needs this explicit flag)

    def __post_init__(self) -> None:
        Strategy(self.strategy)
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.min_workers < 1:
            raise ValueError(f"min_workers must be >= 1, got {self.min_workers}")
        if not 0 < self.quorum <= 1:
            raise ValueError(f"quorum must be in (0, 1], got {self.quorum}")
        if not 0 < self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}, got {self.chunk_size}")
        if self.loss not in ("huber", "mse"):
            raise ValueError(f"loss must be 'huber' or 'mse', got {self.loss!r}")
        if self.eval_final_sampler not in ("ddpm", "ddim"):
            raise ValueError(f"eval_final_sampler must be 'ddpm' or 'ddim', got {self.eval_final_sampler!r}")
        if self.round_deadline <= 0:
            raise ValueError(f"round_deadline must be positive, got {self.round_deadline}")

    @property
    def federation(self) -> FederationConfig:
        names = ("strategy", "model", "rounds", "clients_per_round", "seed", "epochs", "batch_size", "lr", "loss")
        return FederationConfig.from_settings(**{n: getattr(self, n) for n in names})

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any]) -> CoordinatorConfig:
        """Defaults, then the YAML file, then the flags that were given (None = not given)."""
        values: dict[str, Any] = {}
        if path:
            raw = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: expected a mapping of settings")
            values.update({k.replace("-", "_"): v for k, v in raw.items()})
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown coordinator setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for every setting; defaults are None so that the YAML file's values stand unless overridden."""
    p.add_argument("--config", help="YAML file of settings (keys as the flags, with underscores)")
    for f in fields(CoordinatorConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_const", const=True, default=None)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            p.add_argument(flag, type=kind, default=None, help=f"(default {f.default})")


def from_args(args: argparse.Namespace) -> CoordinatorConfig:
    overrides = {f.name: getattr(args, f.name) for f in fields(CoordinatorConfig)}
    return CoordinatorConfig.load(args.config, overrides)
