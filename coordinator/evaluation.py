"""Evaluation during a run: when it is due and how the models are sampled; the workers scoring their own
personalised models (udec, ulatdec) in an evaluate phase, or this coordinator scoring the global model (full,
usplit) in the background; and where the results go: the FD gauges, the round log and the sample grids in
checkpoint_dir/samples. The round driver runs the phase's tasks as it runs a round's
(coordinator/rounds.py, coordinator/phase.py)."""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.registry import WorkerRecord
from fedcore.data.datasets import fashion_mnist_files
from fedcore.errors import BadEvaluation, DatasetError, DuplicateUpdate, NotAssigned, WrongRound
from fedcore.evaluation.extractors import FeatureExtractor, check_inception_weights, load_extractor
from fedcore.evaluation.fid import ReferenceStats, curve_point_due, fashion_mnist_reference, score_generator
from fedcore.evaluation.images import save_grid
from fedcore.federation.client import EvalTask
from fedcore.federation.engine import Federation
from fedcore.federation.roundlog import EvaluationRecord, format_evaluation
from fedcore.federation.strategies import private_parts, shared_parts
from fedcore.model.diffusion import SamplingSpec
from fedcore.model.training import resolve_device
from fedcore.model.unet import build_model
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta
from fedcore.wire.bounds import MAX_GRID_BYTES
from fedcore.wire.stream import StreamHeader, digest_for

log = logging.getLogger("feddiff.coordinator")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class EvalReport:
    """A worker's evaluation of its own model, as it reported it."""

    worker_id: str
    task_id: str
    completed_rounds: int  # the round its report names: the rounds completed when its task was issued
    fd: float
    extractor: str
    num_samples: int


def check_report(task: EvalTask, report: EvalReport) -> None:
    """WrongRound for a report of another round than its task's; BadEvaluation for one its task cannot have
    produced (a Frechet distance that is not a finite number >= 0, another number of samples)."""
    if report.completed_rounds != task.completed_rounds:
        raise WrongRound(f"evaluation report is for round {report.completed_rounds}, task {task.task_id!r} belongs to round {task.completed_rounds}")
    if not math.isfinite(report.fd) or report.fd < 0:
        raise BadEvaluation(f"Frechet distance {report.fd!r} is not a finite number >= 0")
    if report.num_samples != task.spec.num_samples:
        raise BadEvaluation(f"evaluation report of {report.num_samples} samples; task {task.task_id!r} asked for {task.spec.num_samples}")


@dataclass
class EvalPhase:
    """One round of evaluate tasks: every worker samples from its own model and reports its FD."""

    completed_rounds: int
    tasks: dict[str, EvalTask]
    payload: bytes  # the shared parts of the global model, serialized once for all workers
    digests: Mapping[str, str]  # worker -> the digest algorithm its download's header carries
    reports: dict[str, EvalReport] = field(default_factory=dict)
    _headers: dict[str, StreamHeader] = field(default_factory=dict)

    def header(self, worker_id: str) -> StreamHeader:
        """The payload's header with the digest this worker checks, hashed once per algorithm."""
        algorithm = self.digests[worker_id]
        if algorithm not in self._headers:
            self._headers[algorithm] = StreamHeader.of(self.payload, algorithm)
        return self._headers[algorithm]

    @classmethod
    def create(cls, federation: Federation, digests: Mapping[str, str], spec: SamplingSpec, share_samples: bool) -> EvalPhase:
        """An evaluate task for each worker of `digests` (worker -> digest algorithm)."""
        strategy = federation.config.strategy
        parts = shared_parts(strategy)
        r = federation.completed_rounds
        meta = PayloadMeta(kind="weights", model=federation.config.model, wire_round=r, parts=parts)
        payload = serialization.encode({n: federation.global_state[n] for n in federation.layout.names(parts)}, meta)
        tasks = {
            w: EvalTask(completed_rounds=r, task_id=f"e{r}-{w}", receives=parts, private_parts=private_parts(strategy), spec=spec, share_samples=share_samples)
            for w in digests
        }
        return cls(r, tasks, payload, dict(digests))

    def report(self, report: EvalReport) -> None:
        """Take a worker's report: NotAssigned for a task not given to it, DuplicateUpdate for a second one,
        WrongRound or BadEvaluation for one that does not fit its task (`check_report`)."""
        task = self.tasks.get(report.worker_id)
        if task is None or task.task_id != report.task_id:
            raise NotAssigned(f"evaluate task {report.task_id!r} was not given to worker {report.worker_id!r}")
        if report.worker_id in self.reports:
            raise DuplicateUpdate(f"worker {report.worker_id!r} already reported its evaluation")
        check_report(task, report)
        self.reports[report.worker_id] = report

    def summary(self) -> EvaluationRecord:
        """What the workers reported: each one's FD, by worker id, and their mean and spread."""
        fds = [r.fd for r in self.reports.values()]
        return EvaluationRecord(
            round_number=self.completed_rounds,
            models="personalised",
            fd_by_model={w: r.fd for w, r in sorted(self.reports.items())},
            fd_mean=statistics.fmean(fds) if fds else float("nan"),
            fd_std=statistics.pstdev(fds) if len(fds) > 1 else 0.0,
            extractor=next(iter(self.reports.values())).extractor if fds else "",
            evaluated=len(fds),
            asked=len(self.tasks),
        )


