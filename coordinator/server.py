"""The coordinator process: gRPC server (with health checks), metrics endpoint, round loop, clean shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.config import CoordinatorConfig
from coordinator.evaluation import check_evaluation_data
from coordinator.metrics import Metrics
from coordinator.progress import ProgressReporter
from coordinator.registry import WorkerRegistry
from coordinator.rounds import RoundDriver
from coordinator.security import Authenticator, server_credentials
from coordinator.servicer import CoordinatorServicer, register
from fedcore import settings
from fedcore.atomic import FolderInUse, atomic_write_json, lock_folder, writable_folder
from fedcore.errors import CannotListen, ExistingRun
from fedcore.federation import checkpoint
from fedcore.federation.engine import Federation, FederationConfig
from fedcore.federation.roundlog import ROUNDS_LOG, truncate_log
from fedcore.payload.pretrained import initial_weights
from fedcore.wire.bounds import MAX_LABEL
from fedcore.wire.stream import MAX_MESSAGE_BYTES, request_limit
from service.ports import check_distinct, check_free, split_address

log = logging.getLogger("feddiff.coordinator")
T = TypeVar("T")

SERVICE_NAME = "feddiff.v1.Coordinator"
STREAM_WINDOW = 64 << 10  # bytes: HTTP/2's default stream window
# gRPC turns SO_REUSEPORT on by default: a second coordinator on the same address would start and the kernel
# would share the connections out between the two runs. Off, the second one's bind fails.
SERVER_PORT_OPTIONS = [("grpc.so_reuseport", 0)]
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # A fixed receive window per stream instead of BDP-grown ones (with BDP, 32 uploads waiting for a slot
    # were buffered whole: 31x the update size; bench/coordinator_memory.py), and a small one: what a stream
    # holds before the servicer reads it. A stream that is read gets a window for the whole message it waits
    # for, so an upload moves one chunk (--chunk-size) plus this window per round trip; every other one (a
    # stream waiting for a slot, a stream about to be refused) holds this window at most. 300 streams waiting
    # for a slot, each trying to send a 576 KB update, raised the coordinator's RSS by 180 MiB with a 2 MiB
    # window, 84 MiB with 256 KiB, 27 MiB with 64 KiB. tests/reliability/test_hostile_uploads.py: 300
    # uploads opened at once by one worker, 12 to 19 MiB; then one by each of 299 more, 23 to 33 MiB.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", STREAM_WINDOW),
    *SERVER_PORT_OPTIONS,
]
# The health-only port answers HealthCheckRequest{service}: a service name (ours are "" and SERVICE_NAME; a
# probe names one of them) of at most MAX_LABEL characters, 4 UTF-8 bytes each, and 3 bytes of framing. A
# request announced larger is refused on its length prefix, before anything of it is buffered; without the
# limit, 100 probe calls each announcing a 4 MiB request and never finishing it held 400 MiB.
PROBE_MESSAGE_BYTES = 3 + 4 * MAX_LABEL
PROBE_STREAMS_PER_CONNECTION = 4  # a probe makes one call per connection
PROBE_CALLS = 64  # at once on the health port; more are refused (RESOURCE_EXHAUSTED)
# Every connection to the health port is closed after about a minute (a GOAWAY, then 5 s for its calls): a
# caller that opens calls and never finishes them holds them that long, not for ever. Probes (kubelet's, or
# `feddiff health`) make a call or two per connection and never meet it.
PROBE_CONNECTION_AGE_MS = 60_000
PROBE_OPTIONS = [
    ("grpc.max_receive_message_length", PROBE_MESSAGE_BYTES),
    ("grpc.max_concurrent_streams", PROBE_STREAMS_PER_CONNECTION),
    ("grpc.max_connection_age_ms", PROBE_CONNECTION_AGE_MS),
    ("grpc.max_connection_age_grace_ms", 5_000),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", STREAM_WINDOW),
    *SERVER_PORT_OPTIONS,
]


def server_options(cfg: CoordinatorConfig) -> list[tuple[str, object]]:
    """The worker-facing server's channel options: GRPC_OPTIONS, the largest request this run needs (a request
    announced larger is refused on its length prefix, before gRPC buffers any of it), and the per-connection
    stream bound. What its calls hold in all is at most max_concurrent_rpcs times that request."""
    return [
        *GRPC_OPTIONS,
        ("grpc.max_receive_message_length", request_limit(cfg.chunk_size, grids=cfg.share_samples)),
        ("grpc.max_concurrent_streams", cfg.max_streams_per_connection),
    ]


def check_ports(cfg: CoordinatorConfig) -> None:
    """CannotListen, before anything is built, when a port this coordinator is to listen on is taken."""
    host, port = split_address(cfg.listen)
    check_distinct({"--listen": port, "--health-port": cfg.health_port, "--metrics-port": cfg.metrics_port})
    check_free("--listen", host, port, default=settings.is_default(cfg, "listen"))
    check_free("--health-port", host, cfg.health_port)  # off by default
    check_free("--metrics-port", "0.0.0.0", cfg.metrics_port, default=settings.is_default(cfg, "metrics_port"))


def add_port(server: grpc.aio.Server, flag: str, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Listen on `address` (TLS with `credentials`); the bound port. CannotListen, naming `flag`, when the
    address is taken since `check_ports` (gRPC's core then logs a line of its own) or cannot be bound."""
    try:
        return server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        host, port = split_address(address)
        check_free(flag, host, port)  # says why: in use, or another reason
        raise CannotListen(f"{flag} {address}: cannot listen there") from None


