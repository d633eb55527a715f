"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

from typing import NoReturn

import grpc

from fedcore import errors

_CODES: list[tuple[type[errors.FeddiffError], grpc.StatusCode]] = [
    (errors.StreamTooLong, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UploadInProgress, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UploadStalled, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.UploadAborted, grpc.StatusCode.ABORTED),
    (errors.DownloadInProgress, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.TaskClosed, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.DownloadSuperseded, grpc.StatusCode.ABORTED),
    (errors.DownloadStalled, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.DownloadEnded, grpc.StatusCode.ABORTED),  # any other end of a download the coordinator makes
    (errors.UnknownWorker, grpc.StatusCode.UNAUTHENTICATED),
    (errors.NotAssigned, grpc.StatusCode.PERMISSION_DENIED),
    (errors.UnregisteredWorker, grpc.StatusCode.PERMISSION_DENIED),
    (errors.WrongRound, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.LateUpdate, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.DuplicateUpdate, grpc.StatusCode.ALREADY_EXISTS),
    (errors.RoundError, grpc.StatusCode.FAILED_PRECONDITION),  # any other that does not fit the round in progress
    (errors.DuplicateWorker, grpc.StatusCode.ALREADY_EXISTS),
    (errors.BadWorkerInfo, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.BadEvaluation, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FieldOutOfRange, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.PayloadError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.StreamError, grpc.StatusCode.INVALID_ARGUMENT),
]


def code_for(error: errors.FeddiffError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


# Characters of a status message. It travels percent-encoded (up to 12 characters for one of ours) in the
# trailers, which a client drops past its 8 KiB metadata limit: an echoed 10 KB task id would turn the code
# into RESOURCE_EXHAUSTED "Stream removed".
MAX_DETAILS = 512


async def abort(context: grpc.aio.ServicerContext, error: errors.FeddiffError) -> NoReturn:
    """End the call with the error's status code and its message (which names the offending value)."""
    await context.abort(code_for(error), errors.shortened(f"{error.reason}: {error}", MAX_DETAILS))
    raise AssertionError("unreachable: context.abort raises")
