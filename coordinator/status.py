"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

from typing import NoReturn

import grpc

from fedcore import errors

_CODES: list[tuple[type[errors.FeddiffError], grpc.StatusCode]] = [
    (errors.StreamTooLong, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnknownWorker, grpc.StatusCode.UNAUTHENTICATED),
    (errors.NotAssigned, grpc.StatusCode.PERMISSION_DENIED),
    (errors.WrongRound, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.LateUpdate, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.DuplicateUpdate, grpc.StatusCode.ALREADY_EXISTS),
    (errors.PayloadError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.StreamError, grpc.StatusCode.INVALID_ARGUMENT),
]


def code_for(error: errors.FeddiffError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, error: errors.FeddiffError) -> NoReturn:
    """End the call with the error's status code and its message (which names the offending value)."""
    context.abort(code_for(error), f"{error.reason}: {error}")
    raise AssertionError("unreachable: context.abort raises")
