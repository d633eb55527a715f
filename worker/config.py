"""The worker's configuration, built once from command-line flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Annotated

from annotated_types import Interval
from pydantic import ConfigDict

from fedcore import settings
from fedcore.settings import NonNegative, Port, Positive, ProgressMode, Seconds, Seed
from fedcore.splits import SplitKind
from fedcore.training import SpeedConfig


@dataclass(frozen=True)
class WorkerConfig:
    """Every setting of a worker; `from_args` converts each flag to its type or refuses it."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    coordinator: str  # HOST:PORT of the coordinator
    worker_id: str = ""  # stable identity; default: the one saved in state_dir, else a new random one
    # Data: a Fashion-MNIST shard (client_index of num_clients under a split), or a folder of images
    client_index: int = -1
    num_clients: Positive = 1
    split: SplitKind = "iid"
    beta: Annotated[float, Interval(gt=0)] = 0.5  # Dirichlet concentration of the skewed splits
    seed: Seed = 2023  # split seed
    max_images: NonNegative = 0  # 0 = all training images (before splitting)
    data_root: str | None = None  # Fashion-MNIST folder (default: Debian's package)
    data_dir: str = ""  # a folder of images (PNG, JPEG, TIFF, WebP, BMP) instead of Fashion-MNIST
    image_size: Positive = 28  # size the --data-dir images are brought to (must match the model)
    channels: int = 1  # 1 (grayscale) or 3 (RGB) for --data-dir images
    state_dir: str = "runs/worker"  # identity and private parts, kept across restarts
    speed: SpeedConfig = SpeedConfig()
    metrics_port: Port = -1  # Prometheus /metrics; -1 disables, 0 picks a free port
    wait_timeout: Seconds = 30.0  # long-poll duration of one WaitTask call
    backoff_initial: Seconds = 0.5  # first delay after a failure (reconnect, refused task), doubled up to backoff_max
    backoff_max: Seconds = 30.0
    # Bandwidth caps in bytes per second (0 = none), for a worker on a shared or metered link: uploads are
    # paced as they are sent; downloads as they are read, and HTTP/2 flow control slows the coordinator down.
    upload_rate_limit: int = 0
    download_rate_limit: int = 0
    exit_when_done: bool = True  # exit once the coordinator reports the last round done
    inception_weights: str = ""  # pytorch-fid Inception weights for FD; default: the bundled classifier
    ready_file: str = ""  # write {"worker_id", "metrics_port"} here once started
    progress: ProgressMode = "auto"  # "auto" (a live bar on a terminal, log lines otherwise), "bar", "log", "off"
    # Security
    insecure: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    token_file: str = ""
    tls_server_name: str = ""  # override the name checked in the coordinator's certificate

    def __post_init__(self) -> None:
        if self.data_dir == "" and not 0 <= self.client_index < self.num_clients:
            raise ValueError(
                f"--client-index {self.client_index} must be in 0..{self.num_clients - 1} (or pass --data-dir)"
            )
        if self.upload_rate_limit < 0 or self.download_rate_limit < 0:
            raise ValueError(f"rate limits must be >= 0 bytes/s, got {self.upload_rate_limit} / {self.download_rate_limit}")
        if ":" not in self.coordinator:
            raise ValueError(f"--coordinator {self.coordinator!r} must be HOST:PORT")
        if self.channels not in (1, 3):
            raise ValueError(f"--channels {self.channels} must be 1 (grayscale) or 3 (RGB)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The worker's flags. Values stay strings here: `from_args` converts them to the settings' types."""
    p.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--worker-id", default="", help="stable identity (default: saved in --state-dir, else random)")
    p.add_argument("--client-index", default=-1, help="this worker's Fashion-MNIST shard")
    p.add_argument("--num-clients", default=1)
    p.add_argument("--split", default="iid", help="iid | quantity | label")
    p.add_argument("--beta", default=0.5)
    p.add_argument("--seed", default=2023, help="split seed")
    p.add_argument("--max-images", default=0)
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: Debian's package)")
    p.add_argument("--data-dir", default="", help="a folder of images (PNG, JPEG, TIFF, WebP, BMP) to train on instead")
    p.add_argument("--image-size", default=28, help="--data-dir images are resized to this")
    p.add_argument("--channels", default=1, help="1 (grayscale) or 3 (RGB) for --data-dir images")
    p.add_argument("--state-dir", default="runs/worker")
    p.add_argument("--metrics-port", default=-1)
    p.add_argument("--wait-timeout", default=30.0)
    p.add_argument("--upload-rate-limit", default=0, metavar="BYTES_PER_S", help="cap on update uploads (0 = none)")
    p.add_argument("--download-rate-limit", default=0, metavar="BYTES_PER_S", help="cap on weight downloads (0 = none)")
    p.add_argument("--keep-running", action="store_true", help="stay connected after the last round")
    p.add_argument("--inception-weights", default="", help="pytorch-fid Inception weights file for FD (never downloaded)")
    p.add_argument("--ready-file", default="", help="write the metrics port here once started (scripts, tests)")
    p.add_argument("--progress", default="auto", help="auto | bar | log | off")
    p.add_argument("--insecure", action="store_true", help="plain-text gRPC")
    p.add_argument("--tls-ca", default="")
    p.add_argument("--tls-cert", default="")
    p.add_argument("--tls-key", default="")
    p.add_argument("--tls-server-name", default="")
    p.add_argument("--token-file", default="")


def _flag(loc: settings.Location) -> str:
    return "--keep-running" if loc == ("exit_when_done",) else settings.flag(loc)


def from_args(args: argparse.Namespace, speed: SpeedConfig) -> WorkerConfig:
    """The worker's configuration; SettingsError (one line) names every flag whose value does not convert."""
    values = {f.name: getattr(args, f.name) for f in fields(WorkerConfig) if hasattr(args, f.name)}
    values.update(speed=speed, exit_when_done=not args.keep_running)
    return settings.build(WorkerConfig, values, name=_flag)
