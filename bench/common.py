"""What the transport benchmarks share: bench-only model sizes, a coordinator process, light workers, peak RSS,
and the raw TCP baseline."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from bench.report import MB, emit, log, machine, median  # noqa: F401  (re-exported for the benchmarks)
from fedcore.federation.client import TrainTask
from fedcore.model.parts import Part, PartLayout
from fedcore.model.unet import PRESETS, UNetConfig, build_model, layout_of, preset
from fedcore.payload import coded
from fedcore.payload.serialization import PayloadMeta
from fedcore.wire.convert import task_from_proto
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from fedcore.wire.stream import LEGACY_DIGEST, StreamHeader

MIB = 1 << 20

# --- bench-only model sizes --------------------------------------------------------------------------------

_SYNTHETIC = re.compile(r"bench-dim(\d+)$")


def ensure_preset(name: str) -> str:
    """Make `name` a known preset in this process: the named presets, or "bench-dim<D>", the paper's UNet at
    width D (same topology and 220 tensors as paper-fmnist; only the size differs)."""
    m = _SYNTHETIC.match(name)
    if m and name not in PRESETS:
        PRESETS[name] = UNetConfig(dim=int(m.group(1)))  # bench processes only: a size the CLI does not offer
    preset(name)
    return name


def meta_layout(name: str) -> PartLayout:
    """The part layout of a preset without allocating its weights."""
    with torch.device("meta"):
        return layout_of(build_model(ensure_preset(name)))


def payload_bytes_of(layout: PartLayout, parts: frozenset[Part] | None = None) -> int:
    specs = layout.specs(parts if parts is not None else frozenset(Part))
    return sum(s.numel * 4 for s in specs.values())


def synthetic_model(target_bytes: float) -> str:
    """The "bench-dim<D>" preset whose float32 parameters come closest to `target_bytes`."""
    lo, hi = 8, 1024
    while hi - lo > 1:  # parameters grow with the width
        mid = (lo + hi) // 2
        if payload_bytes_of(meta_layout(f"bench-dim{mid}")) < target_bytes:
            lo = mid
        else:
            hi = mid
    return min(
        (f"bench-dim{d}" for d in (lo, hi)),
        key=lambda n: abs(payload_bytes_of(meta_layout(n)) - target_bytes),
    )


def random_delta(layout: PartLayout, parts: frozenset[Part], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random (not zero) float32 tensors shaped like an update of `parts`, of about one Adam step at lr 1e-4 (a
    coordinator refuses values beyond what the task's training can reach, fedcore.federation.robust)."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(spec.shape, generator=g) * 1e-4 for name, spec in layout.specs(parts).items()}


def delta_payload(model: str, task: TrainTask, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The update of `tensors` for `task`, coded by the task's codec (plain float32 for none)."""
    meta = PayloadMeta(kind="delta", model=model, wire_round=task.round_index, parts=task.returns, codec=task.codec.name)
    return coded.encode(tensors, meta)


# --- a coordinator in its own process ----------------------------------------------------------------------


