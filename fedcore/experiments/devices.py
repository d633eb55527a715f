"""Training a simulated round's clients: in this process on one trainer, or in parallel over several devices
with one persistent process per device (`--devices cuda:0,cuda:1`, `--devices cpu,cpu`).

A client's training depends only on what its job carries (task, seed, received payload, private tensors) and
on its shard, never on the process that runs it or on what that process trained before: every task loads the
whole model (received parts and the client's own private parts) and starts a fresh Adam. So the processes
return the same bytes as one process would, and the caller folds them in the plan's order, as a sequential
run does. CPU kernels reduce in an order that depends on the thread count: bytes match between runs whose
processes use the same number of torch threads (`--threads`)."""

from __future__ import annotations

import contextlib
import signal
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing import connection
from multiprocessing.connection import Connection
from typing import Annotated, Any, NoReturn, Protocol

import numpy as np
import safetensors.torch
import torch
import torch.multiprocessing
from pydantic import BeforeValidator

from fedcore import settings
from fedcore.data.datasets import to_model_range
from fedcore.errors import TrainingProcessFailed
from fedcore.federation.client import ClientRuntime, TrainTask
from fedcore.model.diffusion import Schedule
from fedcore.model.training import LocalTrainer, SpeedConfig, threads_per_process, training_processes
from fedcore.model.unet import build_model

# --- the devices setting --------------------------------------------------------------------------------------


def parse_devices(given: str | Sequence[str]) -> tuple[str, ...]:
    """`cuda:0,cuda:1` or `cpu,cpu` (or a list of names) -> the devices, one training process each, checked as
    every set of training processes is (`training_processes`); ValueError naming an empty or `auto` entry too
    (each process needs its device named)."""
    names = [s.strip() for s in given.split(",")] if isinstance(given, str) else [str(s).strip() for s in given]
    unnamed = next((name for name in names if not name or name == "auto"), None)
    if unnamed is not None:
        raise ValueError(f"entry {unnamed!r}: name each device (cpu, cuda:N)")
    return training_processes(names)


# A comma list of devices, checked against this machine when the setting is built (at start).
DeviceList = Annotated[
    tuple[str, ...], BeforeValidator(parse_devices), settings.Described("a comma list of devices of one kind, e.g. cuda:0,cuda:1 or cpu,cpu")
]


# --- one client's work --------------------------------------------------------------------------------------


def _pack(tensors: Mapping[str, torch.Tensor]) -> tuple[tuple[str, ...], bytes]:
    """Tensors as their names and safetensors bytes: what crosses a process boundary (torch's own pickling of a
    tensor goes through shared memory, which a container may have little of)."""
    return tuple(tensors), safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})


def _unpack(packed: tuple[tuple[str, ...], bytes]) -> dict[str, torch.Tensor]:
    """`_pack`'s tensors, in their order (the order of a checkpoint's entries)."""
    names, data = packed
    loaded = safetensors.torch.load(data)
    return {name: loaded[name] for name in names}


@dataclass(frozen=True)
class ClientJob:
    """One client's training in one round, as the server hands it over: task, received payload, and the private
    tensors the client kept from earlier rounds."""

    client_id: str
    task: TrainTask
    payload: bytes | bytearray | memoryview  # the received weights payload (safetensors)
    private_tensors: Mapping[str, torch.Tensor]  # on the CPU
    kept: KeptState = field(default_factory=lambda: KeptState({}, {}, -1))  # what a compressed run's client keeps

    def __reduce__(self) -> tuple[Any, ...]:
        return _job, (self.client_id, self.task, bytes(self.payload), _pack(self.private_tensors), self.kept.packed())


def _job(client_id: str, task: TrainTask, payload: bytes, private_tensors: tuple[tuple[str, ...], bytes], kept: tuple[Any, ...]) -> ClientJob:
    return ClientJob(client_id, task, payload, _unpack(private_tensors), KeptState.unpacked(kept))


@dataclass(frozen=True)
class KeptState:
    """What a client of a compressed run keeps between rounds besides its private parts, on the CPU: its
    error-feedback residuals, and the shared model (and its version) its coded downloads change."""

    residuals: Mapping[str, torch.Tensor]
    shared: Mapping[str, torch.Tensor]
    shared_version: int

    @classmethod
    def of(cls, runtime: ClientRuntime) -> KeptState:
        return cls(dict(runtime.residuals), dict(runtime.shared), runtime.shared_version)

    def into(self, runtime: ClientRuntime) -> None:
        runtime.residuals = {k: v.clone() for k, v in self.residuals.items()}
        runtime.shared = {k: v.clone() for k, v in self.shared.items()}
        runtime.shared_version = self.shared_version

    def packed(self) -> tuple[Any, ...]:
        return _pack(self.residuals), _pack(self.shared), self.shared_version

    @classmethod
    def unpacked(cls, packed: tuple[Any, ...]) -> KeptState:
        residuals, shared, version = packed
        return cls(_unpack(residuals), _unpack(shared), version)