class Evaluation:
    """The run's evaluation after its rounds: when it is due, who scores, and where the results go."""

    def __init__(self, cfg: CoordinatorConfig, federation: Federation, metrics: Metrics, append_log: Callable[[EvaluationRecord], None]):
        self.cfg = cfg
        self.federation = federation
        self.metrics = metrics
        self._append_log = append_log  # a line of the round log
        checkpoint_dir = Path(cfg.checkpoint_dir)
        self.samples_dir = checkpoint_dir / "samples"
        self.personalised = bool(private_parts(federation.config.strategy))  # the workers score their own models
        self.last_fd: dict[str, float] = {}  # latest Frechet distance per evaluated model
        self.global_evaluator = GlobalEvaluator(
            cfg.model, device=cfg.eval_device, data_root=cfg.eval_data_root or None, inception_weights=cfg.inception_weights, out_dir=checkpoint_dir
        )

    def due(self) -> bool:
        """Whether the rounds completed call for an evaluation: after the last, and on the FD curve's points."""
        if self.cfg.eval_samples <= 0:
            return False
        return self.federation.finished or curve_point_due(self.federation.completed_rounds, self.cfg.eval_every)

    def spec(self) -> SamplingSpec:
        """How each model is sampled: DDIM during training, the final sampler after the last round."""
        final = self.federation.finished and self.cfg.eval_final_sampler == "ddpm"
        return SamplingSpec(num_samples=self.cfg.eval_samples, sampler="ddpm" if final else "ddim", steps=self.cfg.eval_steps, seed=self.cfg.seed)

    def score_global(self) -> None:
        """Score the global model in the background; its result is recorded when it is ready."""
        self.global_evaluator.submit(self.federation.global_state, self.federation.completed_rounds, self.spec(), self.record)

    def phase(self, connected: Sequence[WorkerRecord]) -> EvalPhase | None:
        """Evaluate tasks for every connected worker that holds private parts, or None (logged) when none does."""
        scorers = [r for r in connected if r.worker_id in self.federation.contacted and r.info.has_private_state]
        if not scorers:
            log.warning("evaluation after round %d: no connected worker holds a personalised model", self.federation.completed_rounds)
            return None
        return EvalPhase.create(self.federation, {r.worker_id: digest_for(r.info.digests) for r in scorers}, self.spec(), self.cfg.share_samples)

    def phase_done(self, phase: EvalPhase) -> None:
        """Record what an evaluate phase's workers reported (nothing when none did)."""
        if phase.reports:
            self.record(phase.summary())

    def record(self, record: EvaluationRecord) -> None:
        """An evaluation's FDs in the gauges and in a line of the round log (`EvalPhase.summary`,
        `GlobalEvaluator.evaluate`)."""
        self.show(record.fd_by_model)
        try:
            self._append_log(record)
        except OSError as e:
            log.error("writing the evaluation to the round log failed: %s", e)
        log.info(format_evaluation(record))

    def show(self, fds: Mapping[str, float]) -> None:
        """Show the latest FD of each model (a resumed run's, from its round log)."""
        for model, fd in fds.items():
            self.metrics.fd.labels(model).set(fd)
            self.last_fd[model] = fd

    def save_shared_grid(self, worker_id: str, completed_rounds: int, png: bytes) -> None:
        """Write the sample grid a worker shared to samples/<worker>-r<rounds>.png; one that is not a PNG within
        the bound is ignored, and a failed write logged: the worker's score counts either way."""
        if not png.startswith(PNG_SIGNATURE) or len(png) > MAX_GRID_BYTES:
            log.warning("worker %s sent a sample grid that is not a PNG of at most %d bytes; ignored", worker_id, MAX_GRID_BYTES)
            return
        path = self.samples_dir / f"{worker_id}-r{completed_rounds:04d}.png"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
        except OSError as e:
            log.error("cannot write the sample grid of worker %s to %s: %s", worker_id, path, e)

    def wait(self) -> None:
        """Until the global model's scoring in the background, if any, has ended."""
        self.global_evaluator.wait()