@dataclass
class CoordinatorProcess:
    """`python -m bench.coordinator_proc`: the real coordinator, started and stopped by a benchmark."""

    settings: dict[str, object]
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the process
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="feddiff-bench-")))
    proc: subprocess.Popen | None = None
    ready: dict = field(default_factory=dict)

    def start(self, timeout: float = 120.0) -> CoordinatorProcess:
        ready = self.workdir / "ready.json"
        settings = {**self.settings, "checkpoint_dir": str(self.workdir / "checkpoints"), "ready_file": str(ready)}
        self._log = open(self.workdir / "coordinator.log", "wb")  # noqa: SIM115 (the child's log while it runs; closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.coordinator_proc", json.dumps(settings)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"bench coordinator did not start:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        self.ready = json.loads(ready.read_text())
        return self

    @property
    def address(self) -> str:
        return self.ready["address"]

    @property
    def pid(self) -> int:
        return int(self.ready["pid"])

    def output(self) -> str:
        path = self.workdir / "coordinator.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def metrics(self) -> dict:
        from feddiff.local import scrape

        return scrape(self.ready["metrics_port"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        subprocess.run(["rm", "-rf", str(self.workdir)], check=False)

    def __enter__(self) -> CoordinatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- light workers: the real worker client, no training ----------------------------------------------------


class LightWorker:
    """One worker session over its own channel, using the worker's own client code (worker.rpc)."""

    def __init__(self, address: str, worker_id: str, num_examples: int = 1000, digests: Sequence[str] | None = None):
        """`digests`: what the worker says it checks besides SHA-256 (default: what this version checks; ()
        plays a worker that predates BLAKE3)."""
        from worker.rpc import CHANNEL_OPTIONS, CoordinatorClient, worker_info

        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.client = CoordinatorClient(self.channel)
        self.worker_id = worker_id
        self._info = worker_info(worker_id, "cpu", num_examples, False)
        self._legacy = digests is not None and not digests
        if digests is not None:
            del self._info.digests[:]
            self._info.digests.extend(digests)
        self.wire_down = 0
        self.wire_up = 0

    def join(self) -> pb.JoinResponse:
        resp = self.client.join(self._info)
        if self._legacy:  # a worker before BLAKE3 also sent SHA-256
            self.client.upload_digest = LEGACY_DIGEST
        return resp

    def next_task(self, timeout: float = 120.0) -> TrainTask | None:
        """The next train task, or None when the federation is done."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            resp = self.client.wait_task(min(30.0, max(0.1, deadline - time.monotonic())))
            kind = resp.WhichOneof("outcome")
            if kind == "task":
                return task_from_proto(resp.task)
            if kind == "done":
                return None
        raise TimeoutError(f"{self.worker_id}: no task after {timeout}s")

    def train_task(self, timeout: float = 120.0) -> TrainTask:
        """The next train task, which the benchmark needs: an error when the federation is done before it."""
        task = self.next_task(timeout)
        if task is None:
            raise RuntimeError(f"{self.worker_id}: the federation ended before the benchmark's last round")
        return task

    def download(self, task: TrainTask, max_bytes: int) -> memoryview:
        def count(n: int) -> None:
            self.wire_down += n

        return self.client.download(task, max_bytes=max_bytes, on_wire=count)

    def upload(self, task: TrainTask, payload: bytes, images: int = 1000, header: StreamHeader | None = None) -> None:
        """Upload `payload`; with its `header` (size and digest) when the caller computed it beforehand."""

        def count(n: int) -> None:
            self.wire_up += n

        report = pb.TrainReport(images_seen=images, mean_loss=0.1, seconds=1.0)
        self.client.upload(task, payload, report, on_wire=count, header=header)

    def close(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            self.client.leave()
        self.channel.close()


# --- process memory ----------------------------------------------------------------------------------------


def run_together(k: int, work, during=None) -> float:
    """Start `work(i)` for i in 0..k-1 in threads released at once by a barrier; wall seconds until all end.
    `during`, a context manager, is entered just before the release (e.g. an RSS sampler)."""
    from contextlib import nullcontext

    barrier = threading.Barrier(k + 1)

    def run(i: int) -> None:
        barrier.wait()
        work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    with during if during is not None else nullcontext():
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        return time.perf_counter() - start


def rss_bytes(pid: int) -> int:
    return _status_kb(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    """The process's peak RSS (VmHWM) since start or since the last `reset_peak_rss`."""
    return _status_kb(pid, "VmHWM") * 1024


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: `echo 5 > /proc/PID/clear_refs`)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


class RssSampler:
    """Samples a process's RSS in a thread: a cross-check of VmHWM where clear_refs is unavailable."""

    def __init__(self, pid: int, interval: float = 0.005):
        self.pid, self.interval = pid, interval
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, KeyError):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- raw TCP on loopback -----------------------------------------------------------------------------------


def raw_tcp_seconds(payload: bytes | bytearray | memoryview) -> float:
    """Seconds to move `payload` over a plain loopback TCP socket into a preallocated buffer (sendall /
    recv_into, one acknowledgement byte at the end): the ceiling the gRPC streams are compared with."""
    size = len(payload)
    sink = bytearray(size)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def receive() -> None:
        conn, _ = listener.accept()
        with conn:
            view, got = memoryview(sink), 0
            while got < size:
                n = conn.recv_into(view[got:], min(size - got, 4 * MIB))
                if n == 0:
                    raise ConnectionError("sender closed early")
                got += n
            conn.sendall(b"k")

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        start = time.perf_counter()
        conn.sendall(memoryview(payload))
        if conn.recv(1) != b"k":
            raise ConnectionError("no acknowledgement")
        seconds = time.perf_counter() - start
    receiver.join()
    listener.close()
    return seconds