@dataclass(frozen=True)
class ClientOutcome:
    """What a client's training gives back: its delta's payload, its report, and its private tensors now."""

    client_id: str
    delta_payload: bytes  # the delta's payload (safetensors)
    mean_loss: float
    images_seen: int
    private_tensors: Mapping[str, torch.Tensor]  # on the CPU
    kept: KeptState = field(default_factory=lambda: KeptState({}, {}, -1))

    def __reduce__(self) -> tuple[Any, ...]:
        return _outcome, (self.client_id, self.delta_payload, self.mean_loss, self.images_seen, _pack(self.private_tensors), self.kept.packed())


def _outcome(
    client_id: str, delta_payload: bytes, mean_loss: float, images_seen: int, private_tensors: tuple[tuple[str, ...], bytes], kept: tuple[Any, ...]
) -> ClientOutcome:
    return ClientOutcome(client_id, delta_payload, mean_loss, images_seen, _unpack(private_tensors), KeptState.unpacked(kept))


class ClientTraining(Protocol):
    """Runs a round's jobs and yields their outcomes in the jobs' order."""

    def train(self, jobs: Iterable[ClientJob]) -> Iterator[ClientOutcome]: ...


class InProcessTraining:
    """Every client's shard on one trainer's device, in this process; jobs trained one after the other."""

    def __init__(self, model_name: str, seed: int, speed: SpeedConfig, shards: Mapping[str, np.ndarray]):
        trainer = LocalTrainer(build_model(model_name, seed=seed), Schedule(), speed)
        self.runtimes = {cid: ClientRuntime(cid, model_name, trainer, trainer.prepare_data(to_model_range(images))) for cid, images in shards.items()}

    def train(self, jobs: Iterable[ClientJob]) -> Iterator[ClientOutcome]:
        for job in jobs:
            yield self.train_one(job)

    def train_one(self, job: ClientJob) -> ClientOutcome:
        runtime = self.runtimes[job.client_id]
        runtime.private_tensors = dict(job.private_tensors)
        job.kept.into(runtime)
        runtime.load(job.payload, job.task)
        result = runtime.train(job.task)
        delta_payload = runtime.delta_payload(job.task)
        return ClientOutcome(job.client_id, delta_payload, result.mean_loss, result.images_seen, runtime.private_tensors, KeptState.of(runtime))


# --- the processes --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    """A run's clients, sent to every process: it builds its trainer and puts the shards on its device."""

    model_name: str
    seed: int
    shards: Mapping[str, np.ndarray]  # (N, C, H, W) uint8, by client


@dataclass(frozen=True)
class _Failure:
    error: str  # the exception as its traceback's last lines say it, on one line: "ValueError: ..."


