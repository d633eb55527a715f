"""Evaluation during a run: the workers score their own personalised models (udec, ulatdec), or the
coordinator scores the global model (full, usplit) in the background."""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from coordinator.config import CoordinatorConfig
from fedcore.data.datasets import DatasetError, fashion_mnist_files
from fedcore.errors import DuplicateUpdate, NotAssigned
from fedcore.evaluation.extractors import FeatureExtractor, load_fmnist_classifier, load_inception
from fedcore.evaluation.fid import ReferenceStats, fashion_mnist_reference, score_generator
from fedcore.evaluation.images import save_grid
from fedcore.federation.client import EvalTask
from fedcore.federation.server import Federation
from fedcore.federation.strategies import private_parts, shared_parts
from fedcore.model.diffusion import SamplingSpec
from fedcore.model.training import resolve_device
from fedcore.model.unet import build_model
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta
from fedcore.wire.stream import StreamHeader

log = logging.getLogger("feddiff.coordinator")


@dataclass(frozen=True)
class EvalReport:
    worker_id: str
    fd: float
    extractor: str
    num_samples: int


@dataclass
class EvalPhase:
    """One round of evaluate tasks: every worker samples from its own model and reports its FD."""

    completed_rounds: int
    tasks: dict[str, EvalTask]
    payload: bytes  # the shared parts of the global model, serialized once for all workers
    reports: dict[str, EvalReport] = field(default_factory=dict)
    _headers: dict[str, StreamHeader] = field(default_factory=dict)

    def header(self, algorithm: str) -> StreamHeader:
        """The payload's header with a digest of `algorithm`, hashed once per algorithm."""
        if algorithm not in self._headers:
            self._headers[algorithm] = StreamHeader.of(self.payload, algorithm)
        return self._headers[algorithm]

    @classmethod
    def create(cls, federation: Federation, workers: list[str], spec: SamplingSpec, share_samples: bool) -> EvalPhase:
        strategy = federation.config.strategy
        parts = shared_parts(strategy)
        r = federation.completed_rounds
        meta = PayloadMeta(kind="weights", model=federation.config.model, round=r, parts=parts)
        payload = serialization.encode({n: federation.global_state[n] for n in federation.layout.names(parts)}, meta)
        tasks = {
            w: EvalTask(round=r, task_id=f"e{r}-{w}", receives=parts, private=private_parts(strategy), spec=spec, share_samples=share_samples) for w in workers
        }
        return cls(r, tasks, payload)

    def report(self, worker_id: str, task_id: str, fd: float, extractor: str, num_samples: int) -> EvalReport:
        task = self.tasks.get(worker_id)
        if task is None or task.task_id != task_id:
            raise NotAssigned(f"evaluate task {task_id!r} was not given to worker {worker_id!r}")
        if worker_id in self.reports:
            raise DuplicateUpdate(f"worker {worker_id!r} already reported its evaluation")
        if not math.isfinite(fd) or fd < 0:
            raise NotAssigned(f"Frechet distance {fd} is not a finite non-negative number")
        report = EvalReport(worker_id, fd, extractor, num_samples)
        self.reports[worker_id] = report
        return report

    def summary(self) -> dict[str, Any]:
        fds = [r.fd for r in self.reports.values()]
        return {
            "round": self.completed_rounds,
            "kind": "evaluation",
            "models": "personalised",
            "fd": {w: r.fd for w, r in sorted(self.reports.items())},
            "fd_mean": statistics.fmean(fds) if fds else float("nan"),
            "fd_std": statistics.pstdev(fds) if len(fds) > 1 else 0.0,
            "extractor": next(iter(self.reports.values())).extractor if fds else "",
            "evaluated": len(fds),
            "asked": len(self.tasks),
        }


def check_evaluation_data(cfg: CoordinatorConfig) -> None:
    """DatasetError, at start rather than after the training rounds, when this coordinator is to score the
    global model (full, usplit with --eval-samples) and the Fashion-MNIST test set is not where it looks;
    ValueError when --inception-weights is not the network's weights."""
    if not cfg.eval_samples or private_parts(cfg.federation.strategy):
        return
    try:
        fashion_mnist_files(train=False, root=cfg.eval_data_root or None)
    except DatasetError as e:
        raise DatasetError(
            f"--eval-samples {cfg.eval_samples}: the global model is scored against the Fashion-MNIST test set (--eval-data-root): {e}"
        ) from None
    if cfg.inception_weights:  # read once now: a file that is not the network's weights fails here, not after round 1
        try:
            load_inception(cfg.inception_weights)
        except ValueError as e:
            raise ValueError(f"--inception-weights: {e}") from None


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
            extractor = load_inception(self.inception_weights, self.device) if self.inception_weights else load_fmnist_classifier(self.device)
            self._prepared = extractor, fashion_mnist_reference(extractor, root=self.data_root)
        return self._prepared

    def evaluate(self, state: dict[str, torch.Tensor], completed_rounds: int, spec: SamplingSpec) -> dict[str, Any]:
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
        return {
            "round": completed_rounds,
            "kind": "evaluation",
            "models": "global",
            "fd": {"global": score.fd},
            "fd_mean": score.fd,
            "fd_std": 0.0,
            "extractor": extractor.name,
            "evaluated": 1,
            "asked": 1,
        }

    def submit(self, state: dict[str, torch.Tensor], completed_rounds: int, spec: SamplingSpec, on_result: Callable[[dict[str, Any]], None]) -> None:
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
