"""The four sharing strategies of de Goede et al. 2024 as pure round planning, and the paper's parameter accounting."""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from fedcore.model.parts import ALL_PARTS, FLOAT32_BYTES, PART_ORDER, Part, PartLayout
from fedcore.payload.codecs import Codec, Identity


class Strategy(enum.StrEnum):
    FULL = "full"  # plain FedAvg: everything travels both ways
    USPLIT = "usplit"  # whole model down; each client of a random pair returns one half (+ maybe the bottleneck)
    UDEC = "udec"  # after the first broadcast only the decoder travels; encoder + bottleneck stay private
    ULATDEC = "ulatdec"  # bottleneck and decoder travel; the encoder stays private


StrategyName = Literal["full", "usplit", "udec", "ulatdec"]  # Strategy's values, as a setting's type


def shared_parts(strategy: Strategy) -> frozenset[Part]:
    """Parts that travel every round once a client holds a model."""
    if strategy is Strategy.UDEC:
        return frozenset({Part.DECODER})
    if strategy is Strategy.ULATDEC:
        return frozenset({Part.BOTTLENECK, Part.DECODER})
    return ALL_PARTS


def private_parts(strategy: Strategy) -> frozenset[Part]:
    """Parts each client keeps for good (personalised), never sent after the first broadcast nor averaged."""
    return ALL_PARTS - shared_parts(strategy)


@dataclass(frozen=True)
class ClientAssignment:
    client: str  # stable client identity
    receives: frozenset[Part]  # parts the server sends this round
    returns: frozenset[Part]  # parts whose delta the client sends back
    private_parts: frozenset[Part]  # parts the client keeps for good


@dataclass(frozen=True)
class RoundPlan:
    round_index: int  # 0-based
    strategy: Strategy
    assignments: tuple[ClientAssignment, ...]

    @property
    def clients(self) -> list[str]:
        return [a.client for a in self.assignments]

    def assignment(self, client: str) -> ClientAssignment:
        for a in self.assignments:
            if a.client == client:
                return a
        raise KeyError(f"client {client!r} is not in round {self.round_index}")

    def with_whole_model(self, client: str) -> RoundPlan:
        """This plan with `client` receiving the whole model, as on first contact (it holds no private parts
        any more); what it returns and keeps stays as planned. KeyError for a client not in the plan."""
        self.assignment(client)
        assignments = tuple(replace(a, receives=ALL_PARTS) if a.client == client else a for a in self.assignments)
        return replace(self, assignments=assignments)

    @property
    def averaged_parts(self) -> frozenset[Part]:
        return frozenset().union(*(a.returns for a in self.assignments))


def round_rng(seed: int, round_index: int) -> np.random.Generator:
    """The planning RNG of one round; the same (seed, round) gives the same plan on every machine."""
    return np.random.default_rng([seed, round_index, 0x5EED])


def select_clients(available: Sequence[str], per_round: int, seed: int, round_index: int) -> list[str]:
    """All available clients (per_round <= 0 or >= len), else a seeded uniform sample; sorted."""
    ids = sorted(available)
    if per_round <= 0 or per_round >= len(ids):
        return ids
    rng = np.random.default_rng([seed, round_index, 0x5E1EC7])
    return sorted(rng.choice(ids, size=per_round, replace=False).tolist())


def _usplit_returns(clients: Sequence[str], rng: np.random.Generator) -> dict[str, frozenset[Part]]:
    """USplit pairing: random pairs; one returns the encoder, the other the decoder, and a coin flip
    gives the bottleneck to one of them. With odd K the last client returns the bottleneck plus a random
    half; a lone client returns everything."""
    if len(clients) == 1:
        return {clients[0]: ALL_PARTS}
    order = [clients[i] for i in rng.permutation(len(clients))]
    returns: dict[str, frozenset[Part]] = {}
    for a, b in zip(order[0::2], order[1::2], strict=False):  # with odd K the last client is left for below
        enc = {Part.ENCODER}
        dec = {Part.DECODER}
        (enc if rng.random() < 0.5 else dec).add(Part.BOTTLENECK)
        returns[a] = frozenset(enc)
        returns[b] = frozenset(dec)
    if len(order) % 2:
        half = Part.ENCODER if rng.random() < 0.5 else Part.DECODER
        returns[order[-1]] = frozenset({Part.BOTTLENECK, half})
    return returns


def plan_round(
    strategy: Strategy,
    round_index: int,
    clients: Sequence[str],
    rng: np.random.Generator,
    *,
    first_contact: Collection[str] = (),
) -> RoundPlan:
    """Which parts each selected client receives, returns and keeps private this round.

    `first_contact` holds the clients that have never received a model: they get the whole model once
    (the initial broadcast), whatever the strategy."""
    if not clients:
        raise ValueError(f"round {round_index}: no clients to plan for")
    if len(set(clients)) != len(clients):
        raise ValueError(f"round {round_index}: duplicate client ids in {list(clients)}")
    shared = shared_parts(strategy)
    returns = _usplit_returns(list(clients), rng) if strategy is Strategy.USPLIT else dict.fromkeys(clients, shared)
    assignments = tuple(
        ClientAssignment(
            client=c,
            receives=ALL_PARTS if c in first_contact else shared,
            returns=returns[c],
            private_parts=private_parts(strategy),
        )
        for c in clients
    )
    return RoundPlan(round_index=round_index, strategy=strategy, assignments=assignments)


