"""The coordinator process: gRPC server (with health checks), metrics endpoint, round loop, clean shutdown."""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedcore.atomic import atomic_write_json
from fedcore.chunking import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE
from fedcore.federation import Federation
from fedcore.metrics import Metrics

from coordinator.config import CoordinatorConfig
from coordinator.progress import ProgressReporter
from coordinator.registry import WorkerRegistry
from coordinator.rounds import RoundDriver
from coordinator.security import Authenticator, server_credentials
from coordinator.servicer import CoordinatorServicer, register

log = logging.getLogger("feddiff.coordinator")

SERVICE_NAME = "feddiff.v1.Coordinator"
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_CHUNK_SIZE + (64 << 10)),
    ("grpc.max_send_message_length", MAX_CHUNK_SIZE + (64 << 10)),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # A fixed receive window per stream instead of BDP-grown ones: an upload waiting for an upload slot then
    # buffers at most 2 MiB here (with BDP, 32 waiting 256 MB uploads were buffered whole: 31x the update
    # size; bench/coordinator_memory.py). The cost: one upload stream moves at most 2 MiB per round trip.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 2 * DEFAULT_CHUNK_SIZE),
]


def build_federation(cfg: CoordinatorConfig) -> Federation:
    """A fresh federation, or the one in checkpoint_dir with --resume."""
    federation = Federation.restore(cfg.federation, cfg.checkpoint_dir) if cfg.resume else None
    if federation is not None:
        log.info("resuming after round %d from %s", federation.completed_rounds, cfg.checkpoint_dir)
        return federation
    if cfg.resume:
        log.warning("--resume: no checkpoint in %s, starting from round 1", cfg.checkpoint_dir)
    return Federation(cfg.federation)


class Coordinator:
    """A running coordinator; `start` returns once it serves, `stop` shuts it down cleanly."""

    def __init__(self, cfg: CoordinatorConfig, metrics: Metrics | None = None):
        self.cfg = cfg
        Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        self.metrics = metrics or Metrics()
        self.registry = WorkerRegistry(cfg.heartbeat_timeout)
        self.federation = build_federation(cfg)
        self.driver = RoundDriver(cfg, self.federation, self.registry, self.metrics)
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.grpc_threads), options=GRPC_OPTIONS)
        servicer = CoordinatorServicer(cfg, self.driver, self.registry, self.metrics, Authenticator(cfg))
        register(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        creds = server_credentials(cfg)
        self.port = self.server.add_secure_port(cfg.listen, creds) if creds else self.server.add_insecure_port(cfg.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.listen}")
        self.metrics_port: int | None = None
        # Probes (kubelet's native gRPC probe) speak plain text: a second server carries the health service
        # alone, so the worker-facing port can require mutual TLS.
        self.health_server: grpc.Server | None = None
        self.health_port: int | None = None
        if cfg.health_port >= 0:
            self.health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            host = cfg.listen.rsplit(":", 1)[0]
            self.health_port = self.health_server.add_insecure_port(f"{host}:{cfg.health_port}")
        self._loop = threading.Thread(target=self.driver.run, name="round-loop", daemon=True)
        self.progress = ProgressReporter(self.driver, cfg.progress)

    @property
    def address(self) -> str:
        host = self.cfg.listen.rsplit(":", 1)[0]
        return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{self.port}"

    def start(self) -> Coordinator:
        if self.cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(self.cfg.metrics_port)
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._loop.start()
        self.progress.start()
        if self.cfg.ready_file:
            ready = {"address": self.address, "metrics_port": self.metrics_port, "health_port": self.health_port, "pid": os.getpid()}
            atomic_write_json(self.cfg.ready_file, ready)
        log.info(
            "coordinator serving on %s (metrics on :%s), %s on %s for %d rounds",
            self.address,
            self.metrics_port,
            self.cfg.strategy,
            self.cfg.model,
            self.cfg.rounds,
        )
        return self

    def wait_done(self, timeout: float | None = None) -> bool:
        self._loop.join(timeout)
        return not self._loop.is_alive()

    def stop(self, grace: float = 2.0) -> None:
        self.progress.stop()
        self.health.enter_graceful_shutdown()
        self.driver.stop()
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        self._loop.join(timeout=10)


def settle_heap() -> None:
    """Collect once, then keep every object alive after start-up (modules, the model, the servers) out of
    the cyclic collector's scans (`gc.freeze`). Otherwise each full collection walks them all while every
    thread waits: with the tiny model and 200 workers, one collection paused the coordinator for 178 ms in
    the middle of a round (bench/rounds_scale.py), and the health checks with it."""
    gc.collect()
    gc.freeze()


def serve(cfg: CoordinatorConfig) -> int:
    """Run until SIGTERM/SIGINT (or, with exit_when_done, until the last round is checkpointed)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    coordinator = Coordinator(cfg).start()
    settle_heap()
    while not stop.is_set():
        if cfg.exit_when_done and coordinator.wait_done(timeout=0.2):
            stop.wait(1.0)  # let the workers' pending long polls see "done"
            break
        stop.wait(0.2)
    log.info("shutting down")
    coordinator.stop()
    return 0
