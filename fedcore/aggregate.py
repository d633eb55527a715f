"""Streaming FedAvg (McMahan et al. 2017): weighted mean of deltas per part, folded in one update at a time."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping

import torch

from fedcore.errors import NotAssigned, SchemaError
from fedcore.parts import Part, PartLayout, sorted_parts
from fedcore.serialization import Decoded, TensorTable, check_finite, check_schema


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
        specs = layout.specs(self.parts)
        # One flat buffer, tensors in name order (the order of the safetensors files every update arrives
        # in), so that a decoded update is added with a few slices instead of an operation per tensor.
        self._offsets: dict[str, int] = {}
        total = 0
        for name in sorted(specs):
            self._offsets[name] = total
            total += specs[name].numel
        self._flat = torch.zeros(total, dtype=torch.float32)
        self._sums = {name: self._flat[o : o + specs[name].numel].view(specs[name].shape) for name, o in self._offsets.items()}
        self._copy_plans: dict[TensorTable, tuple[tuple[int, int, int], ...]] = {}
        self._weight = {p: 0.0 for p in self.parts}
        self._reporters = {p: 0 for p in self.parts}

    def _check(self, parts: frozenset[Part], weight: float) -> None:
        if not parts:
            raise NotAssigned("an update must carry at least one part")
        if not parts <= self.parts:
            extra = [p.value for p in sorted_parts(parts - self.parts)]
            raise NotAssigned(f"parts {extra} are not averaged this round")
        if not (math.isfinite(weight) and weight > 0):
            raise SchemaError(f"update weight {weight} must be a positive number of images")

    def _count(self, parts: frozenset[Part], weight: float) -> None:
        for p in parts:
            self._weight[p] += weight
            self._reporters[p] += 1

    def fold(self, update: Mapping[str, torch.Tensor], parts: Iterable[Part], weight: float, *, checked_finite: bool = False) -> None:
        """Add `weight` x `update` to the running sums. `checked_finite`: the caller has already refused
        NaN and Inf, so the values are not scanned a second time."""
        parts = frozenset(parts)
        self._check(parts, weight)
        check_schema({n: (t.dtype, tuple(t.shape)) for n, t in update.items()}, self.layout.specs(parts))
        if not checked_finite:
            check_finite(update)
        self._add(update, weight)
        self._count(parts, weight)

    def _add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        names = list(update)
        torch._foreach_add_([self._sums[n] for n in names], [update[n] for n in names], alpha=weight)  # one call, not one per tensor

    def fold_decoded(self, update: Decoded, weight: float) -> None:
        """Add `weight` x a payload checked by a `PayloadReader` against this aggregate's layout (schema and
        finite values): one add per run of tensors that lie in the same order in both buffers."""
        parts = update.table.parts
        self._check(parts, weight)
        values = update.values()
        if values is None:  # not float32 back to back: tensor by tensor
            self._add(update.tensors(), weight)
        else:
            for src, dst, count in self._copy_plan(update.table):
                self._flat[dst : dst + count].add_(values[src : src + count], alpha=weight)
        self._count(parts, weight)

    def _copy_plan(self, table: TensorTable) -> tuple[tuple[int, int, int], ...]:
        """(first value in the update, first value in the sums, count) per run, once per distinct header."""
        plan = self._copy_plans.get(table)
        if plan is None:
            assert table.span is not None
            runs: list[list[int]] = []
            for e, name in sorted(zip(table.entries, table.names), key=lambda en: en[0].begin):
                src, dst, count = (e.begin - table.span[0]) // 4, self._offsets[name], (e.end - e.begin) // 4
                if count != self._sums[name].numel():  # a table checked against another layout
                    raise SchemaError(f"tensor {name!r} has {count} values, the sums {self._sums[name].numel()}")
                if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
                    runs[-1][2] += count
                else:
                    runs.append([src, dst, count])
            plan = self._copy_plans[table] = tuple((s, d, c) for s, d, c in runs)
        return plan

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
