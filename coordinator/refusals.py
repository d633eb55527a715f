"""Tasks the workers refuse (RejectTask): one refusal as the coordinator keeps it (the attempts that refusals
fail are counted with the others in coordinator/attempts.py)."""

from __future__ import annotations

from dataclasses import dataclass

from fedcore.errors import REJECTION_REASONS, TaskRefused, rejected_outcome, shortened

MAX_MESSAGE = 300  # characters of a worker's explanation kept (it goes to the log and the run's error)


@dataclass(frozen=True)
class Refusal:
    worker_id: str
    task_id: str
    reason: str  # one of fedcore.errors.REJECTION_REASONS ("other" for any other)
    message: str  # the worker's explanation, for the operator

    @classmethod
    def of(cls, worker_id: str, task_id: str, reason: str, message: str) -> Refusal:
        """As a worker stated it, bounded: an unknown reason is "other" (the reason labels a metric)."""
        return cls(worker_id, task_id, reason if reason in REJECTION_REASONS else TaskRefused.reason, shortened(message, MAX_MESSAGE))

    @property
    def outcome(self) -> str:
        """Its outcome label in feddiff_updates_total."""
        return rejected_outcome(self.reason)