@dataclass(frozen=True)
class Traffic:
    """Parameters (float32 values) exchanged, by direction and part."""

    down: Mapping[Part, int]
    up: Mapping[Part, int]

    @property
    def total(self) -> int:
        return sum(self.down.values()) + sum(self.up.values())

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(
            down={p: self.down.get(p, 0) + other.down.get(p, 0) for p in PART_ORDER},
            up={p: self.up.get(p, 0) + other.up.get(p, 0) for p in PART_ORDER},
        )

    @classmethod
    def zero(cls) -> Traffic:
        return cls(dict.fromkeys(PART_ORDER, 0), dict.fromkeys(PART_ORDER, 0))


def plan_traffic(plan: RoundPlan, sizes: Mapping[Part, int]) -> Traffic:
    """The paper's count for one round: every part sent to and returned by every client."""
    down = {p: sum(sizes[p] for a in plan.assignments if p in a.receives) for p in PART_ORDER}
    up = {p: sum(sizes[p] for a in plan.assignments if p in a.returns) for p in PART_ORDER}
    return Traffic(down, up)


def full_fedavg_parameters(num_clients: int, sizes: Mapping[Part, int]) -> int:
    """What plain FedAvg exchanges in a round with these participants: the whole model, both ways."""
    return 2 * num_clients * sum(sizes.values())


@dataclass(frozen=True)
class AccountingSummary:
    strategy: Strategy
    clients: int
    rounds: int
    traffic: Traffic
    full_fedavg: int  # plain FedAvg over the same rounds and participants

    @property
    def reduction_vs_full(self) -> float:
        return 1.0 - self.traffic.total / self.full_fedavg

    def as_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.value,
            "clients": self.clients,
            "rounds": self.rounds,
            "parameters_total": self.traffic.total,
            "parameters_down": sum(self.traffic.down.values()),
            "parameters_up": sum(self.traffic.up.values()),
            "parameters_by_part": {
                "down": {p.value: self.traffic.down[p] for p in PART_ORDER},
                "up": {p.value: self.traffic.up[p] for p in PART_ORDER},
            },
            "full_fedavg_parameters": self.full_fedavg,
            "reduction_vs_full": round(self.reduction_vs_full, 6),
        }


def account(strategy: Strategy, sizes: Mapping[Part, int], clients: int, rounds: int, seed: int = 0) -> AccountingSummary:
    """Parameters exchanged when `clients` clients take part in all `rounds` rounds (the paper's setting)."""
    ids = [f"client-{i}" for i in range(clients)]
    seen: set[str] = set()
    traffic = Traffic.zero()
    full = 0
    for r in range(rounds):
        plan = plan_round(strategy, r, ids, round_rng(seed, r), first_contact=[c for c in ids if c not in seen])
        seen.update(ids)
        traffic = traffic + plan_traffic(plan, sizes)
        full += full_fedavg_parameters(len(ids), sizes)
    return AccountingSummary(strategy, clients, rounds, traffic, full)


@dataclass(frozen=True)
class CodedTraffic:
    """The bytes of an `AccountingSummary`'s transfers with a codec (`coded_bytes`)."""

    compression: str  # the codec's name
    bytes_down: int
    bytes_up: int
    full_fedavg_fp32_bytes: int  # plain FedAvg's over the same rounds and participants, in float32
    bytes_vs_fedavg_fp32: float  # how many times fewer bytes than plain FedAvg's, to 3 decimals

    def as_json(self) -> dict[str, Any]:
        return {
            "compression": self.compression,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "full_fedavg_fp32_bytes": self.full_fedavg_fp32_bytes,
            "bytes_vs_fedavg_fp32": self.bytes_vs_fedavg_fp32,
        }


def coded_bytes(summary: AccountingSummary, layout: PartLayout, codec: Codec, seed: int = 0) -> CodedTraffic:
    """The bytes of a summary's transfers (`account`, every client in every round) with `codec`: the updates coded,
    and with a lossy codec the downloads too, as the coordinator sends them in a fresh run
    (fedcore.federation.engine): nothing in round 1 (every client builds the initial model from the run's seed,
    fedcore.payload.initial), then the coded change of the parts a client received in the round before or
    built from the seed, the values (float32) of the others (a part it did not hold). The coded tensors' bytes
    (`Codec.encoded_bytes`, in closed form), without the payloads' safetensors headers; and how many times fewer
    they are than plain FedAvg's in float32."""
    coded = {p: sum(codec.encoded_bytes(spec.numel) for spec in layout.tensors[p].values()) for p in PART_ORDER}
    values = {p: FLOAT32_BYTES * n for p, n in layout.sizes.items()}
    lossy = not isinstance(codec, Identity)
    ids = [f"client-{i}" for i in range(summary.clients)]
    seen: set[str] = set()
    held = dict.fromkeys(ids, ALL_PARTS if lossy else frozenset())  # the parts each client holds the last version of
    down = up = 0
    for r in range(summary.rounds):
        plan = plan_round(summary.strategy, r, ids, round_rng(seed, r), first_contact=[c for c in ids if c not in seen])
        seen.update(ids)
        for a in plan.assignments:
            change = lossy and a.receives <= held[a.client]
            down += 0 if change and r == 0 else sum((coded if change else values)[p] for p in a.receives)  # round 1: unchanged
            up += sum(coded[p] for p in a.returns)
            held[a.client] = a.receives
    fedavg = FLOAT32_BYTES * summary.full_fedavg
    return CodedTraffic(codec.name, down, up, fedavg, round(fedavg / (down + up), 3))
