"""A run's running totals, checkpointed with it: the communication ledger and the tally of how rounds and
updates ended."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fedcore.federation.strategies import Traffic
from fedcore.model.parts import FLOAT32_BYTES, PART_ORDER, Part


@dataclass
class Ledger:
    """Cumulative communication of a run: the paper's parameter count and the bytes that carried it."""

    traffic: Traffic = field(default_factory=Traffic.zero)
    full_fedavg: int = 0  # what plain FedAvg would have exchanged with the same transfers
    bytes_down: dict[Part, int] = field(default_factory=lambda: dict.fromkeys(PART_ORDER, 0))
    bytes_up: dict[Part, int] = field(default_factory=lambda: dict.fromkeys(PART_ORDER, 0))

    @property
    def reduction_vs_full(self) -> float:
        return 1.0 - self.traffic.total / self.full_fedavg if self.full_fedavg else 0.0

    @property
    def payload_bytes(self) -> int:
        """The bytes of the payloads exchanged, both ways (a codec's, with their safetensors headers)."""
        return sum(self.bytes_down.values()) + sum(self.bytes_up.values())

    @property
    def full_fedavg_fp32_bytes(self) -> int:
        """The bytes plain FedAvg in float32 would have exchanged."""
        return FLOAT32_BYTES * self.full_fedavg

    def copy(self) -> Ledger:
        """A copy that later `add`s to this ledger leave as it is."""
        copy = Ledger()
        copy.add(self)
        return copy

    def add(self, other: Ledger) -> None:
        self.traffic = self.traffic + other.traffic
        self.full_fedavg += other.full_fedavg
        for p in PART_ORDER:
            self.bytes_down[p] += other.bytes_down[p]
            self.bytes_up[p] += other.bytes_up[p]

    def as_json(self) -> dict[str, object]:
        return {
            "parameters": {
                "down": {p.value: self.traffic.down[p] for p in PART_ORDER},
                "up": {p.value: self.traffic.up[p] for p in PART_ORDER},
            },
            "bytes": {
                "down": {p.value: self.bytes_down[p] for p in PART_ORDER},
                "up": {p.value: self.bytes_up[p] for p in PART_ORDER},
            },
            "parameters_total": self.traffic.total,
            "full_fedavg_parameters": self.full_fedavg,
            "reduction_vs_full": self.reduction_vs_full,
        }

    @classmethod
    def from_json(cls, obj: object) -> Ledger:
        """From `as_json`'s object (state.json's "ledger", a round log's line); ValueError naming the key and its
        value where one is missing or not a count."""

        def count(*path: str) -> int:
            return _count(_field(obj, path), ".".join(path))

        return cls(
            traffic=Traffic(
                down={p: count("parameters", "down", p.value) for p in PART_ORDER},
                up={p: count("parameters", "up", p.value) for p in PART_ORDER},
            ),
            full_fedavg=count("full_fedavg_parameters"),
            bytes_down={p: count("bytes", "down", p.value) for p in PART_ORDER},
            bytes_up={p: count("bytes", "up", p.value) for p in PART_ORDER},
        )


@dataclass(frozen=True)
class Tally:
    """How a run's round attempts and updates ended, by outcome: what a coordinator counted up to a checkpoint.

    Checkpointed beside the ledger so that a resumed run goes on from its totals (Prometheus counters restart at
    zero with each process, as they should; the run's totals are gauges, coordinator.metrics)."""

    round_attempts: Mapping[str, int] = field(default_factory=dict)  # complete, quorum, no_quorum
    updates: Mapping[str, int] = field(default_factory=dict)  # accepted, late, aborted, or the refusal reason

    def plus(self, round_attempts: Mapping[str, int], updates: Mapping[str, int]) -> Tally:
        """This tally with more counts added."""
        return Tally(_summed(self.round_attempts, round_attempts), _summed(self.updates, updates))

    def as_json(self) -> dict[str, object]:
        return {"round_attempts": dict(sorted(self.round_attempts.items())), "updates": dict(sorted(self.updates.items()))}

    @classmethod
    def from_json(cls, obj: object) -> Tally:
        """From state.json's "tally" (as parsed); a checkpoint written before tallies existed holds none: all zero.
        ValueError naming the key and its value where one is not a count."""
        return cls(_counts(obj, "round_attempts"), _counts(obj, "updates"))


def _summed(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted({*a, *b})}


def _field(obj: object, path: tuple[str, ...]) -> object:
    """The value at `path` in the JSON object `obj`; ValueError naming where the path leaves the objects (its text
    goes on from the name of what `obj` is: "ledger has no 'bytes'")."""
    value = obj
    for depth, key in enumerate(path):
        if not isinstance(value, Mapping):
            where = ".".join(path[:depth])
            raise ValueError(f"{where + ' ' if where else ''}is {value!r}, expected a JSON object")
        if key not in value:
            raise ValueError(f"has no {'.'.join(path[: depth + 1])!r}")
        value = value[key]
    return value


def _count(value: object, name: str) -> int:
    """`value` as a count: a JSON integer >= 0 (not a boolean); ValueError naming `name` and the value else."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"{name} is {value!r}, expected a count (an integer >= 0)")


def _counts(obj: object, key: str) -> dict[str, int]:
    """The counts by outcome under `key` of the JSON object `obj` ({} when it has none)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"is {obj!r}, expected a JSON object")
    by_outcome = obj.get(key, {})
    if not isinstance(by_outcome, Mapping):
        raise ValueError(f"{key} is {by_outcome!r}, expected a JSON object")
    return {str(outcome): _count(n, f"{key}.{outcome}") for outcome, n in by_outcome.items()}
