"""A coordinator and workers as separate processes on loopback: for `make smoke`, `make demo` and tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics endpoint, keyed by (name, sorted labels)."""
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_value(metrics: dict, name: str, **labels: str) -> float:
    """The value of metric `name` with exactly these labels in a `scrape`; 0.0 when it has none."""
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def _wait_file(name: str, path: Path, proc: subprocess.Popen, timeout: float, log: Path) -> dict:
    """The ready file `path` of process `name` once written; RuntimeError when the process exits first,
    TimeoutError after `timeout` seconds, each with the end of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready; {_log_tail(log)}")
        time.sleep(0.05)
    raise TimeoutError(f"{name} was not ready after {timeout:g} s; {_log_tail(log)}")


def _log_tail(log: Path) -> str:
    text = log.read_text()[-3000:]
    if not text.strip():
        return f"its log {log} is empty (it had not got as far as its first line: on a busy machine importing torch alone can take a minute)"
    return f"the end of its log {log}:\n{text}"


@dataclass
class Process:
    name: str
    proc: subprocess.Popen
    log: Path
    ready: dict

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        self.signal(sig)
        return self.reap(timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` while the process runs; `reap` then waits for it."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def reap(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit, killing it after `timeout` seconds; its exit status."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text()


@dataclass
class LocalCluster:
    """Starts `feddiff coordinator` and `feddiff worker` processes; every port is picked by the OS."""

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    _coordinators: list[Process] = field(default_factory=list, init=False, repr=False)  # stopped after the workers

    def _start(self, name: str, args: Sequence[str], ready_timeout: float, launcher: Sequence[str] = ()) -> Process:
        return self._await_ready(self._spawn(name, args, launcher), ready_timeout)

    def _await_ready(self, p: Process, timeout: float) -> Process:
        """`p` once its ready file is written (its `ready` read from it)."""
        p.ready = _wait_file(p.name, self.workdir / f"{p.name}.ready.json", p.proc, timeout, p.log)
        return p

    def _spawn(self, name: str, args: Sequence[str], launcher: Sequence[str] = ()) -> Process:
        """Start the process and return at once; its `ready` is empty until `_await_ready` has read its ready file."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready = self.workdir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        log = self.workdir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, *launcher, "-m", "feddiff", *args, "--ready-file", str(ready)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        p = Process(name, proc, log, {})
        self.processes.append(p)
        return p

    def coordinator(self, *args: str, name: str = "coordinator", ready_timeout: float = 60.0) -> Process:
        base = ["coordinator", "--listen", "127.0.0.1:0", "--metrics-port", "0", "--checkpoint-dir", str(self.workdir / "checkpoints")]
        coordinator = self._start(name, [*base, *args], ready_timeout)
        self._coordinators.append(coordinator)
        return coordinator

    def worker(self, address: str, worker_id: str, *args: str, name: str = "", ready_timeout: float = 60.0, launcher: Sequence[str] = ()) -> Process:
        """A worker process named `name` (default: its worker id), with its state dir in workers/<name>; under
        `launcher` (python's arguments before `-m feddiff`: `-m torch.distributed.run ...` runs it under torchrun)."""
        name = name or worker_id
        return self._start(name, self._worker_args(address, worker_id, name, args), ready_timeout, launcher)

    def _worker_args(self, address: str, worker_id: str, name: str, args: Sequence[str]) -> list[str]:
        base = [
            "worker",
            "--coordinator",
            address,
            "--worker-id",
            worker_id,
            "--metrics-port",
            "0",
            "--state-dir",
            str(self.workdir / "workers" / name),
            "--progress",
            "log",
        ]
        return [*base, *args]

    def shard_worker(
        self, address: str, index: int, num_clients: int, *args: str, keep_running: bool = True, ready_timeout: float = 60.0, launcher: Sequence[str] = ()
    ) -> Process:
        """Worker `client-<index>` on Fashion-MNIST shard `index` of `num_clients`, plain-text gRPC, one CPU
        thread; with `keep_running` it stays connected after the last round (its metrics stay scrapeable)."""
        return self.worker(address, f"client-{index}", *shard_flags(index, num_clients, keep_running), *args, ready_timeout=ready_timeout, launcher=launcher)

    def shard_workers(
        self, address: str, num_clients: int, *args: str, keep_running: bool = True, ready_timeout: float = 60.0, count: int | None = None
    ) -> list[Process]:
        """A `shard_worker` for each of the `num_clients` shards (the first `count` of them when given), started together."""
        flags = {f"client-{i}": [*shard_flags(i, num_clients, keep_running), *args] for i in range(num_clients if count is None else count)}
        return self.workers(address, flags, ready_timeout=ready_timeout)

    def workers(self, address: str, flags: Mapping[str, Sequence[str]], ready_timeout: float = 60.0) -> list[Process]:
        """A `worker` for each worker id of `flags` with its flags, all started at once (their imports overlap),
        returned when every one is ready."""
        started = [self._spawn(worker_id, self._worker_args(address, worker_id, worker_id, args)) for worker_id, args in flags.items()]
        return [self._await_ready(w, ready_timeout) for w in started]

    def stop_all(self) -> None:
        """SIGTERM to every worker at once, and once they are gone to the coordinators."""
        for group in ([p for p in self.processes if p not in self._coordinators], self._coordinators):
            for p in reversed(group):
                p.signal()
            for p in reversed(group):
                p.reap()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def shard_flags(index: int, num_clients: int, keep_running: bool = True) -> list[str]:
    """A shard worker's flags: Fashion-MNIST shard `index` of `num_clients`, plain-text gRPC, one CPU thread."""
    return ["--insecure", "--client-index", str(index), "--num-clients", str(num_clients), "--threads", "1", *(["--keep-running"] if keep_running else [])]


def status(address: str, timeout: float = 5.0) -> dict:
    """The coordinator's GetStatus as a dict, asked over plain text as `feddiff status --json` asks it."""
    from feddiff.system_cli import StatusConfig, ask_status, status_dict

    return status_dict(ask_status(StatusConfig(address=address, timeout=timeout)))


def wait_for_state(address: str, state: str, timeout: float, procs: Sequence[Process] = ()) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.proc.poll() not in (None, 0):
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n{p.output()[-3000:]}")
        s = status(address)
        if s["state"] == state:
            return s
        time.sleep(0.2)
    raise TimeoutError(f"coordinator not {state!r} after {timeout}s")
