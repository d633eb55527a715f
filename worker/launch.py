"""How a worker process starts: one process as before, or one rank of several (torchrun's RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or, with --nproc-per-node N, the launcher of N ranks on this host.

The launcher is torchrun's own engine (torch.distributed's elastic agent, as `torchrun --standalone` runs
it): it starts the ranks, forwards SIGTERM to them, and when one exits with an error or is ended by a signal
it stops the others at once and ends naming that rank. Rank 0 runs the worker daemon; the others follow it
(`follow`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

import torch

from fedcore import settings
from fedcore.data.datasets import to_model_range
from fedcore.evaluation.extractors import check_inception_weights
from fedcore.model.diffusion import Schedule
from fedcore.model.ranks import Ranks
from fedcore.model.training import LocalTrainer, SpeedConfig, TrainingInterrupted, resolve_device, threads_per_process
from fedcore.model.unet import build_model
from service.ports import check_free
from worker.config import WorkerConfig
from worker.daemon import WorkerDaemon, load_local_data
from worker.team import RanksLost, Team

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

log = logging.getLogger("feddiff.worker")


def run_worker(cfg: WorkerConfig) -> int:
    """The worker in this process: the whole worker, or the rank the environment names (torchrun's variables).
    Rank 0 runs the daemon; the exit code is rank 0's on every rank. SIGTERM or SIGINT stops the worker (exit
    code 0); a rank it stops leaves the team cleanly and then ends by that signal, so that its launcher (this
    worker's, or torchrun) sees which rank a signal ended and ends the others."""
    ranks = Ranks.from_env()
    if ranks.leader:
        check_free("--metrics-port", "0.0.0.0", cfg.metrics_port)  # before the images load: a taken port ends the start at once
        check_inception_weights(cfg.inception_weights)  # read now, not at the first evaluate task after rounds of training
    cfg = settings.replace(cfg, speed=rank_speed(cfg.speed, ranks))
    _set_threads(cfg.speed, ranks)
    if not ranks.distributed:
        return _lead(WorkerDaemon(cfg), _Signals())
    team = Team(ranks, resolve_device(cfg.speed.device), cfg.collective_timeout)
    signals = _Signals()
    try:
        exit_code = _lead(WorkerDaemon(cfg, team=team), signals) if ranks.leader else follow(cfg, team, signals.stop)
    finally:
        team.close()
        signals.restore()  # a rank through with its work may wait for its launcher, which can now end it at once
    if signals.received is not None:
        _end_by(signals.received)
    return exit_code


class _Signals:
    """SIGTERM and SIGINT as a stop (between training steps, or at once as the process waits), and which one
    came first."""

    STOPPING = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.received: signal.Signals | None = None
        self._actions: list[Callable[[], None]] = []
        for sig in self.STOPPING:
            signal.signal(sig, self._handle)

    def on_stop(self, action: Callable[[], None]) -> None:
        """Call `action` when a signal stops the process; at once if one already has."""
        self._actions.append(action)
        if self.stop.is_set():
            action()

    def _handle(self, signum: int, _frame: object) -> None:
        self.received = self.received or signal.Signals(signum)
        self.stop.set()
        for action in self._actions:
            action()

    def restore(self) -> None:
        """The signals' default actions again (each ends the process)."""
        for sig in self.STOPPING:
            signal.signal(sig, signal.SIG_DFL)


def _end_by(sig: signal.Signals) -> NoReturn:
    """End this rank by `sig`, its default action restored: its launcher reads the signal from its exit status
    (a rank spawned by torch's launcher would otherwise also wait, once its function returned, for a launcher
    that is shutting down to read its result)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # not reached: the signal ends the process first


def _lead(daemon: WorkerDaemon, signals: _Signals) -> int:
    """The daemon until it is through (stopped by `signals`); then, with several ranks, the others end with its
    exit code."""
    signals.on_stop(daemon.stop)
    exit_code = 1
    try:
        exit_code = daemon.run()
    except RanksLost as e:
        log.error("%s", e)
    finally:
        if daemon.team is not None:
            daemon.team.stop(exit_code)
    return exit_code


def rank_speed(speed: SpeedConfig, ranks: Ranks) -> SpeedConfig:
    """The speed settings of one rank: on CUDA, rank r of a host trains on cuda:r (LOCAL_RANK)."""
    if ranks.distributed and resolve_device(speed.device).type == "cuda":
        return dataclasses.replace(speed, device=f"cuda:{ranks.local_rank}")
    return speed


def _set_threads(speed: SpeedConfig, ranks: Ranks) -> None:
    """torch's threads in this process: --threads when given; else, for one of several ranks on this host, the
    host's threads shared out between them as simulate shares them between its processes (`threads_per_process`:
    N ranks each taking every core ran slower), unless OMP_NUM_THREADS gives each rank its own (torchrun's
    convention); else torch's default."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size))
    if speed.threads or (ranks.distributed and "OMP_NUM_THREADS" not in os.environ):
        torch.set_num_threads(threads_per_process(local_ranks, speed.threads))


