"""The three UNet parts that strategies share or keep private, and the rule that assigns each parameter to one."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch


class Part(enum.StrEnum):
    ENCODER = "encoder"  # input conv, time embedding, down path
    BOTTLENECK = "bottleneck"  # the lowest-resolution blocks ("latent", "mid")
    DECODER = "decoder"  # up path and output head


ALL_PARTS: frozenset[Part] = frozenset(Part)
PART_ORDER: tuple[Part, ...] = (Part.ENCODER, Part.BOTTLENECK, Part.DECODER)
FLOAT32_BYTES = 4  # a parameter's bytes as float32: what every count of parameters stands for, uncompressed


def parse_parts(names: Iterable[str]) -> frozenset[Part]:
    try:
        return frozenset(Part(n) for n in names)
    except ValueError as e:
        raise ValueError(f"unknown part in {list(names)!r}; parts are {[p.value for p in PART_ORDER]}") from e


def sorted_parts(parts: Iterable[Part]) -> list[Part]:
    return [p for p in PART_ORDER if p in set(parts)]


PartRule = Callable[[str], Part]
"""Maps a parameter name to its part; a backbone is added by giving its own rule."""


def prefix_rule(prefixes: Mapping[str, Part]) -> PartRule:
    """A rule keyed on the first component of the parameter name (`downs.0.block1...` -> `downs`)."""

    def part_of(name: str) -> Part:
        head = name.split(".", 1)[0]
        try:
            return prefixes[head]
        except KeyError:
            raise KeyError(f"parameter {name!r} belongs to no part (known prefixes: {sorted(prefixes)})") from None

    return part_of


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class PartLayout:
    """Which tensors make up each part of one model: the schema every payload is checked against."""

    tensors: Mapping[Part, Mapping[str, TensorSpec]]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor], rule: PartRule) -> PartLayout:
        by_part: dict[Part, dict[str, TensorSpec]] = {p: {} for p in PART_ORDER}
        for name, t in state.items():
            by_part[rule(name)][name] = TensorSpec(tuple(t.shape), t.dtype)
        return cls(by_part)

    def specs(self, parts: Iterable[Part]) -> dict[str, TensorSpec]:
        """Name -> spec of every tensor of `parts`, in the layout's order (a fresh dict the caller may keep)."""
        return dict(self._specs_of(frozenset(parts)))

    @cached_property
    def _spec_cache(self) -> dict[frozenset[Part], dict[str, TensorSpec]]:
        return {}

    def _specs_of(self, parts: frozenset[Part]) -> Mapping[str, TensorSpec]:
        # Every update is checked against these: built once per set of parts (at most 7), not per update.
        if parts not in self._spec_cache:
            out: dict[str, TensorSpec] = {}
            for p in sorted_parts(parts):
                out.update(self.tensors[p])
            self._spec_cache[parts] = out
        return self._spec_cache[parts]

    def names(self, parts: Iterable[Part]) -> list[str]:
        return list(self._specs_of(frozenset(parts)))

    def numel(self, part: Part) -> int:
        return sum(s.numel for s in self.tensors[part].values())

    @cached_property
    def _sizes(self) -> dict[Part, int]:
        return {p: self.numel(p) for p in PART_ORDER}

    @property
    def sizes(self) -> dict[Part, int]:
        return dict(self._sizes)

    @property
    def total(self) -> int:
        return sum(self._sizes.values())

    @cached_property
    def _part_by_name(self) -> dict[str, Part]:
        return {name: p for p, specs in self.tensors.items() for name in specs}

    def part_of(self, name: str) -> Part:
        return self._part_by_name[name]

    def split_bytes(self, total: int, tensor_bytes: Mapping[str, int]) -> dict[Part, int]:
        """Split a payload's size over its parts: each part's tensor bytes, plus a share of the rest (the
        safetensors header) in proportion to its number of tensors, the last part taking the rounding, so
        that the parts add up to `total` exactly."""
        data = dict.fromkeys(PART_ORDER, 0)
        counts = dict.fromkeys(PART_ORDER, 0)
        for name, nbytes in tensor_bytes.items():
            part = self._part_by_name[name]
            data[part] += nbytes
            counts[part] += 1
        header = total - sum(data.values())
        present = [p for p in PART_ORDER if counts[p]]
        shares = {p: header * counts[p] // len(tensor_bytes) for p in present}
        if present:
            shares[present[-1]] += header - sum(shares.values())
        return {p: data[p] + shares.get(p, 0) for p in PART_ORDER}
