"""Streaming FedAvg (McMahan et al. 2017): weighted mean of deltas per part, folded in one delta at a time."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping

import torch

from fedcore.errors import NonFiniteAggregate, NotAssigned, SchemaError
from fedcore.model.parts import Part, PartLayout, sorted_parts
from fedcore.payload.serialization import Decoded, TensorTable, check_finite, check_schema, largest_magnitude


def delta(local: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A worker's delta for the parts it returns: local - received, per tensor."""
    return {name: (local[name].detach().float() - received[name].float()).cpu() for name in received}


class RunningAggregate:
    """The weighted sum of the deltas accepted so far, per part, and the total weight behind each part.

    Memory is one copy of the averaged parts whatever the number of clients. A delta is checked in full
    (names, shapes, dtypes, finite values, weight) before it touches the sums, so a refused one leaves
    them as they were. The result depends on arrival order only through float rounding."""

    def __init__(self, layout: PartLayout, parts: Iterable[Part]):
        self.layout = layout
        self.parts = frozenset(parts)
        specs = layout.specs(self.parts)
        # One flat buffer, tensors in name order (the order of the safetensors files every delta arrives
        # in), so that a decoded delta is added with a few slices instead of an operation per tensor.
        self._offsets: dict[str, int] = {}
        total = 0
        for name in sorted(specs):
            self._offsets[name] = total
            total += specs[name].numel
        self._flat = torch.zeros(total, dtype=torch.float32)
        self._sums = {name: self._flat[o : o + specs[name].numel].view(specs[name].shape) for name, o in self._offsets.items()}
        self._copy_plans: dict[TensorTable, dict[Part, tuple[tuple[int, int, int], ...]]] = {}
        self._weight = dict.fromkeys(self.parts, 0.0)  # positive once an update carried the part (`_check`)

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

    def fold(self, delta: Mapping[str, torch.Tensor], parts: Iterable[Part], weight: float, *, checked_finite: bool = False) -> None:
        """Add `weight` x `delta` to the running sums. `checked_finite`: the caller has already refused
        NaN and Inf, so the values are not scanned a second time."""
        parts = frozenset(parts)
        self._check(parts, weight)
        check_schema({n: (t.dtype, tuple(t.shape)) for n, t in delta.items()}, self.layout.specs(parts))
        if not checked_finite:
            check_finite(delta)
        self._add(delta, weight)
        self._count(parts, weight)

    def _add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        names = list(delta)
        torch._foreach_add_([self._sums[n] for n in names], [delta[n] for n in names], alpha=weight)  # one call, not one per tensor

    def fold_decoded(self, delta: Decoded, weight: float, clip: Mapping[Part, float] | None = None) -> dict[Part, float]:
        """Add `weight` x a payload checked by a `PayloadReader` against this aggregate's layout (schema and
        finite values): one add per run of tensors that lie in the same order in both buffers.

        With `clip` (norm clipping: a bound per part, possibly none), each part's L2 norm is taken first and a
        part whose norm exceeds its bound is folded scaled down to it: one pass for the norms, one for the
        scaled add, no copy. Returns the norms (empty without `clip`)."""
        parts = delta.table.parts
        self._check(parts, weight)
        values = delta.values()
        if values is None:  # not float32 back to back: tensor by tensor, part by part
            norms = self._fold_by_part(delta.tensors(), weight, clip)
        else:
            plan = self._copy_plan(delta.table)
            norms = {p: _norm([values[s : s + c] for s, _, c in runs]) for p, runs in plan.items()} if clip is not None else {}
            for p, runs in plan.items():
                alpha = weight * _scale(norms.get(p), (clip or {}).get(p))
                for src, dst, count in runs:
                    self._flat[dst : dst + count].add_(values[src : src + count], alpha=alpha)
        self._count(parts, weight)
        return norms

    def fold_tensors(
        self, delta: Mapping[str, torch.Tensor], parts: Iterable[Part], weight: float, clip: Mapping[Part, float] | None = None
    ) -> dict[Part, float]:
        """`fold_decoded` for float32 tensors of `parts` already checked against this aggregate's layout (a
        decoded coded delta, fedcore.payload.coded): clipped as there, tensor by tensor."""
        parts = frozenset(parts)
        self._check(parts, weight)
        norms = self._fold_by_part(delta, weight, clip)
        self._count(parts, weight)
        return norms

    def _fold_by_part(self, delta: Mapping[str, torch.Tensor], weight: float, clip: Mapping[Part, float] | None) -> dict[Part, float]:
        """Add each part's tensors, scaled down to its clipping bound where `clip` has one; the norms taken."""
        by_part = self._by_part(delta)
        norms = {p: _norm(list(ts.values())) for p, ts in by_part.items()} if clip is not None else {}
        for p, tensors in by_part.items():
            self._add(tensors, weight * _scale(norms.get(p), (clip or {}).get(p)))
        return norms

    def _by_part(self, tensors: Mapping[str, torch.Tensor]) -> dict[Part, dict[str, torch.Tensor]]:
        out: dict[Part, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            out.setdefault(self.layout.part_of(name), {})[name] = t
        return out

    def _copy_plan(self, table: TensorTable) -> dict[Part, tuple[tuple[int, int, int], ...]]:
        """Per part, (first value in the delta, first value in the sums, count) per run, once per distinct
        header. A run never spans two parts, so that each part can be folded with its own factor."""
        plan = self._copy_plans.get(table)
        if plan is None:
            assert table.span is not None
            runs: dict[Part, list[list[int]]] = {}
            for e, name in sorted(zip(table.entries, table.names, strict=True), key=lambda en: en[0].begin):
                src, dst, count = (e.begin - table.span[0]) // 4, self._offsets[name], (e.end - e.begin) // 4
                if count != self._sums[name].numel():  # a table checked against another layout
                    raise SchemaError(f"tensor {name!r} has {count} values, the sums {self._sums[name].numel()}")
                part_runs = runs.setdefault(self.layout.part_of(name), [])
                if part_runs and part_runs[-1][0] + part_runs[-1][2] == src and part_runs[-1][1] + part_runs[-1][2] == dst:
                    part_runs[-1][2] += count
                else:
                    part_runs.append([src, dst, count])
            plan = self._copy_plans[table] = {p: tuple((s, d, c) for s, d, c in r) for p, r in runs.items()}
        return plan

    def weight(self, part: Part) -> float:
        return self._weight[part]

    @property
    def reported_parts(self) -> frozenset[Part]:
        return frozenset(p for p in self.parts if self._weight[p] > 0)

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean delta of every part at least one client returned."""
        out: dict[str, torch.Tensor] = {}
        for p in sorted_parts(self.reported_parts):
            for name in self.layout.tensors[p]:
                out[name] = self._sums[name] / self._weight[p]
        return out

    def _mean_of(self, name: str, part: Part, like: torch.Tensor) -> torch.Tensor:
        return (self._sums[name] / self._weight[part]).to(like.device, like.dtype)

    def check_applicable(self, state: Mapping[str, torch.Tensor]) -> None:
        """NonFiniteAggregate unless global + mean delta is finite everywhere (`apply_to` would leave NaN or an
        infinity, as finite deltas whose weighted sum overflows float32 do). The new values are computed as
        `apply_to` computes them, one tensor at a time, and dropped: no second copy of the model."""
        for p in sorted_parts(self.reported_parts):
            for name in self.layout.tensors[p]:
                updated = state[name] + self._mean_of(name, p, state[name])
                if not math.isfinite(largest_magnitude(updated)):
                    bad = int((~torch.isfinite(updated)).sum())
                    raise NonFiniteAggregate(f"the round's mean update would make {bad} of {updated.numel()} values of tensor {name!r} NaN or infinite")

    def apply_to(self, state: MutableMapping[str, torch.Tensor]) -> frozenset[Part]:
        """global += mean delta, in place, for the reported parts; returns the parts that changed.

        One tensor's mean exists at a time (the same values as `mean()`, without a second copy of the model)."""
        for p in sorted_parts(self.reported_parts):
            for name in self.layout.tensors[p]:
                state[name].add_(self._mean_of(name, p, state[name]))
        return self.reported_parts


def _norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of all the values of `tensors` together (one pass, no temporaries)."""
    if not tensors:
        return 0.0
    return math.sqrt(sum(float(n) ** 2 for n in torch._foreach_norm(tensors, 2)))


def _scale(norm: float | None, bound: float | None) -> float:
    """The factor that brings a part of L2 norm `norm` down to `bound` (1 within it, or without a bound)."""
    if norm is None or bound is None or norm <= bound:
        return 1.0
    return bound / norm  # 0 for an infinite norm
