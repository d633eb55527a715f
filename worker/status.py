"""The one place where the gRPC status codes a worker meets become what it does: join again, back off, or go on
to its next task; what it counts, and what it logs. The coordinator's side of each code is coordinator/status.py."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Literal, NamedTuple

import grpc

from fedcore import errors

Code = grpc.StatusCode
# The calls whose failures the worker tells apart; any other call that fails (WaitTask, DownloadWeights,
# ReportEvaluation) is "session". Heartbeats and the Leave at stop are not answered at all: a session in
# trouble shows in its next long poll.
Call = Literal["join", "upload", "reject_task", "session"]


class Action(enum.Enum):
    REJOIN = "rejoin"  # the session is over: wait the backoff, connect and join again
    BACK_OFF = "back_off"  # the session goes on: wait the backoff, then ask for a task
    NEXT_TASK = "next_task"  # the session goes on: ask for the next task at once


@dataclass(frozen=True)
class Reaction:
    action: Action
    says: str  # the log line, formatted with: code, code_name, details (the status message), task_id, delay (s)
    level: int = logging.WARNING
    outcome: str = ""  # the label counted: in feddiff_joins_total for a join, feddiff_updates_total for an upload

    def line(self, error: grpc.RpcError, task_id: str, delay: float) -> str:
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else str(error)
        return self.says.format(code=code, code_name=getattr(code, "name", code), details=details, task_id=task_id, delay=delay)


# A lost connection, an ended session, a coordinator that went away: connect and join again.
LOST = Reaction(Action.REJOIN, "coordinator unavailable ({code}: {details}); retrying in {delay:.1f}s")
# A refusal (RejectTask) the coordinator did not take: the task stays refused here; back off as after any.
NOT_TAKEN = Reaction(Action.BACK_OFF, "the coordinator did not take the refusal of {task_id}: {code_name}: {details}")
# An update that missed its round (closed, or its update already in): the next task is a new one.
LATE = Reaction(Action.NEXT_TASK, "update for {task_id} refused: {details}", outcome=errors.LateUpdate.reason)


def _join_refused(error: type[errors.FeddiffError], meaning: str = "") -> Reaction:
    """A join refused with `error`'s status code (coordinator/status.py): counted under its reason, tried again."""
    says = f"join refused{', ' + meaning if meaning else ''}: {{details}}; retrying in {{delay:.1f}}s"
    return Reaction(Action.REJOIN, says, logging.ERROR, outcome=error.reason)


def _update_refused(code: Code) -> Reaction:
    """An update refused for what it is: the next task only after the backoff; counted under its code's name."""
    says = "update for {task_id} refused: {details}; asking again in {delay:.1f}s"
    return Reaction(Action.BACK_OFF, says, logging.ERROR, outcome=code.name.lower())


BAD_INFO = _join_refused(errors.BadWorkerInfo)
TWIN = _join_refused(errors.DuplicateWorker, "another worker runs under this id")
UNREGISTERED = _join_refused(errors.UnregisteredWorker)
NOT_VERIFIED = _join_refused(errors.UnknownWorker)
MALFORMED = _update_refused(Code.INVALID_ARGUMENT)
NOT_ASSIGNED = _update_refused(Code.PERMISSION_DENIED)
TOO_LARGE = _update_refused(Code.RESOURCE_EXHAUSTED)


class Row(NamedTuple):
    """What the worker does after each call that ends with one status code."""

    join: Reaction
    upload: Reaction
    reject_task: Reaction
    session: Reaction


# A failed join ends the session, and so does any other failed call but an upload refused for what it is or
# for its round, and a refusal the coordinator does not take for another reason than a lost connection.
TABLE: dict[Code, Row] = {
    #                          join          upload        reject_task  session
    Code.CANCELLED:           Row(LOST,         LOST,         NOT_TAKEN,   LOST),
    Code.UNKNOWN:             Row(LOST,         LOST,         NOT_TAKEN,   LOST),
    Code.INVALID_ARGUMENT:    Row(BAD_INFO,     MALFORMED,    NOT_TAKEN,   LOST),
    Code.DEADLINE_EXCEEDED:   Row(LOST,         LOST,         LOST,        LOST),
    Code.NOT_FOUND:           Row(LOST,         LOST,         NOT_TAKEN,   LOST),
    Code.ALREADY_EXISTS:      Row(TWIN,         LATE,         NOT_TAKEN,   LOST),
    Code.PERMISSION_DENIED:   Row(UNREGISTERED, NOT_ASSIGNED, NOT_TAKEN,   LOST),
    Code.RESOURCE_EXHAUSTED:  Row(LOST,         TOO_LARGE,    NOT_TAKEN,   LOST),
    Code.FAILED_PRECONDITION: Row(LOST,         LATE,         NOT_TAKEN,   LOST),
    Code.ABORTED:             Row(LOST,         LOST,         NOT_TAKEN,   LOST),
    Code.OUT_OF_RANGE:        Row(LOST,         LOST,         NOT_TAKEN,   LOST),
    Code.UNIMPLEMENTED:       Row(LOST,         LOST,         NOT_TAKEN,   LOST),
    Code.INTERNAL:            Row(LOST,         LOST,         NOT_TAKEN,   LOST),
    Code.UNAVAILABLE:         Row(LOST,         LOST,         LOST,        LOST),
    Code.DATA_LOSS:           Row(LOST,         LOST,         NOT_TAKEN,   LOST),
    Code.UNAUTHENTICATED:     Row(NOT_VERIFIED, LOST,         LOST,        LOST),
}  # fmt: skip


def reaction(call: Call, error: grpc.RpcError) -> Reaction:
    """What the worker does after `call` failed with `error` (an error without a status code: as UNKNOWN)."""
    code = error.code() if hasattr(error, "code") else Code.UNKNOWN
    found: Reaction = getattr(TABLE[code], call)
    return found
