"""The one mapping of domain errors to status codes (coordinator/status.py): every error of fedcore/errors.py that
refuses a call has a code of its own, so that none reaches a worker as INTERNAL."""

from __future__ import annotations

import grpc
import pytest

from coordinator.status import code_for
from fedcore import errors

# Errors that never refuse a call: a worker's refusal of its task (it sends it with RejectTask, answered OK), a
# process that does not start (or stops: its settings, data, assets, training processes), a round that is not
# committed, a worker's own lack of its private parts (it joins again for the whole model).
NOT_REFUSALS = (
    errors.TaskRefused,
    errors.CannotListen,
    errors.ExistingRun,
    errors.DifferentRun,
    errors.NonFiniteAggregate,
    errors.SettingsError,
    errors.DatasetError,
    errors.AssetIntegrityError,
    errors.TrainingProcessFailed,
    errors.MissingPrivateState,
)
REFUSALS = sorted(
    (e for e in vars(errors).values() if isinstance(e, type) and issubclass(e, errors.FeddiffError) and not issubclass(e, NOT_REFUSALS)),
    key=lambda e: e.__name__,
)


@pytest.mark.parametrize("error", [e for e in REFUSALS if e is not errors.FeddiffError], ids=lambda e: e.__name__)
def test_every_refusal_has_a_status_code_of_its_own(error: type[errors.FeddiffError]) -> None:
    assert code_for(error("a refusal")) is not grpc.StatusCode.INTERNAL


def test_a_report_no_evaluation_gives_is_invalid_not_someone_elses_task() -> None:
    assert code_for(errors.BadEvaluation("Frechet distance nan")) is grpc.StatusCode.INVALID_ARGUMENT