def _serve(conn: Connection, speed: SpeedConfig) -> None:
    """A training process: answers each message (a setup, a job) with one reply until told to stop (None) or
    until the parent is gone; the first error is its last reply (its traceback goes to stderr)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends this process
    if speed.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(speed.device))
    training: InProcessTraining | None = None
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        try:
            if isinstance(message, _Setup):
                training = None  # the previous simulation's trainer and shards go before the next ones come
                training = InProcessTraining(message.model_name, message.seed, speed, message.shards)
                conn.send("ready")
            elif training is None:
                raise RuntimeError("a job before the clients were set up")
            else:
                conn.send(training.train_one(message))
        except BaseException as e:
            traceback.print_exc(file=sys.stderr)
            with contextlib.suppress(OSError):
                conn.send(_Failure(" ".join(line.strip() for line in traceback.format_exception_only(e) if line.strip())))
            return


@dataclass
class _Process:
    index: int
    device: str
    process: Any  # a spawn-context torch.multiprocessing Process
    conn: Connection

    def __str__(self) -> str:
        return f"{self.device} (process {self.index + 1}, pid {self.process.pid})"


class DevicePool:
    """One training process per device, started once for a run (spawned: CUDA cannot be forked) and reused for
    every round and, under `feddiff reproduce`, every cell. One simulation uses it at a time: `setup` gives it
    the simulation's clients, `train` a round's jobs, each sent to whichever process is free."""

    def __init__(self, devices: Sequence[str], speed: SpeedConfig):
        if not devices:
            raise ValueError("a device pool needs at least one device")
        self.threads = threads_per_process(len(devices), speed.threads)
        context = torch.multiprocessing.get_context("spawn")
        self._processes: list[_Process] = []
        try:
            for index, device in enumerate(devices):
                parent_end, child_end = context.Pipe()
                process = context.Process(target=_serve, args=(child_end, replace(speed, device=device, threads=self.threads)), name=f"feddiff-train-{index}")
                process.start()
                child_end.close()
                self._processes.append(_Process(index, device, process, parent_end))
        except BaseException:
            self.close()
            raise

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(p.device for p in self._processes)

    def __str__(self) -> str:
        return f"{len(self._processes)} processes on {', '.join(self.devices)}, {self.threads} torch thread{'s' if self.threads > 1 else ''} each"

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.process.pid for p in self._processes)

    def __enter__(self) -> DevicePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self, model_name: str, seed: int, shards: Mapping[str, np.ndarray]) -> ClientTraining:
        """Every process holds these clients' shards (and no earlier ones) and a trainer of `model_name`."""
        self._check_open()
        setup = _Setup(model_name, seed, dict(shards))
        with self._closed_on_error():
            for p in self._processes:
                self._send(p, setup, "setting up")
            waiting = {p.index: (p, "setting up") for p in self._processes}
            while waiting:
                p, _ = self._reply(waiting)
                del waiting[p.index]
        return self

    def train(self, jobs: Iterable[ClientJob]) -> Iterator[ClientOutcome]:
        """Each job on the first free process (taken from `jobs` only then), the outcomes yielded in the jobs'
        order. TrainingProcessFailed, with every process ended, when one raises or dies."""
        self._check_open()
        pending = iter(jobs)
        free = list(self._processes)
        running: dict[int, tuple[_Process, str]] = {}  # by process index: the process, what it does
        job_of: dict[int, int] = {}  # by process index: the number of the job it runs
        done: dict[int, ClientOutcome] = {}  # by job number, until the jobs before it are yielded
        sent = given = 0
        with self._closed_on_error():
            while True:
                while free and (job := next(pending, None)) is not None:
                    p = free.pop(0)
                    doing = f"training {job.client_id!r}"
                    self._send(p, job, doing)
                    running[p.index], job_of[p.index] = (p, doing), sent
                    sent += 1
                while given in done:
                    yield done.pop(given)
                    given += 1
                if not running:
                    return
                p, outcome = self._reply(running)
                del running[p.index]
                done[job_of.pop(p.index)] = outcome
                free = sorted([*free, p], key=lambda q: q.index)

    def _check_open(self) -> None:
        if not self._processes:
            raise TrainingProcessFailed("the device pool is closed")

    def _send(self, p: _Process, message: object, doing: str) -> None:
        try:
            p.conn.send(message)
        except OSError as e:
            self._failed(p, doing, f"cannot be reached ({e})")

    def _reply(self, waiting: Mapping[int, tuple[_Process, str]]) -> tuple[_Process, Any]:
        """The next reply of one of the `waiting` processes (by index: the process and what it does);
        TrainingProcessFailed when that reply is an error, or when one of them dies without replying."""
        by_conn = {p.conn: p for p, _ in waiting.values()}
        by_sentinel = {p.process.sentinel: p for p, _ in waiting.values()}
        ready = connection.wait([*by_conn, *by_sentinel])
        replied = [by_conn[r] for r in ready if r in by_conn]  # a reply first: the death may follow it
        p = replied[0] if replied else by_sentinel[ready[0]]
        doing = waiting[p.index][1]
        try:
            reply = p.conn.recv() if replied else None
        except EOFError:
            reply = None
        if reply is None:
            p.process.join(timeout=5)
            self._failed(p, doing, f"died (exit code {p.process.exitcode})")
        if isinstance(reply, _Failure):
            self._failed(p, doing, f"failed: {reply.error}")
        return p, reply

    def _failed(self, p: _Process, doing: str, how: str) -> NoReturn:
        raise TrainingProcessFailed(f"{doing} on {p}: the process {how}")

    @contextlib.contextmanager
    def _closed_on_error(self) -> Iterator[None]:
        """Every process ended at once when the pool's work stops half-way (an error here or in the caller,
        Ctrl-C, an abandoned round): their work is lost and their state no longer the caller's."""
        try:
            yield
        except BaseException:
            self.close(wait=False)
            raise

    def close(self, *, wait: bool = True) -> None:
        """Stop every process: asked to and awaited (wait), else terminated; idempotent."""
        for p in self._processes:
            if wait:
                with contextlib.suppress(OSError):
                    p.conn.send(None)
                p.process.join(timeout=30)
            if p.process.is_alive():
                p.process.terminate()
                p.process.join(timeout=10)
            if p.process.is_alive():
                p.process.kill()
                p.process.join()
            p.conn.close()
        self._processes = []


@contextlib.contextmanager
def device_pool(devices: Sequence[str], speed: SpeedConfig) -> Iterator[DevicePool | None]:
    """A pool over `devices` for the duration of the block, or None (train in this process) when none is named."""
    if not devices:
        yield None
        return
    with DevicePool(devices, speed) as pool:
        yield pool
