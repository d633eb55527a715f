"""Helpers of the fault and network tests: waiting on a condition, reading the round log, starting workers."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from feddiff.local import LocalCluster, Process, sample, scrape
from fedcore.model import build_model, layout_of
from fedcore.parts import Part
from fedcore.roundlog import ROUNDS_LOG

# Tiny UDec rounds that take a second or two on one CPU thread.
RUN = ["--strategy", "udec", "--model", "tiny", "--epochs", "1", "--batch-size", "32", "--seed", "7"]
# A dead worker is noticed within 3 s.
LIVENESS = ["--heartbeat-interval", "0.5", "--heartbeat-timeout", "3", "--progress", "log"]
DATA = ["--max-images", "240", "--threads", "1"]
ENV = {"OMP_NUM_THREADS": "1"}
TINY = layout_of(build_model("tiny"))
DECODER_BYTES = TINY.sizes[Part.DECODER] * 4  # a tiny decoder update, less its safetensors header


def wait_until(check: Callable[[], object], what: str, timeout: float, procs: Sequence[Process] = (), every: float = 0.05) -> object:
    """Poll `check` until it returns something truthy; fail early when one of `procs` died."""
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
    return sample(scrape(port), name, **labels)


def start_workers(cluster: LocalCluster, address: str, extra: Sequence[Sequence[str]]) -> list[Process]:
    """Worker `client-i` for each entry of `extra` (its additional flags), started in parallel."""
    k = len(extra)

    def start(i: int) -> Process:
        args = ["--insecure", "--client-index", str(i), "--num-clients", str(k), *DATA, *extra[i]]
        return cluster.worker(address, f"client-{i}", *args)

    with ThreadPoolExecutor(k) as pool:
        return list(pool.map(start, range(k)))


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