# --- the ranks other than 0 ------------------------------------------------------------------------------------
def follow(cfg: WorkerConfig, team: Team, stopped: threading.Event) -> int:
    """A rank other than 0: train each task rank 0 sends, with the weights it broadcasts, until it says stop
    (its exit code). The shard is the worker's whole shard: each step trains this rank's share of the global
    batch (`Ranks.share`). Stopped (`stopped`), it stops training at the ranks' next step, together, and stops
    waiting for rank 0 at once."""
    images = load_local_data(cfg)
    trainer: LocalTrainer | None = None
    data, model_name = torch.empty(0), ""
    try:
        while (command := team.next_command(stopped)).kind == "train":
            if trainer is None or model_name != command.model:  # built once, as rank 0 builds its own
                trainer = LocalTrainer(build_model(command.model), Schedule(), cfg.speed, team.ranks, team.stop_group)
                data, model_name = trainer.prepare_data(to_model_range(images.images)), command.model
            team.ranks.broadcast_model(trainer.model)
            try:
                trainer.train(data, command.train, seed=command.seed, should_stop=stopped.is_set)
            except TrainingInterrupted:
                log.info("rank %d: training interrupted", team.ranks.rank)
    except RanksLost as e:
        log.error("%s", e)
        return 1
    if stopped.is_set():
        log.info("rank %d: stopped", team.ranks.rank)
    else:
        log.info("rank %d: stopped with rank 0 (exit code %d)", team.ranks.rank, command.exit_code)
    return command.exit_code


# --- the launcher ----------------------------------------------------------------------------------------------
def launch(cfg: WorkerConfig, rank_main: Callable[[WorkerConfig], int]) -> int:
    """Start cfg.ranks_per_node ranks of this worker on this host, each running `rank_main(cfg)` (a module-level
    function: the ranks are spawned), and wait for them: rank 0's exit code; 1 when a rank failed or a signal
    of its own ended it (the others stopped then, and one line names the rank and its error or signal); 0 when
    this process is stopped by a signal (forwarded to the ranks, which leave the session)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n = cfg.ranks_per_node
    if "LOCAL_RANK" in os.environ:
        raise ValueError(f"--nproc-per-node {cfg.nproc_per_node} under torchrun: leave it out, torchrun's own --nproc-per-node starts the ranks")
    check_free("--metrics-port", "0.0.0.0", cfg.metrics_port)  # before the ranks start: rank 0 would fail later
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # how each rank ended: one line of ours, below
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=n,
        run_id=f"feddiff-worker-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # torchrun --standalone: a store on a free port of this host
        max_restarts=0,  # a failed rank ends the worker; its supervisor (systemd, Kubernetes) restarts it
        monitor_interval=0.1,
        start_method="spawn",
    )
    log.info("worker: starting %d ranks", n)
    try:
        results = elastic_launch(config, rank_main)(settings.replace(cfg, nproc_per_node="1"))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        log.error("worker: rank %d of %d (pid %d) %s; the other ranks were stopped%s", rank, n, failure.pid, *_failure(failure))
        return 1
    except SignalException as e:
        log.info("worker: stopped by %s; the %d ranks were stopped", signal.Signals(e.sigval).name, n)
        return 0
    return int(results[0])


def _failure(failure: ProcessFailure) -> tuple[str, str]:
    """How a rank ended ("ended by signal SIGTERM", "ended with exit code 1") and, after an error, the first line of
    the error it raised (": RuntimeError: ...")."""
    if failure.exitcode < 0:
        return f"ended by signal {failure.signal_name()}", ""
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
    lines = str(message).strip().splitlines()
    return f"ended with exit code {failure.exitcode}", f": {lines[0]}" if lines else ""