def build_federation(cfg: CoordinatorConfig) -> Federation:
    """A fresh federation (its global model seeded, or read from --init-from), or the one in checkpoint_dir
    with --resume (or --resume-or-start); it only reads. ValueError when --init-from is not a model of the
    preset, or when there is no run to resume (`check_resumable`); ExistingRun when checkpoint_dir holds a run
    and neither was given."""
    federation = Federation.restore(cfg.federation, cfg.checkpoint_dir, robust=cfg.robust) if cfg.resuming else None
    if federation is not None:
        log.info("resuming after round %d from %s", federation.completed_rounds, cfg.checkpoint_dir)
        if cfg.init_from:
            log.info("--init-from %s: not used, the run goes on from its checkpoint", cfg.init_from)
        _log_changes(federation.settings, cfg.resumable())
        federation.settings = cfg.resumable()
        return federation
    found = checkpoint.run_in(cfg.checkpoint_dir)
    if found and not cfg.resuming:
        raise ExistingRun(_shown_dir(cfg), found, "--checkpoint-dir")
    if cfg.resuming:
        check_resumable(cfg, found)
    if not cfg.init_from:
        return Federation(cfg.federation, robust=cfg.robust, settings=cfg.resumable())
    initial = initial_weights(cfg.init_from, cfg.model)
    log.info("global model of round 1: %s", cfg.init_from)
    return Federation(cfg.federation, global_state=initial, robust=cfg.robust, settings=cfg.resumable())


