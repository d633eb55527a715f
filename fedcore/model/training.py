"""Local DDPM training on one client's shard: one model and optimizer per process, reused every round."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
import torch.distributed as dist
from pydantic import AfterValidator

from fedcore import settings
from fedcore.model.denoiser import Denoiser
from fedcore.model.diffusion import LossKind, NoisePredictor, Schedule, noise_prediction_loss, training_draws
from fedcore.model.ranks import Ranks
from fedcore.settings import BatchSize, Epochs, LearningRate, Threads

Toggle = Literal["auto", "on", "off"]
ADAM_BETAS = (0.9, 0.999)  # torch's defaults; the server bounds a delta's values by the steps they allow (fedcore.federation.robust)


@dataclass(frozen=True)
class TrainConfig:
    """A round's local training, sent with each task; its types carry the ranges a worker runs
    (`fedcore.settings`: build it with `settings.build` to have them checked)."""

    __pydantic_config__ = settings.CONFIG

    epochs: Epochs = 5  # E: local epochs per round
    batch_size: BatchSize = 128
    lr: LearningRate = 1e-4  # Adam, fresh every round, no schedule (the paper)
    loss: LossKind = "huber"


def offered_devices() -> list[str]:
    """The devices this machine trains on, as a setting names them: auto, cpu, each CUDA GPU, mps."""
    offered = ["auto", "cpu"]
    if torch.cuda.is_available():
        offered += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        offered.append("mps")
    return offered


def device_problem(name: str) -> str | None:
    """Why `name` is not a device of this machine (with what it offers), or None when it is."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"not a device name; this machine offers {', '.join(offered_devices())}"
    if device.type == "cpu":
        return None
    if device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count():
        return None
    if device.type == "mps" and torch.backends.mps.is_available() and not device.index:
        return None
    return f"no such device here; this machine offers {', '.join(offered_devices())}"


