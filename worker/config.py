"""The worker's configuration, built once from command-line flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Annotated

import torch
from annotated_types import Interval
from pydantic import AfterValidator

from fedcore import settings
from fedcore.data.shards import SplitConfig
from fedcore.model.training import SpeedConfig, resolve_device, training_processes
from fedcore.settings import (
    ExistingFile,
    ExistingFolder,
    Folder,
    NonNegative,
    Port,
    Positive,
    ProgressMode,
    Seconds,
)
from fedcore.wire.bounds import WORKER_ID
from service import flags, tls
from service.process_settings import ConnectAddress, ReadyFile, ServerName, TokenFile
from service.split_flags import RETIRED_SEED, SPLIT_MEANING, SPLIT_OLD_SPELLINGS


def _grayscale_or_rgb(channels: int) -> int:
    if channels not in (1, 3):
        raise ValueError()  # the type's words say it all
    return channels


def _worker_id(text: str) -> str:
    problem = WORKER_ID.problem(text) if text else None  # empty: the one saved in --state-dir, or a new one
    if problem:
        raise ValueError(problem)
    return text


def _nproc_per_node(text: str) -> str:
    if text == "gpu":
        if not torch.cuda.is_available():
            raise ValueError("this host shows no CUDA GPU to give a rank")
        return text
    if not text.isdigit() or int(text) < 1:
        raise ValueError()  # the type's words say it all
    return str(int(text))


WorkerId = Annotated[str, AfterValidator(_worker_id), settings.Described(f"a worker id of {WORKER_ID.describe()}")]
Channels = Annotated[int, AfterValidator(_grayscale_or_rgb), settings.Described("1 (grayscale) or 3 (RGB)")]
NprocPerNode = Annotated[str, AfterValidator(_nproc_per_node), settings.Described("a number of ranks (1 or more), or gpu: one per GPU this host shows")]
# The long poll's length, sent in milliseconds: at most a week's, within WaitTaskRequest.timeout_ms
WaitTimeout = Seconds


@dataclass(frozen=True)
class WorkerConfig:
    """Every setting of a worker; `from_args` converts each flag to its type or refuses it. What a setting with
    a flag does is said once, in the words of its help (`_MEANING`); a comment here adds only what one line of
    help cannot, and says what the settings without a flag do."""

    __pydantic_config__ = settings.CONFIG

    coordinator: ConnectAddress
    worker_id: WorkerId = ""
    # Data: a Fashion-MNIST shard (client_index of data.num_clients under the split), or a folder of images
    client_index: Annotated[int, Interval(ge=-1)] = -1  # -1: none (data_dir holds the images)
    data: SplitConfig = SplitConfig(num_clients=1)  # the split every worker of the run gives alike; one shard unless told
    data_dir: ExistingFolder = ""
    image_size: Positive = 28  # must match the model
    channels: Channels = 1
    state_dir: Folder = "runs/worker"
    speed: SpeedConfig = SpeedConfig()  # its flags and their words: feddiff.args
    # Under torchrun itself leave it at 1: the ranks come from RANK, WORLD_SIZE, LOCAL_RANK; else this process
    # launches them as torchrun does.
    nproc_per_node: NprocPerNode = "1"
    collective_timeout: Seconds = 300.0
    metrics_port: Port = -1
    wait_timeout: WaitTimeout = 30.0
    backoff_initial: Seconds = 0.5  # no flag: first delay after a failure (reconnect, refused task), doubled up to backoff_max
    backoff_max: Seconds = 30.0  # no flag: the longest delay between two tries
    # For a worker on a shared or metered link: uploads are paced as they are sent; downloads as they are read,
    # and HTTP/2 flow control slows the coordinator down.
    upload_rate_limit: NonNegative = 0
    download_rate_limit: NonNegative = 0
    exit_when_done: bool = True  # exit once the coordinator reports the last round done (its flag: --keep-running, stay)
    inception_weights: ExistingFile = ""
    ready_file: ReadyFile = ""  # {"worker_id", "metrics_port"}
    progress: ProgressMode = "auto"
    # Security
    insecure: bool = False
    tls_ca: ExistingFile = ""
    tls_cert: ExistingFile = ""
    tls_key: ExistingFile = ""
    token_file: TokenFile = ""
    tls_server_name: ServerName = ""

    def __post_init__(self) -> None:
        if self.data_dir and self.client_index >= 0:
            raise ValueError(
                f"--client-index {self.client_index} and --data-dir {self.data_dir}: give one source of images, a Fashion-MNIST shard or a folder of your own"
            )
        if not self.data_dir and self.client_index < 0:
            raise ValueError(
                "no images to train on: pass --data-dir FOLDER (a folder of your images) or --client-index N (shard N of "
                f"Fashion-MNIST, N in 0..{self.data.num_clients - 1} for {flags.shown(self, 'data.num_clients')})"
            )
        if not self.data_dir and self.client_index >= self.data.num_clients:
            raise ValueError(
                f"--client-index {self.client_index} is not a shard of {flags.shown(self, 'data.num_clients')}: give 0..{self.data.num_clients - 1}, "
                "or --num-clients above it"
            )
        tls.check_tls_settings(tls.WORKER, cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca, insecure=self.insecure, server_name=self.tls_server_name)
        if self.ranks_per_node > 1:
            _check_rank_devices(self.ranks_per_node, self.speed.device)

    @property
    def ranks_per_node(self) -> int:
        """The ranks --nproc-per-node asks for ("gpu": one per CUDA GPU this host shows)."""
        return torch.cuda.device_count() if self.nproc_per_node == "gpu" else int(self.nproc_per_node)


def _check_rank_devices(ranks: int, device: str) -> None:
    """Several ranks train on the CPU or on one CUDA GPU each (rank r on cuda:r), checked as every set of
    training processes is (`training_processes`: devices this host has, at most one process per CPU)."""
    kind = resolve_device(device)
    if kind.type == "cuda" and kind.index is not None:
        raise ValueError(
            f"--device {device} names one GPU, but each of the --nproc-per-node {ranks} ranks takes its own (rank r on cuda:r): pass --device cuda"
        )
    if kind.type not in ("cuda", "cpu"):
        raise ValueError(f"--nproc-per-node {ranks} trains on CUDA GPUs or CPUs, not on --device {device}")
    try:
        training_processes([f"cuda:{rank}" for rank in range(ranks)] if kind.type == "cuda" else ["cpu"] * ranks)
    except ValueError as e:
        on = "CUDA GPUs, rank r on cuda:r" if kind.type == "cuda" else "the CPU"
        raise ValueError(f"--nproc-per-node {ranks} on {on} (--device {device}): {e}") from None


# What each setting with a flag does: the one place that says it (its flag's help); its type, range and default
# come from WorkerConfig's fields.
_MEANING = {
    "coordinator": "HOST:PORT of the coordinator",
    "worker_id": "stable identity (default: the one saved in --state-dir, else a new random one)",
    "client_index": "this worker's Fashion-MNIST shard (-1 = none: it trains on --data-dir)",
    **SPLIT_MEANING,
    "num_clients": "K, the Fashion-MNIST shards in the split (give every worker of a run the same split)",
    "data_dir": "a folder of images (PNG, JPEG, TIFF, WebP, BMP) to train on instead",
    "image_size": "side in pixels the --data-dir images are resized to",
    "channels": "channels of the --data-dir images",
    "state_dir": "identity and private parts, kept across restarts",
    "metrics_port": "Prometheus /metrics (-1 = off, 0 = a free port)",
    "wait_timeout": "seconds one WaitTask long poll lasts",
    "upload_rate_limit": "cap on update uploads in bytes per second (0 = none)",
    "download_rate_limit": "cap on weight downloads in bytes per second (0 = none)",
    "inception_weights": "pytorch-fid Inception weights file for FD (never downloaded)",
    "ready_file": "write the worker id and metrics port here once started (scripts, tests)",
    "nproc_per_node": "ranks that train this worker's shard together (DDP; NCCL on GPUs, gloo on CPUs)",
    "collective_timeout": "seconds a rank waits in a collective before it gives up (a dead rank ends the others)",
    "progress": "a live bar on a terminal (auto), bar, log lines, or nothing",
    "insecure": "plain-text gRPC",
    "tls_ca": "CA certificate the coordinator's certificate is checked against",
    "tls_cert": "this worker's certificate (mutual TLS)",
    "tls_key": "its private key",
    "tls_server_name": "name checked in the coordinator's certificate (default: the host of --coordinator)",
    "token_file": "file holding this worker's token (sent as a bearer token)",
}
_NOT_FLAGS = ("speed", "backoff_initial", "backoff_max", "exit_when_done")  # speed: feddiff.args's speed flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The worker's flags, each with the type, range or choices its field declares (`service.flags`). Values
    stay strings here (None: not given): `from_args` converts them to the settings' types."""
    flags.add_flags(p, WorkerConfig, _MEANING, skip=_NOT_FLAGS, old=SPLIT_OLD_SPELLINGS)
    flags.add_retired(p, "--seed", RETIRED_SEED)
    flags.add_switch(p, "--keep-running", "exit_when_done", False, "stay connected after the last round")


def from_args(args: argparse.Namespace) -> WorkerConfig:
    """The worker's configuration, with its speed settings (the speed flags, `feddiff.args`); SettingsError
    (one line) names every flag whose value does not convert."""
    return flags.build(WorkerConfig, args)