def check_resumable(cfg: CoordinatorConfig, found: str | None) -> None:
    """With --resume (or --resume-or-start) and no checkpoint in checkpoint_dir: go on only with a run that
    began there and committed no round yet (its run id saved, killed before its first checkpoint: it starts
    again from round 1), or with --resume-or-start in a folder that holds nothing of a run (a new run starts).
    ValueError, in one line naming the folder, for anything else: --resume with nothing to resume (a missing or
    empty folder), or files of a run (`found`) that no checkpoint commits, which a new run would write over."""
    directory = Path(cfg.checkpoint_dir)
    strict = not cfg.resume_or_start  # --resume alone
    flag = "--resume" if strict else "--resume-or-start"
    try:
        begun = checkpoint.load_run_id(directory)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    if begun is not None:
        log.warning("%s: run %s in %s committed no round before it stopped: it starts again from round 1", flag, begun, directory)
        return
    if found:
        raise ValueError(
            f"{flag}: --checkpoint-dir {_shown_dir(cfg)} holds no checkpoint to resume (no {checkpoint.STATE_FILE}), only files of a run "
            f"({found}): move them away, or give another --checkpoint-dir for a new run; nothing in it was changed"
        )
    if not strict:
        log.info("--resume-or-start: no run in %s, starting a new one", directory)
        return
    where = "does not exist" if not directory.exists() else f"holds no checkpoint (no {checkpoint.STATE_FILE})"
    raise ValueError(
        f"--resume: --checkpoint-dir {_shown_dir(cfg)} {where}: there is nothing to resume; drop --resume to start a new run there"
        + ("" if not directory.exists() else "; nothing in it was changed")
    )


def _shown_dir(cfg: CoordinatorConfig) -> str:
    """checkpoint_dir as messages name it: "(the default)" when the user never gave it."""
    return f"{cfg.checkpoint_dir}{' (the default)' if settings.is_default(cfg, 'checkpoint_dir') else ''}"


# The settings a resume takes from the run's checkpoint when they are not given: those that define the run
# (FederationConfig.DEFINING, compression's block inside its name) and the rounds it was to run.
_SAVED_WHEN_NOT_GIVEN = (*FederationConfig.DEFINING, "rounds")


def with_saved_settings(cfg: CoordinatorConfig) -> CoordinatorConfig:
    """With --resume (or --resume-or-start) and a checkpoint in checkpoint_dir: `cfg` with each setting that
    defines the run, and `rounds`, taken from the checkpoint where this start does not give it (flag or
    settings file), so that resuming needs only --resume; those given are compared with the saved ones by
    `Federation.restore`. Else `cfg` as it is. ValueError when the checkpoint's state is not one."""
    if not cfg.resuming:
        return cfg
    state = checkpoint.load_state(cfg.checkpoint_dir)
    if state is None:
        return cfg
    saved = {key: getattr(state.config, key) for key in _SAVED_WHEN_NOT_GIVEN}
    taken = {key: value for key, value in saved.items() if settings.is_default(cfg, key) and getattr(cfg, key) != value}
    if "compression" in taken and settings.is_default(cfg, "compression_block"):
        taken["compression_block"] = 0  # the saved name holds its block
    if not taken:
        return cfg
    log.info("--resume: from the run's checkpoint, not given: %s", ", ".join(f"{key} {value!r}" for key, value in taken.items()))
    return settings.replace(cfg, **taken)


def _log_changes(saved: checkpoint.ResumableSettings, given: checkpoint.ResumableSettings) -> None:
    """Log each setting a resume changes, with its saved and its new value (a checkpoint older than the saved
    settings has none to compare)."""
    changed = [f"{key} {before!r} -> {after!r}" for key, before, after in saved.changed(given)]
    if changed:
        log.info("--resume: settings changed since the run's last checkpoint: %s", ", ".join(changed))


def run_of(cfg: CoordinatorConfig) -> tuple[str, bool]:
    """The run's id, and whether it is new (to be saved by `save_run`): with --resume the one saved in the
    checkpoint dir, else a new one. A run resumed from a checkpoint that predates run ids gets one now."""
    try:
        run_id = checkpoint.load_run_id(cfg.checkpoint_dir) if cfg.resuming else None
    except ValueError as e:
        raise ValueError(f"--resume: {e}") from None
    if run_id is not None:
        log.info("run %s, resumed", run_id)
        return run_id, False
    run_id = checkpoint.new_run_id()
    log.info("run %s%s", run_id, " (the checkpoint had no run id)" if cfg.resuming and checkpoint.run_in(cfg.checkpoint_dir) else "")
    return run_id, True


