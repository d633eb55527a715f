"""Helpers of the fault and network tests: waiting on a condition, reading the round log, starting workers,
probing health checks."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from fedcore.federation.roundlog import ROUNDS_LOG
from fedcore.model.parts import Part
from fedcore.model.unet import build_model, layout_of
from feddiff.local import LocalCluster, Process, metric_value, scrape, shard_flags

# Tiny UDec rounds that take a second or two on one CPU thread.
RUN = ["--strategy", "udec", "--model", "tiny", "--epochs", "1", "--batch-size", "32", "--seed", "7"]
# A dead worker is noticed within 3 s.
LIVENESS = ["--heartbeat-interval", "0.5", "--heartbeat-timeout", "3", "--progress", "log"]
DATA = ["--max-images", "240", "--threads", "1"]
ENV = {"OMP_NUM_THREADS": "1"}
TINY = layout_of(build_model("tiny"))
T = TypeVar("T")
DECODER_BYTES = TINY.sizes[Part.DECODER] * 4  # a tiny decoder update, less its safetensors header


def wait_until(check: Callable[[], T], what: str, timeout: float, procs: Sequence[Process] = (), every: float = 0.05) -> T:
    """Poll `check` until it returns something truthy, and return that; fail early when one of `procs` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.proc.poll() not in (None, 0):
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode} while waiting for {what}:\n{p.output()[-3000:]}")
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"no {what} after {timeout}s")


def rounds_log(checkpoint_dir: Path) -> list[dict]:
    """The training rounds of the coordinator's round log (evaluation lines left out)."""
    path = checkpoint_dir / ROUNDS_LOG
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "participants" in r]


def metric(port: int, name: str, **labels: str) -> float:
    return metric_value(scrape(port), name, **labels)


def start_workers(cluster: LocalCluster, address: str, extra: Sequence[Sequence[str]]) -> list[Process]:
    """Worker `client-i` for each entry of `extra` (its additional flags), started together."""
    flags = {f"client-{i}": [*shard_flags(i, len(extra), keep_running=False), *DATA, *more] for i, more in enumerate(extra)}
    return cluster.workers(address, flags)


def start_run(
    cluster: LocalCluster, args: Sequence[str], extra: Sequence[Sequence[str]], name: str = "coordinator", address: str = ""
) -> tuple[Process, list[Process]]:
    """A coordinator of `args` and `start_workers(extra)`, all started side by side: the coordinator on
    `address` (default: a free port picked here), which the workers dial (retrying after their backoff) until
    it is up."""
    address = address or f"127.0.0.1:{free_port()}"
    with ThreadPoolExecutor(1) as pool:
        coord = pool.submit(cluster.coordinator, *args, "--listen", address, name=name)
        workers = start_workers(cluster, address, extra)
        return coord.result(), workers


def image_folder(path: Path, n: int = 8, size: int = 28) -> Path:
    """A `--data-dir` of `n` random grayscale PNGs of `size` x `size`."""
    import numpy as np
    from PIL import Image

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MIN_ANSWERS = 10  # health checks a probe makes at the least, however short its block
PROBE_TIMEOUT = 1.0  # seconds: Kubernetes' default timeoutSeconds, after which a probe counts as failed


class HealthProbe:
    """The coordinator's health service asked every `every` seconds, for the length of a `with` block, from a
    process of its own (tests.reliability.health_probe) so that the test's own clients do not delay it."""

    def __init__(self, address: str, every: float = 0.02):
        self.address, self.every = address, every
        self.latencies: list[float] = []  # seconds, one per answer
        self.failures: list[str] = []  # status codes of checks that failed

    def __enter__(self) -> HealthProbe:
        root = Path(__file__).resolve().parents[2]
        self._out = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        args = [sys.executable, "-m", "tests.reliability.health_probe", self.address, str(self.every)]
        self._proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT, cwd=root, env=env)
        wait_until(lambda: self._proc.poll() is not None or os.fstat(self._out.fileno()).st_size > 0, "a first health check", 60)
        return self

    def _answers(self) -> int:
        with open(f"/proc/self/fd/{self._out.fileno()}") as f:
            return sum(1 for _ in f)

    def __exit__(self, *exc: object) -> None:
        # A short block still gets MIN_ANSWERS checks: the probe goes on until it has them (or dies).
        wait_until(lambda: self._proc.poll() is not None or self._answers() >= MIN_ANSWERS, f"{MIN_ANSWERS} health checks", 30)
        self._proc.terminate()
        self._proc.wait(10)
        self._out.seek(0)
        for line in self._out.read().splitlines():
            try:
                self.latencies.append(float(line))
            except ValueError:
                self.failures.append(line)
        self._out.close()

    def assert_answered_within(self, seconds: float) -> None:
        """The median check answered within `seconds` and every one within PROBE_TIMEOUT. A probe blocked
        behind busy handlers waits for them (seconds), which fails both; one check that a loaded machine's
        scheduler held back for a few tens of milliseconds fails neither."""
        assert not self.failures, f"health checks failed: {self.failures[:5]}"
        assert len(self.latencies) >= MIN_ANSWERS, f"only {len(self.latencies)} health checks were answered"
        median, worst = statistics.median(self.latencies), max(self.latencies)
        of = f"of {len(self.latencies)} checks"
        assert median < seconds, f"the median health check took {median * 1000:.0f} ms ({of}; limit {seconds * 1000:.0f} ms)"
        assert worst < PROBE_TIMEOUT, f"a health check took {worst * 1000:.0f} ms ({of}; limit {PROBE_TIMEOUT * 1000:.0f} ms)"
