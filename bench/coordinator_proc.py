"""The real coordinator in its own process for benchmarks: bench-only model sizes, and a count of broadcast
serializations exported on /metrics (`python -m bench.coordinator_proc '{"model": ..., ...}'`)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Mapping

import torch
from prometheus_client import Counter

from bench.common import ensure_preset
from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator, settle_heap
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta
from service.allocator import tune_for_streaming


def count_weights_serializations(metrics: Metrics) -> None:
    """Wrap fedcore.payload.serialization.encode in this process so that every weights payload it builds is counted."""
    counter = Counter("bench_weights_serializations", "Weights payloads serialized", registry=metrics.registry)
    encode = serialization.encode

    def counting_encode(tensors: Mapping[str, torch.Tensor], meta: PayloadMeta) -> bytes:
        if meta.kind == "weights":
            counter.inc()
        return encode(tensors, meta)

    serialization.encode = counting_encode


def main() -> int:
    tune_for_streaming()  # as `feddiff coordinator` does
    settings = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ensure_preset(settings.get("model", "paper-fmnist"))
    defaults = {"listen": "127.0.0.1:0", "metrics_port": 0, "insecure": True, "heartbeat_timeout": 600.0}
    cfg = CoordinatorConfig(**{**defaults, **settings})
    metrics = Metrics()
    count_weights_serializations(metrics)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    coordinator = Coordinator(cfg, metrics).start()
    settle_heap()  # as `feddiff coordinator` does
    stop.wait()
    coordinator.stop(grace=0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