def save_run(cfg: CoordinatorConfig, run_id: str) -> None:
    """Save a new run's id in the checkpoint dir, before any worker can hear of it."""
    try:
        checkpoint.save_run_id(cfg.checkpoint_dir, run_id)
    except OSError as e:
        raise ValueError(f"--checkpoint-dir {cfg.checkpoint_dir!r}: cannot save the run id in {checkpoint.RUN_FILE}: {e.strerror or e}") from None


class Coordinator:
    """A running coordinator; `start` returns once it serves, `stop` shuts it down cleanly.

    The gRPC servers (the worker-facing one and the health-only one) are asyncio servers on one event loop
    in a thread of their own: a waiting worker costs a coroutine, not a thread. The round loop runs in
    another thread."""

    def __init__(self, cfg: CoordinatorConfig, metrics: Metrics | None = None):
        auth = Authenticator(cfg)  # its files read and checked before anything is logged or created
        cfg = self.cfg = with_saved_settings(cfg)
        check_ports(cfg)
        check_evaluation_data(cfg)
        # Read before anything is written: a refused start (a run in the way, an --init-from that is no model)
        # leaves the folder as it was. Another coordinator that holds the folder is refused at its lock below.
        federation = build_federation(cfg)
        try:
            writable_folder(cfg.checkpoint_dir)
            self._lock_fd = lock_folder(cfg.checkpoint_dir)  # one coordinator per run: two would write one run's files
        except FolderInUse as e:
            raise ValueError(f"--checkpoint-dir {cfg.checkpoint_dir!r} is in use by another coordinator (pid {e.holder}): each run needs its own") from None
        except OSError as e:
            raise ValueError(f"--checkpoint-dir {cfg.checkpoint_dir!r} cannot be used: {e.strerror or e}") from None
        try:
            if federation.completed_rounds:  # lines of rounds never committed go (a crash between log and state)
                truncate_log(Path(cfg.checkpoint_dir) / ROUNDS_LOG, federation.completed_rounds)
            self.run_id, self._new_run = run_of(cfg)  # saved once the start can no longer be refused (`start`)
            self.federation = federation
            self.metrics = metrics or Metrics()
            self.registry = WorkerRegistry(cfg.heartbeat_timeout, cfg.departed_retention)
            self.driver = RoundDriver(cfg, self.federation, self.registry, self.metrics)
            self.auth = auth
            auth.warn_of_gaps()
            self.health = health.aio.HealthServicer()  # served on both ports
            self.port: int | None = None
            self.metrics_port: int | None = None
            self.health_port: int | None = None
            self._event_loop = asyncio.new_event_loop()
            self._grpc_thread = threading.Thread(target=self._event_loop.run_forever, name="grpc-loop", daemon=True)
            self._servers: list[grpc.aio.Server] = []
            self._servicer: CoordinatorServicer | None = None
            self._loop = threading.Thread(target=self.driver.run, name="round-loop", daemon=True)
            self.progress = ProgressReporter(self.driver, cfg.progress)
            self.unsaved: str | None = None  # what `stop` could not write to the checkpoint dir, in words
        except BaseException:
            self.release()  # nothing started: the checkpoint dir is free again
            raise

    @property
    def address(self) -> str:
        host = self.cfg.listen.rsplit(":", 1)[0]
        return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{self.port}"

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._event_loop).result()

    async def _serve(self) -> None:
        """Create and start the servers on the event loop (grpc.aio objects belong to the loop they are made on)."""
        server = grpc.aio.server(options=server_options(self.cfg), maximum_concurrent_rpcs=self.cfg.max_concurrent_rpcs)
        self._servers.append(server)
        self._servicer = CoordinatorServicer(self.cfg, self.driver, self.registry, self.metrics, self.auth, run_id=self.run_id)
        register(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = add_port(server, "--listen", self.cfg.listen, server_credentials(self.cfg))
        # Probes (kubelet's native gRPC probe) speak plain text: a second server carries the health service
        # alone, so the worker-facing port can require mutual TLS.
        if self.cfg.health_port >= 0:
            probes = grpc.aio.server(options=PROBE_OPTIONS, maximum_concurrent_rpcs=PROBE_CALLS)
            self._servers.append(probes)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, probes)
            host = self.cfg.listen.rsplit(":", 1)[0]
            self.health_port = add_port(probes, "--health-port", f"{host}:{self.cfg.health_port}")
        for s in self._servers:
            await s.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def _stop_servers(self, grace: float) -> None:
        await asyncio.gather(*(s.stop(grace) for s in self._servers))

    def start(self) -> Coordinator:
        self._grpc_thread.start()
        try:
            if self._new_run:
                save_run(self.cfg, self.run_id)
            self._on_loop(self._serve())
            if self.cfg.metrics_port >= 0:
                self.metrics_port = self.metrics.serve(self.cfg.metrics_port)
        except BaseException:
            self._on_loop(self._stop_servers(0))
            self._close_loop()
            if self._new_run:  # a refused start leaves the folder as it was
                (Path(self.cfg.checkpoint_dir) / checkpoint.RUN_FILE).unlink(missing_ok=True)
            self.release()
            raise
        # What exists now (torch, the model, the servers) lives as long as the run: out of the collector's
        # sight, a full collection scans only what the run allocates since, not ~100 ms of that heap, which
        # held the event loop (and a health check) each time (the gc.freeze advice for long-running servers).
        gc.collect()  # garbage of the start is freed first, not frozen with the rest
        gc.freeze()
        self._loop.start()
        self.progress.start()
        if self.cfg.ready_file:
            ready = {"address": self.address, "metrics_port": self.metrics_port, "health_port": self.health_port, "pid": os.getpid()}
            atomic_write_json(self.cfg.ready_file, ready)
        log.info(
            "coordinator serving on %s (%s), %s on %s for %d rounds",
            self.address,
            "metrics off" if self.metrics_port is None else f"metrics on :{self.metrics_port}",
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
        if self._grpc_thread.is_alive():
            self._on_loop(self.health.enter_graceful_shutdown())
        self.driver.stop()
        if self._grpc_thread.is_alive():
            self._on_loop(self._stop_servers(grace))
            self._close_loop()
        self._loop.join(timeout=10)
        self.unsaved = self.driver.checkpoints.close()
        if self.unsaved and not self.driver.failure:  # a run that failed for it has said so
            log.error(self.unsaved)
        self.release()

    def release(self) -> None:
        """Let another coordinator take the checkpoint dir (the process's end does it too)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _close_loop(self) -> None:
        if self._servicer is not None:
            self._servicer.close()
        self._event_loop.call_soon_threadsafe(self._event_loop.stop)
        self._grpc_thread.join(timeout=10)
        self._event_loop.close()


def settle_heap() -> None:
    """Collect once, then keep every object alive after start-up (modules, the model, the servers) out of
    the cyclic collector's scans (`gc.freeze`). Otherwise each full collection walks them all while every
    thread waits: with the tiny model and 200 workers, one collection paused the coordinator for 178 ms in
    the middle of a round (bench/rounds_scale.py), and the health checks with it."""
    gc.collect()
    gc.freeze()


def serve(cfg: CoordinatorConfig) -> int:
    """Run until SIGTERM/SIGINT (or, with exit_when_done, until the last round is checkpointed or the run
    failed); the exit status is 1 when the run failed or stopped with something it could not write."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    coordinator = Coordinator(cfg).start()
    settle_heap()
    while not stop.is_set():
        if cfg.exit_when_done and coordinator.wait_done(timeout=0.2):
            stop.wait(1.0)  # let the workers' pending long polls see "done"
            if coordinator.driver.failure:  # and those backing off after a refusal hear that the run failed
                coordinator.driver.wait_workers_told(stop, cfg.heartbeat_timeout)
            break
        stop.wait(0.2)
    log.info("shutting down")
    coordinator.stop()
    return 1 if coordinator.driver.failure or coordinator.unsaved else 0