def check_evaluation_data(cfg: CoordinatorConfig) -> None:
    """DatasetError, at start rather than after the training rounds, when this coordinator is to score the
    global model (full, usplit with --eval-samples) and the Fashion-MNIST test set is not where it looks;
    ValueError when --inception-weights is not the network's weights."""
    if not cfg.eval_samples or private_parts(cfg.federation.strategy):
        return
    try:
        fashion_mnist_files(train=False, root=cfg.eval_data_root or None, flag="--eval-data-root")
    except DatasetError as e:
        raise DatasetError(
            f"--eval-samples {cfg.eval_samples}: the global model is scored against the Fashion-MNIST test set (--eval-data-root): {e}"
        ) from None
    check_inception_weights(cfg.inception_weights)  # a file that is not the network's weights fails here, not after round 1


class GlobalEvaluator:
    """Samples the global model and measures its FD against the Fashion-MNIST test set, off the round loop."""

    def __init__(self, model_name: str, *, device: str, data_root: str | None, inception_weights: str, out_dir: Path):
        self.model_name = model_name
        self.device = resolve_device(device)
        self.data_root = data_root
        self.inception_weights = inception_weights
        self.out_dir = out_dir
        self._lock = threading.Lock()  # one evaluation at a time
        self._threads: list[threading.Thread] = []
        self._prepared: tuple[FeatureExtractor, ReferenceStats] | None = None  # loaded at the first evaluation

    def _prepare(self) -> tuple[FeatureExtractor, ReferenceStats]:
        if self._prepared is None:
            extractor = load_extractor(self.inception_weights, self.device)
            self._prepared = extractor, fashion_mnist_reference(extractor, root=self.data_root)
        return self._prepared

    def evaluate(self, state: dict[str, torch.Tensor], completed_rounds: int, spec: SamplingSpec) -> EvaluationRecord:
        """The global model's FD after `completed_rounds`, its sample grid saved to samples/global-r<rounds>.png."""
        with self._lock:
            extractor, reference = self._prepare()
            model = build_model(self.model_name)
            model.load_state_dict(state)
            model.to(self.device)
            score = score_generator(model, reference, extractor, spec, device=self.device)
            grid = save_grid(score.samples[:64], self.out_dir / "samples" / f"global-r{completed_rounds:04d}.png", nrow=8)
        log.info(
            "round %d: global model FD %.2f (%d %s samples, %s); samples in %s",
            completed_rounds,
            score.fd,
            spec.num_samples,
            spec.sampler,
            extractor.name,
            grid,
        )
        return EvaluationRecord(
            round_number=completed_rounds,
            models="global",
            fd_by_model={"global": score.fd},
            fd_mean=score.fd,
            fd_std=0.0,
            extractor=extractor.name,
            evaluated=1,
            asked=1,
        )

    def submit(self, state: dict[str, torch.Tensor], completed_rounds: int, spec: SamplingSpec, on_result: Callable[[EvaluationRecord], None]) -> None:
        snapshot = {k: v.clone() for k, v in state.items()}

        def run() -> None:
            try:
                on_result(self.evaluate(snapshot, completed_rounds, spec))
            except Exception:
                log.exception("evaluation of the global model after round %d failed", completed_rounds)

        t = threading.Thread(target=run, name=f"eval-r{completed_rounds}", daemon=True)
        self._threads.append(t)
        t.start()

    def wait(self) -> None:
        for t in self._threads:
            t.join()
        self._threads.clear()
