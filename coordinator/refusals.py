"""Tasks the workers refuse (RejectTask): one refusal as the coordinator keeps it, and the count of a round's
attempts that the refusals failed, which stops the run once it reaches `max_refused_attempts`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from fedcore.errors import REJECTION_REASONS, TaskRefused, rejected_outcome

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
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        return cls(worker_id, task_id, reason if reason in REJECTION_REASONS else TaskRefused.reason, message)

    @property
    def outcome(self) -> str:
        """Its outcome label in feddiff_updates_total."""
        return rejected_outcome(self.reason)


class RefusalStreak:
    """Consecutive failed attempts of one round whose missing updates were refused, for one reason.

    An attempt counts when it missed its quorum and the refused tasks alone made up for what was missing
    (had they been delivered, the round would have closed); its reason is the most frequent among them."""

    def __init__(self, limit: int):
        self.limit = limit
        self._key: tuple[int, str] | None = None  # (round index, reason) of the streak
        self.count = 0

    def attempt_failed(self, round_index: int, refusals: Sequence[Refusal], missing: int) -> str | None:
        """Record an attempt that missed its quorum by `missing` updates; the error that stops the run when
        this makes `limit` attempts in a row for one reason, else None."""
        if not refusals or len(refusals) < missing:
            self.reset()
            return None
        reasons = Counter(r.reason for r in refusals)
        reason = min(reasons, key=lambda r: (-reasons[r], r))
        key = (round_index, reason)
        self.count = self.count + 1 if key == self._key else 1
        self._key = key
        if self.count < self.limit:
            return None
        example = next(r for r in refusals if r.reason == reason)
        return (
            f"round {round_index + 1} failed {self.count} attempts in a row because workers refused its tasks ({reason}, "
            f"{reasons[reason]} of {len(refusals)} refusals in the last attempt): worker {example.worker_id}: {example.message}"
        )

    def reset(self) -> None:
        self._key, self.count = None, 0
