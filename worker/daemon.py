"""The worker daemon: join, wait for tasks, download, train, upload; reconnect with backoff; stop on SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

import grpc
import torch

from fedcore import settings
from fedcore.atomic import atomic_write_json
from fedcore.data.datasets import ImageDataset, load_image_folder, to_model_range
from fedcore.data.shards import client_shard
from fedcore.errors import DataMismatch, MissingPrivateState, ModelUnavailable, OutOfMemory, TaskRefused, rejected_outcome
from fedcore.evaluation.extractors import FeatureExtractor, load_extractor
from fedcore.evaluation.fid import GeneratorScore, ReferenceStats, fashion_mnist_reference, score_generator
from fedcore.evaluation.images import png_within, save_grid
from fedcore.federation.client import ClientRuntime, EvalTask, TrainTask
from fedcore.federation.engine import Direction, payload_bytes_by_part, transfer_ledger
from fedcore.model.diffusion import Schedule
from fedcore.model.parts import Part, PartLayout
from fedcore.model.ranks import Ranks
from fedcore.model.training import LocalTrainer, TrainingInterrupted, TrainResult, resolve_device
from fedcore.model.unet import build_model, preset
from fedcore.payload import coded
from fedcore.payload.serialization import max_payload_bytes
from fedcore.wire.bounds import MAX_GRID_BYTES
from fedcore.wire.convert import any_task_from_proto
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from worker.config import WorkerConfig
from worker.metrics import Metrics
from worker.progress import TrainingProgress
from worker.rpc import CoordinatorClient, open_channel, worker_info
from worker.state_dir import StateDir
from worker.status import Action, Call, Reaction, reaction
from worker.team import Team

log = logging.getLogger("feddiff.worker")


def load_local_data(cfg: WorkerConfig) -> ImageDataset:
    if cfg.data_dir:
        return load_image_folder(cfg.data_dir, cfg.image_size, cfg.channels)
    return client_shard(cfg.data, cfg.client_index)


class SessionOver(Exception):
    """A call failed and ended the session, counted and logged where it failed (`WorkerDaemon._react`): the
    worker connects and joins again after the backoff."""


class Backoff:
    """The worker's one wait policy after anything that did not go as asked: a connection lost or refused, a
    join refused, a task it refused or could not load. `backoff_initial` first, doubled after each further
    failure up to `backoff_max`, and from the start again once a task ran and its result was taken."""

    def __init__(self, initial: float, most: float):
        self.initial, self.most = initial, most
        self.delay = initial  # the next wait

    def next(self) -> float:
        """The wait due now; the one after it is twice as long, up to the cap."""
        delay, self.delay = self.delay, min(self.delay * 2, self.most)
        return delay

    def reset(self) -> None:
        self.delay = self.initial


class WorkerDaemon:
    """The worker's session with the coordinator; with several ranks (`team`), rank 0's: it alone talks to the
    coordinator, keeps the state dir, serves the metrics and shows the progress, and the other ranks train
    each task with it (`worker.team`)."""

    def __init__(self, cfg: WorkerConfig, metrics: Metrics | None = None, team: Team | None = None):
        self.cfg = cfg
        self.team = team
        self.metrics = metrics or Metrics()
        default = settings.is_default(cfg, "state_dir")
        self.state = StateDir.open(cfg.state_dir, cfg.worker_id, self.metrics, default=default)  # locked by this process
        self.state_dir = self.state.path
        self.worker_id = self.state.identity.worker_id
        self.stop_event = threading.Event()
        self.images = load_local_data(cfg)
        found = self.state.load_private()
        self.private_tensors = found[0] if found else None
        if found:
            log.info("worker %s: private parts of round %d restored from %s", self.worker_id, found[1], self.state_dir)
        kept = self.state.load_residuals()
        self.residuals = kept[0] if kept else None  # error feedback of a lossy compression, from the last run
        if kept:
            log.info("worker %s: error-feedback residuals of round %d restored from %s", self.worker_id, kept[1], self.state_dir)
        self.runtime: ClientRuntime | None = None
        self.progress = TrainingProgress(self.worker_id, cfg.progress)
        self.rounds_done = 0
        self.unfit: DataMismatch | ModelUnavailable | None = None  # why this worker cannot train the federation's model
        self.failure = ""  # why the coordinator stopped the run, once it says so
        self.backoff = Backoff(cfg.backoff_initial, cfg.backoff_max)
        self._quality: tuple[FeatureExtractor, ReferenceStats] | None = None  # loaded on the first evaluate task
        self._client: CoordinatorClient | None = None  # the connection's client, while connected

    # --- lifecycle ------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop at the next step of training, or at once when waiting (a long poll in progress is cancelled):
        the session is left and `run` returns. Safe to call from a signal handler."""
        self.stop_event.set()
        client = self._client
        if client is not None:
            client.cancel_wait()

    def run(self) -> int:
        """Serve tasks until the federation is done (0), or until stopped (0), or until the coordinator says the
        run failed (1); reconnect on failures."""
        self._announce()
        while not self.stop_event.is_set():
            exit_code = self._connection()
            if exit_code is not None:
                return exit_code
        log.info("worker %s: stopped", self.worker_id)
        return self._exit_code()

    def _announce(self) -> None:
        """Serve the metrics (when asked to) and write the ready file: worker id, metrics port and pid."""
        port = self.metrics.serve(self.cfg.metrics_port) if self.cfg.metrics_port >= 0 else None
        if port is not None:
            log.info("worker %s: metrics on :%d", self.worker_id, port)
        if self.cfg.ready_file:
            ready: dict[str, object] = {"worker_id": self.worker_id, "metrics_port": port, "pid": os.getpid()}
            if self.team is not None:  # every rank's process, by rank (the first is this one)
                ready["rank_pids"] = self.team.pids()
            atomic_write_json(self.cfg.ready_file, ready)

    def _connection(self) -> int | None:
        """One connection to the coordinator and a session over it: the exit code when the worker is through,
        None to connect again (after the backoff when the session failed)."""
        channel = open_channel(self.cfg)
        client = CoordinatorClient(channel, self._metadata(), upload_rate_limit=self.cfg.upload_rate_limit, download_rate_limit=self.cfg.download_rate_limit)
        self._client = client
        try:
            return self._through(self._session(client))
        except TrainingInterrupted:  # asked to stop, here or (with several ranks) on another rank: all stop
            log.info("worker %s: training interrupted", self.worker_id)
            self.stop()
        except MissingPrivateState as e:  # the coordinator hears of it at the join: its task then carries the whole model
            self._forget_private_state(e)
        except SessionOver:  # counted and logged where its call failed (`_react`)
            self._back_off()
        except grpc.RpcError as e:  # a long poll, a download or a report failed: the session is over
            self._react("session", e)
            self._back_off()
        finally:
            self._client = None
            self._hang_up(client, channel)
        return None

    def _through(self, done: bool) -> int | None:
        """After a session that ended without a failure: the exit code when the worker is through (1 when the
        coordinator stopped the run), None to stay."""
        if self.failure:
            log.error("worker %s: the coordinator stopped the run: %s", self.worker_id, self.failure)
            self._exit_code()  # a last try at saving private parts whose save failed
            return 1
        if done and self.cfg.exit_when_done:
            log.info("worker %s: federation done after %d rounds here", self.worker_id, self.rounds_done)
            return self._exit_code()
        return None

    def _forget_private_state(self, e: MissingPrivateState) -> None:
        """Join again, after the backoff, as a worker without private parts."""
        self._set_private_tensors(None)
        log.error("worker %s: %s; rejoining without private state in %.1fs", self.worker_id, e, self.backoff.delay)
        self._back_off()

    def _hang_up(self, client: CoordinatorClient, channel: grpc.Channel) -> None:
        """Close the connection; when stopping, leave the session first (so no round waits for this worker)."""
        if self.stop_event.is_set() and client.session_id:
            with contextlib.suppress(grpc.RpcError):
                client.leave()
        channel.close()

    def _react(self, call: Call, error: grpc.RpcError, task_id: str = "") -> Reaction:
        """What the status table (worker/status.py) says to do after `call` failed with `error`: its outcome
        counted and its line logged here; the caller acts on it."""
        r = reaction(call, error)
        if r.outcome:
            (self.metrics.joins if call == "join" else self.metrics.updates).labels(r.outcome).inc()
        log.log(r.level, "worker %s: %s", self.worker_id, r.line(error, task_id, self.backoff.delay))
        return r

    def _back_off(self) -> None:
        """Wait as the backoff policy says (less when stopped meanwhile)."""
        self.stop_event.wait(self.backoff.next())

    def _exit_code(self) -> int:
        """0, or 1 when private parts whose save failed cannot be saved even now: they end with the process."""
        if self.state.retry():
            return 0
        unsaved = self.state.unsaved
        assert unsaved is not None
        log.error(
            "worker %s: exiting with the private parts of round %d unsaved: %s holds those of an earlier round",
            self.worker_id,
            unsaved.completed_rounds,
            self.state_dir,
        )
        return 1

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self.cfg.token_file:
            token = Path(self.cfg.token_file).read_text().strip()
            return (("authorization", f"Bearer {token}"),)
        return ()

    # --- one session ----------------------------------------------------------------------------------------
    def _session(self, client: CoordinatorClient) -> bool:
        """Join and serve tasks until done (True) or stopped (False); RpcError on connection trouble."""
        joined = self._join(client)
        session_over = threading.Event()
        threading.Thread(target=self._heartbeats, args=(client, session_over), daemon=True).start()
        try:
            log.info("worker %s: joined %s (%s, %s, %d rounds)", self.worker_id, self.cfg.coordinator, joined.strategy, joined.model, joined.rounds)
            while not self.stop_event.is_set():
                self.state.retry()  # private parts whose save failed, before the next task
                try:
                    resp = client.wait_task(self.cfg.wait_timeout, self.stop_event)
                except grpc.FutureCancelledError:  # stopped while waiting (`stop` cancels the poll)
                    break
                kind = resp.WhichOneof("outcome")
                if kind == "done":
                    self.failure = resp.done.error
                    if self.cfg.exit_when_done or self.failure:
                        return True
                    # --keep-running: stay joined and ask again now and then (a WaitTask after the last round
                    # answers at once, so asking in a loop would flood the coordinator)
                    self.stop_event.wait(self.cfg.wait_timeout)
                if kind == "task":
                    self._run_task(client, resp.task)
            return False
        finally:
            session_over.set()

    def _join(self, client: CoordinatorClient) -> pb.JoinResponse:
        """Join, declaring whether this worker holds private parts; once the coordinator has named its run, the
        state dir holds that run's parts alone (`StateDir.enter_run`), and a worker whose parts changed with it
        (moved aside, or back) joins again at once declaring what it now holds."""
        has_private = self._has_private()
        joined = self._join_once(client, has_private)
        if joined.run_id:  # empty from a coordinator that predates run ids: the parts are used as before
            self._enter_run(joined.run_id)
            if has_private != self._has_private():
                joined = self._join_once(client, self._has_private())
        if self.runtime is None or self.runtime.model_name != joined.model:
            try:
                self._build(joined.model)
            except (DataMismatch, ModelUnavailable) as e:  # stay joined: each task is refused, and the coordinator counts it
                self.runtime, self.unfit = None, e
                log.error("worker %s: %s", self.worker_id, e)
        return joined

    def _has_private(self) -> bool:
        return bool(self.runtime.private_tensors if self.runtime else self.private_tensors)

    def _join_once(self, client: CoordinatorClient, has_private: bool) -> pb.JoinResponse:
        device = str(self.runtime.trainer.speed.device if self.runtime else resolve_device(self.cfg.speed.device))
        identity = self.state.identity
        info = worker_info(self.worker_id, device, len(self.images), has_private, installation_id=identity.installation_id, instance_id=identity.instance_id)
        try:
            joined = client.join(info)
        except grpc.RpcError as e:
            self._react("join", e)
            raise SessionOver from e  # every failed join ends the session (worker/status.py)
        self.metrics.joins.labels("accepted").inc()
        return joined

    def _enter_run(self, run_id: str) -> None:
        """Hold the private parts of run `run_id` alone: those of another run are moved aside and dropped from
        memory, the run's own loaded (`StateDir.enter_run`). A run id that is no id, or a state dir whose files
        cannot be moved, ends the session before any task (joined again after the backoff, and tried again)."""
        try:
            changed = self.state.enter_run(run_id)
        except (OSError, ValueError) as e:
            log.error("worker %s: cannot keep the private parts of run %s apart in %s: %s", self.worker_id, run_id, self.state_dir, e)
            raise SessionOver from e
        if changed:
            found = self.state.load_private()
            self._set_private_tensors(found[0] if found else None)
            kept = self.state.load_residuals()  # the run's error feedback: none, or its own moved back
            self.residuals = kept[0] if kept else None
            if self.runtime is not None:
                self.runtime.residuals = {k: v.clone() for k, v in (self.residuals or {}).items()}
            if found:
                log.info("worker %s: private parts of round %d of run %s restored from %s", self.worker_id, found[1], run_id, self.state_dir)

    def _set_private_tensors(self, tensors: dict[str, torch.Tensor] | None) -> None:
        self.private_tensors = tensors
        if self.runtime is not None:
            self.runtime.private_tensors.clear()
            self.runtime.private_tensors.update({k: v.detach().cpu().clone() for k, v in (tensors or {}).items()})

    def _build(self, model_name: str) -> None:
        """Model and trainer (compiled on GPU): built once per process and reused every round."""
        mcfg = preset(model_name)
        model_takes = (mcfg.channels, mcfg.image_size, mcfg.image_size)
        if tuple(self.images.images.shape[1:]) != model_takes:
            raise DataMismatch(
                f"local images {tuple(self.images.images.shape[1:])} do not fit model {model_name!r}, which takes {model_takes} (channels, height, width)"
            )
        team = self.team
        ranks, stop_group = (team.ranks, team.stop_group) if team else (Ranks(), None)
        trainer = LocalTrainer(build_model(model_name), Schedule(), self.cfg.speed, ranks, stop_group)
        data = trainer.prepare_data(to_model_range(self.images.images))
        self.runtime = ClientRuntime(self.worker_id, model_name, trainer, data, self.private_tensors, self.residuals)
        with_ranks = f" with {team.ranks.world_size} ranks" if team else ""
        log.info("worker %s: %d local images on %s%s", self.worker_id, len(self.images), trainer.speed.device, with_ranks)

    def _heartbeats(self, client: CoordinatorClient, over: threading.Event) -> None:
        while not over.wait(client.heartbeat_interval):
            with contextlib.suppress(grpc.RpcError):
                client.heartbeat()

    # --- one task -------------------------------------------------------------------------------------------
    def _download(self, client: CoordinatorClient, layout: PartLayout, task: TrainTask | EvalTask) -> memoryview:
        """The task's weights, checked against their header; bounded by what its parts can take."""
        most = coded.max_download_bytes(layout, task.receives, task.codec) if isinstance(task, TrainTask) else max_payload_bytes(layout, task.receives)
        return client.download(task, max_bytes=most, on_wire=self.metrics.wire_bytes.labels("down").inc)

    def _run_task(self, client: CoordinatorClient, msg: pb.Task) -> None:
        """Run a task, or refuse it when this worker cannot (RejectTask) and wait before asking again."""
        try:
            task = self._runnable(msg)
            if isinstance(task, EvalTask):
                self._run_evaluation(client, task)
                refused = None
            else:
                refused = self._train(client, task)
        except TaskRefused as e:
            self._refuse(client, msg.task_id, e)
        except torch.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            self._refuse(client, msg.task_id, OutOfMemory(f"task {msg.task_id!r}: {str(e).splitlines()[0]}"))
        else:
            if refused is None:  # the task ran and its result was taken
                self.backoff.reset()
            elif refused is Action.BACK_OFF:  # the same task again at once would be refused the same way
                self._back_off()
            # an update that missed its round: the next task at once, the backoff left as it is (nothing was taken)

    def _runnable(self, msg: pb.Task) -> TrainTask | EvalTask:
        if self.runtime is None:
            raise self.unfit or DataMismatch("no model was built for the local images")
        return any_task_from_proto(msg)

    def _refuse(self, client: CoordinatorClient, task_id: str, error: TaskRefused) -> None:
        """Tell the coordinator this worker cannot run a task (counted as rejected_<reason>), then back off."""
        log.error("worker %s: refusing task %s (%s): %s; asking again in %.1fs", self.worker_id, task_id, error.reason, error, self.backoff.delay)
        self.metrics.updates.labels(rejected_outcome(error.reason)).inc()
        try:
            client.reject_task(task_id, error.reason, str(error))
        except grpc.RpcError as e:
            if self._react("reject_task", e, task_id).action is Action.REJOIN:
                raise SessionOver from e
        self._back_off()

    def _train(self, client: CoordinatorClient, task: TrainTask) -> Action | None:
        """Download, train and upload one task; None when the coordinator took the update, else what to do
        after its refusal (BACK_OFF, or NEXT_TASK for an update that missed its round). With several ranks, the
        others get the task and the loaded weights, and train it with this one."""
        runtime = self.runtime
        assert runtime is not None
        self._load(client, runtime, task)
        if self.team is not None:
            self.team.start_training(runtime.model_name, task, runtime.trainer.model)
        result = self._train_locally(runtime, task)
        payload = runtime.delta_payload(task)
        if runtime.residuals:  # kept across restarts, beside the private parts
            self.state.save_residuals(task.round_index + 1, runtime.residuals)
        report = pb.TrainReport(images_seen=result.images_seen, mean_loss=result.mean_loss, seconds=result.seconds)
        try:
            client.upload(task, payload, report, on_wire=self.metrics.wire_bytes.labels("up").inc)
        except grpc.RpcError as e:
            return self._upload_failed(task, e)
        self._delivered(runtime, task, payload, result)
        return None

    def _load(self, client: CoordinatorClient, runtime: ClientRuntime, task: TrainTask) -> None:
        """Download the task's weights, count them, and load them (MissingPrivateState when the private parts
        they count on are missing: `run` then rejoins as a worker without private state)."""
        payload = self._download(client, runtime.layout, task)
        self._count(runtime.layout, "down", task.receives, payload)
        runtime.load(payload, task)

    def _train_locally(self, runtime: ClientRuntime, task: TrainTask) -> TrainResult:
        """Train on the local images as the task says; the private parts saved (a failed save is retried)."""
        result = runtime.train(task, on_step=self.progress.step(task), should_stop=self.stop_event.is_set)
        self.progress.done(task, result)
        self.metrics.local_loss.set(result.mean_loss)
        self.metrics.train_images.inc(result.images_seen)
        self.metrics.train_images_per_second.set(result.images_per_second)
        if task.private_parts:  # the update goes up whether the save succeeds or not
            self.state.save_private(task.round_index + 1, runtime.private_tensors)
        return result

    def _upload_failed(self, task: TrainTask, error: grpc.RpcError) -> Action:
        """After an upload that failed: NEXT_TASK to go on at once (its round moved on), BACK_OFF to wait first
        (the update was refused); SessionOver when the session is over."""
        action = self._react("upload", error, task.task_id).action
        if action is Action.REJOIN:
            raise SessionOver from error
        return action

    def _delivered(self, runtime: ClientRuntime, task: TrainTask, payload: bytes, result: TrainResult) -> None:
        """An update the coordinator took: counted and logged."""
        self._count(runtime.layout, "up", task.returns, payload)
        self.metrics.updates.labels("accepted").inc()
        self.rounds_done += 1
        log.info(
            "worker %s: round %d: trained %d images at %.0f images/s, loss %.4f; sent %.2f MB",
            self.worker_id, task.round_index + 1, result.images_seen, result.images_per_second, result.mean_loss, len(payload) / 1e6,
        )  # fmt: skip

    def _run_evaluation(self, client: CoordinatorClient, task: EvalTask) -> None:
        """Score this worker's own model: shared parts as received, private parts its own. Only the number
        leaves the worker, unless the task asks for a sample grid (--share-samples on the coordinator)."""
        runtime = self.runtime
        assert runtime is not None
        runtime.load(self._download(client, runtime.layout, task), task)
        extractor, reference = self._quality_reference(runtime.trainer.speed.device)
        score = score_generator(runtime.sampling_model(), reference, extractor, task.spec, device=runtime.trainer.speed.device)
        grid = self._save_grid(task, score)
        self.metrics.fd.labels(self.worker_id).set(score.fd)
        client.report_evaluation(evaluation_report(task, score))
        log.info(
            "worker %s: own model after round %d: FD %.2f (%d %s samples); grid in %s",
            self.worker_id, task.completed_rounds, score.fd, task.spec.num_samples, task.spec.sampler, grid,
        )  # fmt: skip

    def _save_grid(self, task: EvalTask, score: GeneratorScore) -> str:
        """A grid of the samples in the state dir, or "no file" when it cannot be written (a full state dir:
        the score still goes back)."""
        grid = str(self.state_dir / "samples" / f"r{task.completed_rounds:04d}.png")
        try:
            save_grid(score.samples[:64], grid, nrow=8)
        except OSError as e:
            log.error("worker %s: cannot write the sample grid %s: %s", self.worker_id, grid, e)
            return "no file"
        return grid

    def _quality_reference(self, device: torch.device) -> tuple[FeatureExtractor, ReferenceStats]:
        """Features and real-image statistics for FD: the Fashion-MNIST test set, or this worker's own images."""
        if self._quality is None:
            extractor = load_extractor(self.cfg.inception_weights, device)
            if self.cfg.data_dir:
                reference = ReferenceStats.compute(extractor, to_model_range(self.images.images), f"local:{self.cfg.data_dir}")
            else:
                reference = fashion_mnist_reference(extractor, root=self.cfg.data.data_root)
            self._quality = (extractor, reference)
        return self._quality

    def _count(self, layout: PartLayout, direction: Direction, parts: frozenset[Part], payload: bytes | bytearray | memoryview) -> None:
        """A payload received or sent, counted as the coordinator counts it (`transfer_ledger`)."""
        self.metrics.count_transfer(direction, transfer_ledger(layout, direction, parts, payload_bytes_by_part(payload, layout)))


def evaluation_report(task: EvalTask, score: GeneratorScore) -> pb.EvaluationReport:
    """What an evaluate task sends back: the score, and the sample grid only when the task asks for it."""
    return pb.EvaluationReport(
        task_id=task.task_id,
        round=task.completed_rounds,
        frechet_distance=score.fd,
        feature_extractor=score.extractor,
        num_samples=task.spec.num_samples,
        sample_grid_png=png_within(score.samples, MAX_GRID_BYTES) if task.share_samples else b"",
    )