def resolve_device(name: str) -> torch.device:
    """The device `name` names ("auto" = CUDA when present, else CPU); ValueError naming it and what this
    machine offers when it has no such device."""
    problem = device_problem(name)
    if problem is not None:
        raise ValueError(f"device {name!r}: {problem}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def training_processes(devices: Sequence[str]) -> tuple[str, ...]:
    """The devices of training processes started together on this host, one process each, as torch names
    them (`cuda` is cuda:0). ValueError naming the entry that is no device of this machine (`device_problem`),
    devices of two kinds (a client's model would depend on which one trained it), or more processes than this
    host's CPUs (each takes one at least). A device may repeat: `cpu,cpu` is two processes on the CPU. The one
    check of `--devices` (simulate, reproduce) and of a worker's ranks (`--nproc-per-node`)."""
    found = []
    for name in devices:
        problem = device_problem(name)
        if problem is not None:
            raise ValueError(f"device {name!r}: {problem}")
        device = resolve_device(name)
        found.append(f"{device.type}:0" if device.type == "cuda" and device.index is None else str(device))
    cpus = os.cpu_count() or 1
    if len(found) > cpus:
        raise ValueError(
            f"{len(found)} training processes, one per device: more than this machine's {cpus} CPUs (each takes one at least); give at most {cpus}"
        )
    kinds = sorted({torch.device(d).type for d in found})
    if len(kinds) > 1:
        raise ValueError(f"devices of kinds {', '.join(kinds)}: a client's model would depend on which one trained it; give devices of one kind")
    return tuple(found)


def threads_per_process(processes: int, threads: int = 0) -> int:
    """torch threads of each of `processes` training processes on this host: `threads` (--threads) when given,
    else the threads torch takes in this process (its default: the physical cores, or OMP_NUM_THREADS) shared
    out between them, one at least. The one share of `--devices` (simulate, reproduce) and of a worker's ranks."""
    return threads or max(1, torch.get_num_threads() // processes)


def _on_this_machine(name: str) -> str:
    problem = device_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


# A device setting: checked against this machine when the setting is built (at start), not at first use.
Device = Annotated[str, AfterValidator(_on_this_machine), settings.Described("auto, cpu, cuda, cuda:N or mps")]


@dataclass(frozen=True)
class SpeedConfig:
    """How fast a worker trains; none of it changes the function trained (beyond bf16 rounding)."""

    __pydantic_config__ = settings.CONFIG

    device: Device = "auto"  # "auto" = CUDA when present, else CPU
    bf16: Toggle = "auto"  # bf16 autocast: on where the device runs bf16 natively (CUDA, or AVX512-BF16/AMX CPUs)
    channels_last: Toggle = "auto"  # NHWC memory format: on (faster convs on CUDA and with oneDNN on CPU)
    fused_adam: Toggle = "auto"  # fused Adam kernel: on (CUDA and CPU)
    compile: Toggle = "auto"  # torch.compile, with CUDA graphs on CUDA: on CUDA only (on CPU it was slower)
    threads: Threads = 0  # CPU threads for torch (0 = leave torch's default)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: CPUs whose oneDNN kernels run bf16 natively; elsewhere bf16 is emulated and slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def _on(toggle: Toggle, default: bool) -> bool:
    return default if toggle == "auto" else toggle == "on"


@dataclass(frozen=True)
class ResolvedSpeed:
    """The settings a trainer runs with. "auto" is what measured fastest on each device (docs/benchmarks.md):
    on a 2-core AVX512-BF16 CPU, bf16 autocast ~1.7x, channels_last ~1.2x and fused Adam ~3x the optimizer
    step, while torch.compile took ~4 minutes to compile and then ran slower than eager."""

    device: torch.device
    bf16: bool
    channels_last: bool
    fused_adam: bool
    compile: bool

    @classmethod
    def of(cls, cfg: SpeedConfig) -> ResolvedSpeed:
        device = resolve_device(cfg.device)
        cuda = device.type == "cuda"
        cpu = device.type == "cpu"
        bf16_native = torch.cuda.is_bf16_supported() if cuda else cpu and cpu_has_native_bf16()
        return cls(
            device=device,
            bf16=_on(cfg.bf16, bf16_native) and (bf16_native or cpu),  # "on" emulates bf16 on other CPUs
            channels_last=_on(cfg.channels_last, cuda or cpu),
            fused_adam=_on(cfg.fused_adam, cuda or cpu),
            compile=_on(cfg.compile, cuda),
        )

    @property
    def cuda_graphs(self) -> bool:
        """Compiled with mode="reduce-overhead": the step replays CUDA graphs captured on the first calls."""
        return self.compile and self.device.type == "cuda"


@dataclass(frozen=True)
class TrainResult:
    images_seen: int
    steps: int
    mean_loss: float
    seconds: float
    losses: list[float] = field(repr=False)  # one per optimizer step

    @property
    def images_per_second(self) -> float:
        return self.images_seen / self.seconds if self.seconds > 0 else 0.0


class TrainingInterrupted(Exception):
    """Raised between steps when the caller asked training to stop (e.g. SIGTERM)."""


StepCallback = Callable[[int, int, int, torch.Tensor], None]  # (epoch, step in epoch, steps per epoch, loss)


class LocalTrainer:
    """Trains `model` in place: the worker's fast path, built once per process and reused every round.

    Data stays on the device (`prepare_data`), the step runs under bf16 autocast with channels_last tensors
    and a fused Adam, and on CUDA the model is compiled once with CUDA graphs. Nothing here is re-created
    between rounds: received weights are copied into the same parameters (ClientRuntime.load) and
    `reset_optimizer` empties Adam's state in place (a fresh Adam, as the paper does every round), so the
    captured graphs stay valid. Every batch is trained, the last partial one too (a second static shape,
    compiled once), so the fast path trains the same function as the fp32 eager loop.

    With `ranks` of more than one process (torch.distributed initialised, `worker.team`), each rank trains its
    share of every global batch (`Ranks.share`) in a DistributedDataParallel wrap of the model, built at the
    first `train` (its construction is a collective all ranks enter together), compiled as one process is but
    without CUDA graphs (DDP's gradient hooks reduce between the graph's kernels)."""

    def __init__(
        self, model: Denoiser, schedule: Schedule, speed: SpeedConfig = SpeedConfig(), ranks: Ranks = Ranks(), stop_group: dist.ProcessGroup | None = None
    ):
        self.speed = ResolvedSpeed.of(speed)
        self.ranks = ranks
        self.stop_group = stop_group  # a gloo group of the ranks for the stop flag (None: the default group, or one rank)
        self.cuda_graphs = self.speed.cuda_graphs and not ranks.distributed
        if speed.threads > 0:
            torch.set_num_threads(speed.threads)
        if self.speed.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once
        self.schedule = schedule
        # Module.to takes memory_format (it passes it to every tensor's .to); torch's overloads of it leave it out.
        self.model = model.to(self.speed.device, memory_format=self._memory_format)  # type: ignore[call-overload]
        self.model.train()
        # The compiled module shares its parameters with `model`, so weights loaded in place are what the next
        # round trains; "reduce-overhead" captures CUDA graphs, the default mode (CPU) only generates kernels.
        self.net: NoisePredictor | None = None if ranks.distributed else self._compiled(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, betas=ADAM_BETAS, fused=True if self.speed.fused_adam else None)

    @property
    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.speed.channels_last else torch.contiguous_format

    def _compiled(self, module: torch.nn.Module) -> NoisePredictor:
        mode = "reduce-overhead" if self.cuda_graphs else None
        return torch.compile(module, mode=mode, dynamic=False) if self.speed.compile else module

    def _network(self) -> NoisePredictor:
        """What a step calls: the model (compiled), or with several ranks its DDP wrap, built on first use."""
        if self.net is None:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.speed.device.index] if self.speed.device.type == "cuda" else None
            self.net = self._compiled(DistributedDataParallel(self.model, device_ids=device_ids))
        return self.net

    # --- optimizer ------------------------------------------------------------------------------------------
    def reset_optimizer(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()

    # --- steps ----------------------------------------------------------------------------------------------
    def _step(self, data: torch.Tensor, batch: torch.Tensor, loss_kind: LossKind, generator: torch.Generator) -> torch.Tensor:
        """One Adam step on the global batch `batch` (image indices into `data`): the draws of the whole batch
        (every rank makes them alike), this rank's share of it trained. A rank whose share of a short last
        batch is empty trains one image at weight 0, so that DDP's gradient reduction still sees it."""
        net = self._network()
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are dead from here
        self.optimizer.zero_grad(set_to_none=True)
        t, noise = training_draws(self.schedule, (len(batch), *data.shape[1:]), data.dtype, data.device, generator)
        mine = self.ranks.share(len(batch)) if self.ranks.share_size(len(batch)) else slice(0, 1)
        with torch.autocast(self.speed.device.type, dtype=torch.bfloat16, enabled=self.speed.bf16):
            loss = noise_prediction_loss(net, self.schedule, data[batch[mine]], t[mine], noise[mine], loss_kind)
            loss = loss * self.ranks.loss_weight(len(batch))  # 1.0 for one rank
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    # --- public ---------------------------------------------------------------------------------------------
    def prepare_data(self, images: torch.Tensor) -> torch.Tensor:
        """Images in model range (N, C, H, W) float32, resident on the training device."""
        return images.to(self.speed.device, dtype=torch.float32).contiguous(memory_format=self._memory_format)

    def train(
        self,
        data: torch.Tensor,
        cfg: TrainConfig,
        *,
        seed: int,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        """E epochs over `data` (N, C, H, W) float32 in model range, on the training device (`prepare_data`),
        shuffled by `seed`, with a fresh optimizer first; every step is one Adam step (at cfg.lr) on the
        noise-prediction objective of DDPM (Ho et al. 2020, Algorithm 1; `diffusion.training_loss`, cfg.loss).

        `on_step(epoch, step in epoch, steps per epoch, loss)` follows every step; `should_stop` is asked before
        each one. ValueError for an empty shard; TrainingInterrupted when `should_stop` answers True (on any
        rank: all ranks stop at the same step).

        With several ranks, every rank passes the same `data` (the worker's whole shard) and `seed`; the
        losses and the images seen are those of the global batches, as one process reports them."""
        n = data.shape[0]
        if n == 0:
            raise ValueError("cannot train on an empty shard")
        self.reset_optimizer(cfg.lr)
        generator = torch.Generator(device=self.speed.device).manual_seed(seed)
        steps = steps_per_epoch(n, cfg.batch_size)
        losses: list[torch.Tensor] = []  # stay on the device: no host sync per step
        start = time.perf_counter()
        for epoch, step, batch in shuffled_batches(n, cfg.batch_size, cfg.epochs, generator):
            if self.ranks.any(should_stop is not None and should_stop(), self.stop_group):
                raise TrainingInterrupted(f"stopped at epoch {epoch}, step {step}")
            losses.append(self._step(data, batch, cfg.loss, generator))
            if on_step is not None:
                on_step(epoch, step, steps, losses[-1])
        return _train_result(self.ranks.global_losses(torch.stack(losses)), cfg.epochs * n, start)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one epoch over n images: ceil(n / batch_size), the last one partial."""
    return -(-n // batch_size)


def shuffled_batches(n: int, batch_size: int, epochs: int, generator: torch.Generator) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(epoch, step in epoch, image indices) of every step: each epoch a fresh permutation of range(n), drawn
    from `generator` on its device as the epoch starts, cut into batches of `batch_size`."""
    for epoch in range(epochs):
        order = torch.randperm(n, device=generator.device, generator=generator)
        for step in range(steps_per_epoch(n, batch_size)):
            yield epoch, step, order[step * batch_size : (step + 1) * batch_size]


def _train_result(losses: torch.Tensor, images: int, start: float) -> TrainResult:
    """The step losses (steps,) fetched from the device in one sync, and the seconds from `start` up to it."""
    values = losses.float().cpu().tolist()
    seconds = time.perf_counter() - start
    return TrainResult(images_seen=images, steps=len(values), mean_loss=sum(values) / len(values), seconds=seconds, losses=values)
