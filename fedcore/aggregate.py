"""Streaming FedAvg (McMahan et al. 2017): weighted mean of deltas per part, folded in one update at a time."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping

import torch

from fedcore.errors import NotAssigned, SchemaError
from fedcore.parts import Part, PartLayout, sorted_parts
from fedcore.serialization import check_finite, check_schema


def delta(local: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A worker's update for the parts it returns: local - received, per tensor."""
    return {name: (local[name].detach().float() - received[name].float()).cpu() for name in received}


class RunningAggregate:
    """The weighted sum of the deltas accepted so far, per part, and the total weight behind each part.

    Memory is one copy of the averaged parts whatever the number of clients. An update is checked in full
    (names, shapes, dtypes, finite values, weight) before it touches the sums, so a refused update leaves
    them as they were. The result depends on arrival order only through float rounding."""

    def __init__(self, layout: PartLayout, parts: Iterable[Part]):
        self.layout = layout
        self.parts = frozenset(parts)
        self._sums = {name: torch.zeros(spec.shape, dtype=torch.float32) for name, spec in layout.specs(self.parts).items()}
        self._weight = {p: 0.0 for p in self.parts}
        self._reporters = {p: 0 for p in self.parts}

    def fold(self, update: Mapping[str, torch.Tensor], parts: Iterable[Part], weight: float, *, checked_finite: bool = False) -> None:
        """Add `weight` x `update` to the running sums. `checked_finite`: the caller has already refused
        NaN and Inf (`serialization.decode` does), so the values are not scanned a second time."""
        parts = frozenset(parts)
        if not parts:
            raise NotAssigned("an update must carry at least one part")
        if not parts <= self.parts:
            extra = [p.value for p in sorted_parts(parts - self.parts)]
            raise NotAssigned(f"parts {extra} are not averaged this round")
        if not (math.isfinite(weight) and weight > 0):
            raise SchemaError(f"update weight {weight} must be a positive number of images")
        check_schema({n: (t.dtype, tuple(t.shape)) for n, t in update.items()}, self.layout.specs(parts))
        if not checked_finite:
            check_finite(update)
        names = list(update)
        torch._foreach_add_([self._sums[n] for n in names], [update[n] for n in names], alpha=weight)  # one call, not one per tensor
        for p in parts:
            self._weight[p] += weight
            self._reporters[p] += 1

    def reporters(self, part: Part) -> int:
        return self._reporters[part]

    def weight(self, part: Part) -> float:
        return self._weight[part]

    @property
    def reported_parts(self) -> frozenset[Part]:
        return frozenset(p for p in self.parts if self._reporters[p] > 0)

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean delta of every part at least one client returned."""
        out: dict[str, torch.Tensor] = {}
        for p in sorted_parts(self.reported_parts):
            for name in self.layout.tensors[p]:
                out[name] = self._sums[name] / self._weight[p]
        return out

    def apply_to(self, state: MutableMapping[str, torch.Tensor]) -> frozenset[Part]:
        """global += mean delta, in place, for the reported parts; returns the parts that changed.

        One tensor's mean exists at a time (the same values as `mean()`, without a second copy of the model)."""
        for p in sorted_parts(self.reported_parts):
            for name in self.layout.tensors[p]:
                d = self._sums[name] / self._weight[p]
                state[name].add_(d.to(state[name].device, state[name].dtype))
        return self.reported_parts
