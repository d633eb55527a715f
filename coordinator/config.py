"""The coordinator's configuration: built once from command-line flags and a YAML file of settings (flags win)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Annotated

import yaml
from annotated_types import Interval
from pydantic import AfterValidator, BeforeValidator

from fedcore import settings
from fedcore.federation.checkpoint import ResumableSettings
from fedcore.federation.engine import FederationConfig
from fedcore.federation.robust import RobustConfig
from fedcore.federation.strategies import StrategyName
from fedcore.model.diffusion import LossKind, SamplerKind
from fedcore.model.training import Device
from fedcore.model.unet import ModelName
from fedcore.payload.codecs import CompressionBlock, CompressionName, settle_compression
from fedcore.settings import (
    BatchSize,
    Epochs,
    ExistingFile,
    ExistingFolder,
    ExistingPath,
    FiniteNonNegative,
    Folder,
    Fraction,
    LearningRate,
    NonNegative,
    Port,
    Positive,
    ProgressMode,
    Rounds,
    SamplingSteps,
    Seconds,
    SecondsOrZero,
    Seed,
)
from fedcore.wire.bounds import MAX_NUM_EXAMPLES, WORKER_ID, largest
from fedcore.wire.stream import DEFAULT_CHUNK_SIZE
from service import flags, tls
from service.process_settings import ListenAddress, ReadyFile

# Settings the workers are sent: each within the bound of its field of the wire contract.
ChunkSize = Annotated[int, Interval(ge=1, le=largest("JoinResponse.chunk_size"))]


def _fd_samples_or_off(n: int) -> int:
    if n == 1:
        raise ValueError("an FD needs at least 2 samples (0 = no evaluation)")
    return n


EvalSamplesOrOff = Annotated[int, Interval(ge=0, le=largest("EvalSpec.num_samples")), AfterValidator(_fd_samples_or_off)]  # 0 = no evaluation
CallCount = Annotated[int, Interval(ge=1, le=(1 << 31) - 1)]  # gRPC takes it as a C int
HeartbeatInterval = Seconds  # sent in ms: at most a week's, within JoinResponse.heartbeat_interval_ms


def _worker_sizes(value: object) -> dict[str, int]:
    """worker id -> images, from a YAML mapping, or a flag's `ID=N,ID=N` or `{ID: N, ...}`; ValueError for
    anything else."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = flags.load_yaml(value)
        except yaml.YAMLError as e:
            raise ValueError(getattr(e, "problem", None) or "not a YAML mapping") from None
    elif isinstance(value, str):
        pairs = [item.partition("=") for item in value.split(",") if item.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise ValueError("an entry is not ID=N")
        keys = [k.strip() for k, _, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"worker {twice[0]!r} is given twice")
        value = {k.strip(): v.strip() for k, _, v in pairs}
    if not isinstance(value, dict):
        raise ValueError("not a mapping")
    num_examples = {}
    for key, count in value.items():
        worker_id = str(key) if isinstance(key, int) and not isinstance(key, bool) else key
        if not (isinstance(worker_id, str) and WORKER_ID.problem(worker_id) is None):
            raise ValueError(f"{worker_id!r} is no worker id")
        images = int(count) if isinstance(count, str) and count.isdigit() else count
        if not (isinstance(images, int) and not isinstance(images, bool) and 1 <= images <= MAX_NUM_EXAMPLES):
            raise ValueError(f"worker {worker_id!r}: {images!r} images")
        num_examples[worker_id] = images
    return num_examples


WorkerSizes = Annotated[
    dict[str, int],
    BeforeValidator(_worker_sizes),
    settings.Described(f"a mapping of worker id to images in 1..{MAX_NUM_EXAMPLES} (a flag: ID=N,ID=N)"),
]


@dataclass(frozen=True)
class CoordinatorConfig:
    """Every setting of a coordinator. Its types carry the ranges and allowed values: `from_args` converts each
    value to its type or refuses it (training settings with the ranges the workers run, `fedcore.settings`).
    What each setting does is said once, in the words of its flag's help (`_MEANING`); a comment here adds only
    what one line of help cannot (a reason, a unit on the wire, a format)."""

    __pydantic_config__ = settings.CONFIG

    strategy: StrategyName = "udec"
    model: ModelName = "paper-fmnist"
    rounds: Rounds = 15
    clients_per_round: NonNegative = 0
    min_workers: Positive = 2
    round_deadline: Seconds = 3600.0
    quorum: Fraction = 0.5
    epochs: Epochs = 5
    batch_size: BatchSize = 128
    lr: LearningRate = 1e-4
    loss: LossKind = "huber"
    compression: CompressionName = "none"  # the codecs: fedcore.payload.codecs
    compression_block: CompressionBlock = 0
    seed: Seed = 0
    init_from: ExistingPath = ""
    checkpoint_dir: Folder = "runs/coordinator"
    listen: ListenAddress = "0.0.0.0:50051"
    health_port: Port = -1
    metrics_port: Port = 9100
    chunk_size: ChunkSize = DEFAULT_CHUNK_SIZE
    max_concurrent_uploads: Positive = 2
    upload_idle_timeout: Seconds = 30.0  # the cut upload's outcome is "aborted"; 30 s is 1 MiB at 35 kB/s
    download_idle_timeout: Seconds = 30.0  # the cut download's unsent chunks are freed
    # Each call holds at most one request message (the chunk size + 64 KiB) in memory, and a worker holds up to 4
    # (a long poll, a heartbeat, a download or an upload, a report): this bounds what the port's streams hold.
    max_concurrent_rpcs: CallCount = 1024
    # SETTINGS_MAX_CONCURRENT_STREAMS (RFC 9113 advises no fewer than 100). A worker holds up to 4 calls on a
    # connection of its own; a caller's burst of calls beyond this waits in its client, not in the server's queue
    # of calls not yet served, where a flood of thousands got other workers' calls cancelled. HTTP/2 refuses a
    # stream beyond it (UNAVAILABLE) when the calls of workers behind one proxy outrun the ends of earlier ones.
    max_streams_per_connection: CallCount = 100
    heartbeat_interval: HeartbeatInterval = 5.0  # sent in ms
    heartbeat_timeout: Seconds = 30.0
    progress: ProgressMode = "auto"
    ready_file: ReadyFile = ""  # {"address", "metrics_port"}
    resume: bool = False
    resume_or_start: bool = False  # for a Kubernetes Deployment, compose's restart policy
    exit_when_done: bool = False
    # Attempts that close nothing: no update accepted, every missing update refused by its worker, or an average
    # that is not finite; the run stops naming the round and the likely cause
    max_failed_attempts: Positive = 3
    final_save_timeout: Seconds = 300.0
    # Hostile or broken workers (docs/reliability.md, threat model)
    max_delta_value: FiniteNonNegative = 0.0
    max_weight_share: Fraction = 0.5
    worker_sizes: WorkerSizes = field(default_factory=dict)
    clip_norm: FiniteNonNegative = 0.0
    clip_multiplier: FiniteNonNegative = 0.0
    departed_retention: SecondsOrZero = 3600.0
    eval_every: NonNegative = 0
    eval_samples: EvalSamplesOrOff = 0
    eval_steps: SamplingSteps = 100
    eval_final_sampler: SamplerKind = "ddpm"
    share_samples: bool = False
    eval_device: Device = "auto"
    eval_data_root: ExistingFolder = ""
    inception_weights: ExistingFile = ""
    # Security (mutual TLS, tokens): paths, empty = not used
    tls_cert: ExistingFile = ""
    tls_key: ExistingFile = ""
    tls_ca: ExistingFile = ""
    tokens_file: ExistingFile = ""
    status_token_file: ExistingFile = ""  # with tokens_file and without mutual TLS, GetStatus needs it
    insecure: bool = False

    def __post_init__(self) -> None:
        settle_compression(self)  # ValueError for a block the codec has no use for, or one its name gives otherwise
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError(
                f"{flags.shown(self, 'heartbeat_timeout', 's')} must be longer than {flags.shown(self, 'heartbeat_interval', 's')}: "
                "every worker would count as gone between two of its heartbeats"
            )
        tls.check_tls_settings(tls.COORDINATOR, cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca, insecure=self.insecure)
        if self.resume and self.resume_or_start:
            raise ValueError("--resume and --resume-or-start: give one (--resume refuses a folder with no run to resume, --resume-or-start starts one there)")
        if self.worker_sizes and self.clients_per_round > len(self.worker_sizes):
            raise ValueError(
                f"{flags.shown(self, 'clients_per_round')} is more than the {len(self.worker_sizes)} workers in --worker-sizes: no round could sample that many"
            )
        if self.worker_sizes and len(self.worker_sizes) < self.min_workers:
            raise ValueError(f"{flags.shown(self, 'min_workers')} is more than the {len(self.worker_sizes)} workers in --worker-sizes: no round could start")

    @property
    def federation(self) -> FederationConfig:
        names = ("strategy", "model", "rounds", "clients_per_round", "seed", "epochs", "batch_size", "lr", "loss", "compression", "compression_block")
        return FederationConfig.from_settings(**{n: getattr(self, n) for n in names})

    def resumable(self) -> ResumableSettings:
        """The settings a resumed run may change (all but those that define it, `FederationConfig.DEFINING`, and
        the start-only `resume`, `resume_or_start` and `init_from`), by name: checkpoints carry them so that a
        resume can say which changed."""
        fixed = {*FederationConfig.DEFINING, "resume", "resume_or_start", "init_from"}
        return ResumableSettings({f.name: getattr(self, f.name) for f in fields(self) if f.name not in fixed})

    @property
    def resuming(self) -> bool:
        """Whether this start goes on with the run in checkpoint_dir when there is one (--resume, --resume-or-start)."""
        return self.resume or self.resume_or_start

    @property
    def robust(self) -> RobustConfig:
        return RobustConfig(
            max_delta_value=self.max_delta_value,
            max_weight_share=self.max_weight_share,
            clip_norm=self.clip_norm,
            clip_multiplier=self.clip_multiplier,
            registered=dict(self.worker_sizes),
        )


# What each setting does: the one place that says it (its flag's help); its type, range and default come from
# CoordinatorConfig's fields, whose comments add only what one line cannot.
_MEANING = {
    "strategy": "which UNet parts the workers exchange",
    "model": "model preset",
    "rounds": "R, federated rounds",
    "clients_per_round": "workers per round (0 = every connected worker, else a seeded sample of this many)",
    "min_workers": "connected workers needed to start a round",
    "round_deadline": "seconds a round waits for updates before it closes with a quorum",
    "quorum": "fraction of a round's selected workers whose updates must be in to close it",
    "epochs": "local epochs per round (sent with each task)",
    "batch_size": "images per training step (sent with each task)",
    "lr": "Adam's step size (sent with each task)",
    "loss": "training loss (sent with each task)",
    "compression": "how workers code their deltas, with error feedback on the worker (none, bf16, int8[:B], int4[:B], topk:F[+bf16|+int8|+int4])",
    "compression_block": "int8 / int4 elements per scale (0 = the codec name's: 64 unless it says)",
    "seed": "seed of the initial model, the plans, the client samples and the training",
    "init_from": "start the global model from a diffusers UNet or pipeline folder, or a feddiff .safetensors (not used on a resume)",
    "checkpoint_dir": "folder of the run: its checkpoints, round log and final model",
    "listen": "gRPC address the workers connect to",
    "health_port": "plain-text gRPC port serving only the health service, for Kubernetes probes (-1 = off)",
    "metrics_port": "Prometheus /metrics port (-1 = off, 0 = a free one)",
    "chunk_size": "bytes per stream chunk, both directions",
    "max_concurrent_uploads": "updates received and decoded at once; the others wait (back-pressure)",
    "upload_idle_timeout": "seconds an upload may receive nothing before it is cut off (keep it above one chunk's time on the slowest link)",
    "download_idle_timeout": "seconds a weights download may go unread before it is cut off",
    "max_concurrent_rpcs": "calls in progress at once on the worker-facing port; more are refused (RESOURCE_EXHAUSTED)",
    "max_streams_per_connection": "HTTP/2 streams one connection may hold open at once (raise it for workers behind one proxy)",
    "heartbeat_interval": "seconds between a worker's heartbeats",
    "heartbeat_timeout": "seconds a worker may go unheard before it counts as disconnected",
    "progress": "a live line on a terminal (auto), bar, log lines, or nothing",
    "ready_file": "once serving, write the address and metrics port here (scripts, tests)",
    "resume": "continue the run in --checkpoint-dir (refused when it holds none)",
    "resume_or_start": "continue the run in --checkpoint-dir when it holds one, else start one there (for a process manager)",
    "exit_when_done": "exit after the last round (non-zero when the run failed) instead of serving status",
    "max_failed_attempts": "attempts in a row of one round that close nothing before the run stops",
    "final_save_timeout": "seconds the final model (and a checkpoint still unsaved) is retried at the end before the run fails",
    "max_delta_value": "largest |value| of an update (0 = what its task's training can reach: Adam's bound)",
    "max_weight_share": "largest share of a round's planned FedAvg weight one worker gets (1 = as claimed)",
    "worker_sizes": "most images each worker is weighed by; once given, unlisted workers are refused",
    "clip_norm": "largest L2 norm of one part of an update; a larger part is scaled down to it (0 = off)",
    "clip_multiplier": "adaptive clipping: bound each part's L2 norm at this times the last round's median norm of the part (0 = off)",
    "departed_retention": "seconds a departed worker stays listed before it is forgotten (0: forgotten as soon as it departs)",
    "eval_every": "evaluate after round 1, every N rounds and after the last (0 = after the last round only)",
    "eval_samples": "samples per evaluated model (0 = no evaluation)",
    "eval_steps": "DDIM steps of each evaluation (of the final one too with --eval-final-sampler ddim)",
    "eval_final_sampler": "sampler of the evaluation after the last round: ddpm (all 1000 steps, the paper's) or ddim",
    "share_samples": "workers send a grid of their samples back (without it no image leaves a worker)",
    "eval_device": "where the coordinator scores the global model (strategies full and usplit)",
    "eval_data_root": "Fashion-MNIST IDX folder of the real test images (default: Debian's package)",
    "inception_weights": "pytorch-fid Inception weights file for FD (never downloaded; default: the bundled classifier's features)",
    "tls_cert": "the coordinator's TLS certificate",
    "tls_key": "its private key",
    "tls_ca": "CA the workers' certificates must be signed by (mutual TLS)",
    "tokens_file": "YAML/JSON map of worker id to token, for identity without mutual TLS",
    "status_token_file": "file holding the operator's token for GetStatus (feddiff status --token-file); once given, GetStatus needs it",
    "insecure": "serve plain-text gRPC (without --tls-cert a coordinator starts only with this flag)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--config and a flag for every setting (`service.flags`: each with the words `_MEANING` has for it and the
    type, range and choices its field declares); values stay strings, None when not given, so that the file's
    values stand unless a flag is given: `from_args` converts them, with the file's, in one place."""
    p.add_argument("--config", metavar="FILE", help="YAML file of settings (keys as the flags, with underscores); a flag given wins over it")
    flags.add_flags(p, CoordinatorConfig, _MEANING)


def from_args(args: argparse.Namespace) -> CoordinatorConfig:
    """The coordinator's configuration: the defaults, under the --config file's settings, under the flags
    given; SettingsError (one line) names every value that does not convert, a flag by its flag and a file's
    value by its key in the file."""
    return flags.build(CoordinatorConfig, args, config_file=args.config)
