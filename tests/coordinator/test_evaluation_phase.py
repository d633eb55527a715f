"""An evaluate phase's reports, checked against their tasks without a server: each refusal is the error of what is
wrong with the report (a number no evaluation gives is no task given to another worker)."""

from __future__ import annotations

import math

import pytest

from coordinator.evaluation import EvalPhase, EvalReport
from fedcore.errors import BadEvaluation, DuplicateUpdate, FeddiffError, NotAssigned, WrongRound
from fedcore.federation.client import EvalTask
from fedcore.model.diffusion import SamplingSpec
from fedcore.model.parts import Part

SPEC = SamplingSpec(num_samples=16, sampler="ddim", steps=10, seed=0)


def _phase() -> EvalPhase:
    tasks = {
        w: EvalTask(
            completed_rounds=3, task_id=f"e3-{w}", receives=frozenset({Part.DECODER}), private_parts=frozenset({Part.ENCODER, Part.BOTTLENECK}), spec=SPEC
        )
        for w in ("a", "b")
    }
    return EvalPhase(completed_rounds=3, tasks=tasks, payload=b"", digests=dict.fromkeys(tasks, "sha256"))


def _report(**fields: object) -> EvalReport:
    values: dict[str, object] = {
        "worker_id": "a",
        "task_id": "e3-a",
        "completed_rounds": 3,
        "fd": 25.0,
        "extractor": "fmnist-classifier",
        "num_samples": 16,
        **fields,
    }
    return EvalReport(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "error", "reason"),
    [
        ({"fd": math.nan}, BadEvaluation, "bad_evaluation"),
        ({"fd": math.inf}, BadEvaluation, "bad_evaluation"),
        ({"fd": -0.5}, BadEvaluation, "bad_evaluation"),
        ({"num_samples": 15}, BadEvaluation, "bad_evaluation"),
        ({"completed_rounds": 2}, WrongRound, "wrong_round"),
        ({"task_id": "e3-b"}, NotAssigned, "not_assigned"),
    ],
    ids=["nan", "inf", "negative", "other-sample-count", "other-round", "another-workers-task"],
)
def test_a_report_that_does_not_fit_its_task_is_refused_for_what_is_wrong(fields: dict[str, object], error: type[FeddiffError], reason: str) -> None:
    phase = _phase()

    with pytest.raises(error) as refused:
        phase.report(_report(**fields))

    assert refused.value.reason == reason and phase.reports == {}


def test_a_report_is_taken_once() -> None:
    phase = _phase()
    phase.report(_report(fd=0.0))

    with pytest.raises(DuplicateUpdate):
        phase.report(_report(fd=1.0))

    summary = phase.summary()
    assert summary.fd_by_model == {"a": 0.0} and (summary.evaluated, summary.asked) == (1, 2)


def test_the_summary_is_the_round_log_line_the_reports_make() -> None:
    phase = _phase()
    phase.report(_report(worker_id="b", task_id="e3-b", fd=30.0))
    phase.report(_report(fd=20.0))

    line = phase.summary().as_json()

    assert line == {
        "round": 3,
        "kind": "evaluation",
        "models": "personalised",
        "fd": {"a": 20.0, "b": 30.0},
        "fd_mean": 25.0,
        "fd_std": 5.0,
        "extractor": "fmnist-classifier",
        "evaluated": 2,
        "asked": 2,
    }
    assert list(line) == ["round", "kind", "models", "fd", "fd_mean", "fd_std", "extractor", "evaluated", "asked"]
