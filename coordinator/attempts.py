"""How a round attempt ended, and the failed attempts of one round in a row: a round that nothing it receives
can close (no update in, every missing update refused, an average that is not finite) stops the run after
`max_failed_attempts` attempts instead of being re-run forever."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coordinator.refusals import Refusal


@dataclass(frozen=True)
class Attempt:
    """How the collection of a round attempt ended."""

    round_index: int
    selected: int  # workers given a task
    got: int  # updates folded in
    needed: int  # the quorum
    refusals: Sequence[Refusal]  # tasks refused by their workers
    refused_updates: str  # updates this coordinator refused, by outcome in words ("late 2", or "none")
    non_finite: str = ""  # why its average was not applied (NonFiniteAggregate), "" when it was or none was made

    @property
    def has_quorum(self) -> bool:
        return self.got >= self.needed

    @property
    def stuck(self) -> bool:
        """Whether it failed in a way that running it again the same way repeats: no update was accepted, the
        workers' refusals alone made up for the updates its quorum lacked, or its average was not finite. (An
        attempt that took some updates and missed others without a refusal, a worker gone, is not.)"""
        if self.non_finite:
            return True
        if self.has_quorum:
            return False
        return self.got == 0 or (bool(self.refusals) and len(self.refusals) >= self.needed - self.got)

    def __str__(self) -> str:
        return (
            f"{self.got} of {self.selected} updates (tasks refused by workers: {len(self.refusals)}; "
            f"updates refused: {self.refused_updates}), quorum {self.needed}"
        )


class FailedAttempts:
    """The stuck attempts (`Attempt.stuck`) of one round in a row; any other attempt, or a closed round, starts
    the count over."""

    def __init__(self, limit: int, round_deadline: float):
        self.limit = limit
        self.round_deadline = round_deadline  # seconds, to tell a deadline too short for the training
        self._round: int | None = None
        self.count = 0

    def failed(self, attempt: Attempt, training_seconds: Mapping[str, float]) -> str | None:
        """Record an attempt that did not close; the error that stops the run when this makes `limit` stuck
        attempts of its round in a row, else None. `training_seconds`: the latest training time each worker
        reported (with its updates, late ones included)."""
        if not attempt.stuck:
            self.reset()
            return None
        self.count = self.count + 1 if attempt.round_index == self._round else 1
        self._round = attempt.round_index
        if self.count < self.limit:
            return None
        return f"round {attempt.round_index + 1} failed {self.count} attempts in a row because {self._cause(attempt, training_seconds)}"

    def reset(self) -> None:
        self._round, self.count = None, 0

    def _cause(self, attempt: Attempt, training_seconds: Mapping[str, float]) -> str:
        """What failed the last attempt, in words, with what to change."""
        if attempt.non_finite:
            return f"the average of its updates was not finite ({attempt.non_finite}): local training diverges; lower lr, or set clip_norm"
        if attempt.refusals and len(attempt.refusals) >= attempt.needed - attempt.got:
            return _refused(attempt.refusals)
        arrived = "none arrived" if attempt.refused_updates == "none" else f"updates refused: {attempt.refused_updates}"
        return f"no update was accepted within round_deadline {self.round_deadline:g} s ({arrived}); {self._training_time(training_seconds)}"

    def _training_time(self, training_seconds: Mapping[str, float]) -> str:
        if not training_seconds:
            return "no worker has reported a training time yet: the deadline may be shorter than local training (raise round_deadline), or the workers stall"
        worker, longest = max(training_seconds.items(), key=lambda item: (item[1], item[0]))
        if longest >= self.round_deadline:
            return (
                f"worker {worker} reported {longest:.1f} s of local training, longer than the deadline: raise round_deadline "
                "above the workers' training time (or lower epochs)"
            )
        return (
            f"the workers reported at most {longest:.1f} s of local training (worker {worker}), within the deadline: downloads, "
            "uploads or stalled workers take the rest (raise round_deadline, or see the workers' logs)"
        )


def _refused(refusals: Sequence[Refusal]) -> str:
    """Refusals that failed an attempt, in words: their most frequent reason and an example of it."""
    reasons = Counter(r.reason for r in refusals)
    reason = min(reasons, key=lambda r: (-reasons[r], r))
    example = next(r for r in refusals if r.reason == reason)
    return (
        f"workers refused its tasks ({reason}, {reasons[reason]} of {len(refusals)} refusals in the last attempt): "
        f"worker {example.worker_id}: {example.message}"
    )
