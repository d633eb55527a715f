"""The server side of federated rounds without any transport: global model, round plans, payloads, aggregation.

Both the gRPC coordinator and the in-process simulation drive this class, so they compute the same model."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcore import settings
from fedcore.errors import DifferentRun, DuplicateUpdate, HeaderError, LateUpdate, NotAssigned
from fedcore.federation import checkpoint
from fedcore.federation.aggregate import RunningAggregate
from fedcore.federation.client import TrainTask
from fedcore.federation.robust import NormHistory, RobustConfig
from fedcore.federation.strategies import (
    RoundPlan,
    Strategy,
    Traffic,
    plan_round,
    round_rng,
    select_clients,
)
from fedcore.model.parts import PART_ORDER, Part, PartLayout
from fedcore.model.training import TrainConfig
from fedcore.model.unet import build_model, layout_of, preset
from fedcore.payload import serialization
from fedcore.payload.serialization import PayloadMeta


@dataclass(frozen=True)
class FederationConfig:
    strategy: Strategy
    model: str = "paper-fmnist"  # model preset
    rounds: int = 15  # R
    clients_per_round: int = 0  # 0 = every available client, else a seeded sample
    seed: int = 0  # seeds the initial model, the plans, the samples and every client's training
    train: TrainConfig = TrainConfig()  # sent to the clients with each task

    # What a resumed run must share with its checkpoint to compute what the uninterrupted run would have: the
    # model and how rounds are planned, sampled, seeded and trained. `rounds` is not among them: a run may be
    # extended, or shortened to the rounds it has completed.
    DEFINING = ("strategy", "model", "clients_per_round", "seed", "epochs", "batch_size", "lr", "loss")

    @classmethod
    def from_settings(
        cls, *, strategy: str, model: str, rounds: int, clients_per_round: int, seed: int,
        epochs: int, batch_size: int, lr: float, loss: str,
    ) -> FederationConfig:  # fmt: skip
        """From flat settings (flags, YAML): the one place that nests them; SettingsError for a training
        setting outside the range a worker runs."""
        train = settings.build(TrainConfig, {"epochs": epochs, "batch_size": batch_size, "lr": lr, "loss": loss})
        return cls(Strategy(strategy), model, rounds, clients_per_round, seed, train)

    def as_json(self) -> dict[str, object]:
        return {
            "strategy": self.strategy.value,
            "model": self.model,
            "rounds": self.rounds,
            "clients_per_round": self.clients_per_round,
            "seed": self.seed,
            "epochs": self.train.epochs,
            "batch_size": self.train.batch_size,
            "lr": self.train.lr,
            "loss": self.train.loss,
        }

    def differences(self, saved: Mapping[str, Any]) -> list[tuple[str, object, object]]:
        """Each setting that defines a run (`DEFINING`) whose value in `saved` (an `as_json()`) differs from this
        config's: (key, saved value, this value)."""
        now = self.as_json()
        return [(key, saved.get(key), now[key]) for key in self.DEFINING if saved.get(key) != now[key]]


def task_seed(seed: int, round_index: int, client: str) -> int:
    """The training seed of one client in one round, the same wherever that client runs."""
    seq = np.random.SeedSequence([seed, round_index, zlib.crc32(client.encode())])
    return int(seq.generate_state(1, dtype=np.uint32)[0])


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
    def from_json(cls, obj: Mapping[str, Any]) -> Ledger:
        params, nbytes = obj["parameters"], obj["bytes"]
        return cls(
            traffic=Traffic(
                down={p: int(params["down"][p.value]) for p in PART_ORDER},
                up={p: int(params["up"][p.value]) for p in PART_ORDER},
            ),
            full_fedavg=int(obj["full_fedavg_parameters"]),
            bytes_down={p: int(nbytes["down"][p.value]) for p in PART_ORDER},
            bytes_up={p: int(nbytes["up"][p.value]) for p in PART_ORDER},
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
    def from_json(cls, obj: Mapping[str, Any]) -> Tally:
        """From state.json (as parsed); a checkpoint written before tallies existed holds none: all zero."""
        attempts, updates = obj.get("round_attempts", {}), obj.get("updates", {})
        return cls(
            {str(k): int(v) for k, v in attempts.items()},
            {str(k): int(v) for k, v in updates.items()},
        )


def _summed(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted({*a, *b})}


@dataclass(frozen=True)
class AcceptedUpdate:
    client: str
    parts: frozenset[Part]
    weight: int  # its FedAvg weight: the images it trained on, or less where a bound lowered it (fedcore.federation.robust)
    mean_loss: float
    images_seen: int
    ledger: Ledger  # the communication this upload adds
    norms: Mapping[Part, float] = field(default_factory=dict)  # L2 norm of each part's delta (taken when clipping)
    clipped: Mapping[Part, float] = field(default_factory=dict)  # factor a part was scaled down by (norm clipping)


@dataclass(frozen=True)
class RoundOutcome:
    round_index: int  # 0-based index of the round that closed
    planned: tuple[str, ...]
    accepted: tuple[AcceptedUpdate, ...]
    averaged_parts: frozenset[Part]
    ledger: Ledger  # this round's communication

    @property
    def mean_loss(self) -> float:
        """Mean local loss, weighted as the updates were averaged (by FedAvg weight): a report moves it no more
        than its update moves the model."""
        total = sum(u.weight for u in self.accepted)
        return sum(u.mean_loss * u.weight for u in self.accepted) / total if total else float("nan")


def payload_bytes_by_part(payload: bytes | bytearray | memoryview, layout: PartLayout) -> dict[Part, int]:
    """A payload's size split over its parts (`PartLayout.split_bytes`)."""
    _, entries, _ = serialization.read_header(payload)
    return layout.split_bytes(len(payload), {name: e.end - e.begin for name, e in entries.items()})


def _transfer_ledger(layout: PartLayout, parts: frozenset[Part], by_part: Mapping[Part, int], *, down: bool) -> Ledger:
    """One payload's worth of communication, and what plain FedAvg would have sent instead (the whole model)."""
    sizes = layout.sizes
    params = {p: sizes[p] if p in parts else 0 for p in PART_ORDER}
    zeros = dict.fromkeys(PART_ORDER, 0)
    return Ledger(
        traffic=Traffic(down=params, up=zeros) if down else Traffic(down=zeros, up=params),
        full_fedavg=layout.total,
        bytes_down=dict(by_part) if down else dict(zeros),
        bytes_up=dict(zeros) if down else dict(by_part),
    )


class Federation:
    """Owns the global model, which clients have held a model, the cumulative ledger, and the tally of outcomes
    that its checkpoints carry (counted by the coordinator, which sets it before it saves)."""

    def __init__(
        self,
        cfg: FederationConfig,
        *,
        global_state: Mapping[str, torch.Tensor] | None = None,
        completed_rounds: int = 0,
        contacted: Collection[str] = (),
        ledger: Ledger | None = None,
        tally: Tally | None = None,
        robust: RobustConfig = RobustConfig(),
        norms: NormHistory | None = None,
        settings: Mapping[str, Any] | None = None,
    ):
        preset(cfg.model)  # validates the name
        self.config = cfg
        model = build_model(cfg.model, seed=cfg.seed)
        self.layout = layout_of(model)
        initial = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        if global_state is not None:
            serialization.check_schema({k: (v.dtype, tuple(v.shape)) for k, v in global_state.items()}, self.layout.specs(PART_ORDER))
            initial = {k: v.detach().float().clone() for k, v in global_state.items()}
        self.global_state: dict[str, torch.Tensor] = initial
        self.completed_rounds = completed_rounds
        self.contacted: set[str] = set(contacted)
        self.ledger = ledger or Ledger()
        self.tally = tally or Tally()
        self.robust = robust
        self.norms = norms or NormHistory()  # adaptive clipping's memory of the last rounds' update norms
        # The driver's settings that may change on resume, as its checkpoints carry them (set by the coordinator
        # before it saves, so that a resumed one can say what changed)
        self.settings: dict[str, Any] = dict(settings or {})
        self._attempts = 0  # rounds opened at the current index (a round without quorum is re-run)

    @property
    def finished(self) -> bool:
        return self.completed_rounds >= self.config.rounds

    def save(self, directory: str | Path) -> None:
        """Checkpoint the global model and the round state (atomically; see fedcore.federation.checkpoint)."""
        checkpoint.save_run(directory, self.global_state, self.run_state())

    def run_state(self) -> checkpoint.RunState:
        """The round state a checkpoint of the federation as it is now commits."""
        return checkpoint.RunState(
            completed_rounds=self.completed_rounds,
            config=self.config.as_json(),
            contacted=tuple(sorted(self.contacted)),
            ledger=self.ledger.as_json(),
            global_file=checkpoint.global_file_name(self.completed_rounds),
            tally=self.tally.as_json(),
            norms=self.norms.as_json(),
            settings=dict(self.settings),
        )

    @classmethod
    def restore(cls, cfg: FederationConfig, directory: str | Path, robust: RobustConfig = RobustConfig()) -> Federation | None:
        """The federation checkpointed in `directory`, or None when it holds none. DifferentRun, naming each one,
        when a setting that defines the run differs from the checkpoint's (`FederationConfig.DEFINING`; the
        robustness settings and `rounds` may differ); ValueError when `cfg.rounds` is fewer than the rounds
        completed. Nothing is written."""
        saved = checkpoint.load_run(directory)
        if saved is None:
            return None
        weights, state = saved
        differences = cfg.differences(state.config)
        if differences:
            raise DifferentRun(directory, differences)
        if cfg.rounds < state.completed_rounds:
            raise ValueError(f"--rounds {cfg.rounds} is fewer than the {state.completed_rounds} rounds the run in {directory} has completed")
        return cls(
            cfg,
            global_state=weights,
            completed_rounds=state.completed_rounds,
            contacted=state.contacted,
            ledger=Ledger.from_json(state.ledger),
            tally=Tally.from_json(state.tally),
            robust=robust,
            norms=NormHistory.from_json(state.norms),
            settings=state.settings,
        )

    def plan(self, available: Sequence[str], *, lost_state: Collection[str] = ()) -> RoundPlan:
        """Plan the next round over the available clients; `lost_state` ones get the whole model again."""
        r = self.completed_rounds
        clients = select_clients(available, self.config.clients_per_round, self.config.seed, r)
        first = [c for c in clients if c not in self.contacted or c in lost_state]
        return plan_round(self.config.strategy, r, clients, round_rng(self.config.seed, r), first_contact=first)

    def open_round(self, plan: RoundPlan, num_examples: Mapping[str, int]) -> OpenRound:
        """A round over `plan`. `num_examples`: the images each client declared it trains on; they bound its report
        and the values of its update, and give its FedAvg weight within `robust`'s bounds."""
        if plan.round_index != self.completed_rounds:
            raise ValueError(f"plan for round {plan.round_index}, but round {self.completed_rounds} is next")
        self._attempts += 1
        return OpenRound(self, plan, num_examples, attempt=self._attempts)

    def _commit(self, outcome: RoundOutcome, aggregate: RunningAggregate) -> None:
        """Apply the round's mean update; NonFiniteAggregate, with nothing changed, when it would make the
        global model NaN or infinite."""
        aggregate.check_applicable(self.global_state)
        aggregate.apply_to(self.global_state)
        self.completed_rounds += 1
        self._attempts = 0
        self.ledger.add(outcome.ledger)
        self.norms = self.norms.after_round(u.norms for u in outcome.accepted)


class OpenRound:
    """One round in progress: payloads serialized once, updates checked and folded as they arrive.

    Thread-safe: transports call `payload`, `mark_sent` and `accept` from many threads."""

    def __init__(self, federation: Federation, plan: RoundPlan, num_examples: Mapping[str, int], *, attempt: int = 1):
        self.federation = federation
        self.attempt = attempt
        self.plan = plan
        self.num_examples = {c: num_examples.get(c, 0) for c in plan.clients}
        missing = [c for c in plan.clients if self.num_examples[c] <= 0]
        if missing:
            raise ValueError(f"clients {missing} have no positive image count")
        robust = federation.robust
        bounded = robust.round_weights(self.num_examples)
        self.weights = dict(bounded.weights)  # FedAvg weights
        self.lowered = bounded.lowered  # client -> the bounds that lowered its weight below its claim
        self.clip_bounds = robust.clip_bounds(federation.norms) if robust.clips else None  # per part; None: no norms taken
        self.aggregate = RunningAggregate(federation.layout, plan.averaged_parts)
        self._reader = serialization.PayloadReader(federation.layout, kind="delta", round_index=plan.round_index, model=federation.config.model)
        self._payloads: dict[frozenset[Part], tuple[bytes, dict[Part, int]]] = {}
        self._accepted: dict[str, AcceptedUpdate] = {}
        self._ledger = Ledger()
        self._downloaded: set[tuple[str, frozenset[Part]]] = set()  # (client, parts) whose download is counted
        self._lock = threading.Lock()
        self._fold_lock = threading.Lock()
        self.closed = False

    @property
    def round_index(self) -> int:
        return self.plan.round_index

    def task(self, client: str) -> TrainTask:
        a = self.plan.assignment(client)
        cfg = self.federation.config
        return TrainTask(
            round_index=self.round_index,
            task_id=f"r{self.round_index}.{self.attempt}-{client}",
            receives=a.receives,
            returns=a.returns,
            private=a.private,
            train=cfg.train,
            seed=task_seed(cfg.seed, self.round_index, client),
        )

    def payload(self, parts: frozenset[Part]) -> bytes:
        """The weights payload for a set of parts; serialized once per round, whatever the number of clients."""
        return self._payload(parts)[0]

    def _payload(self, parts: frozenset[Part]) -> tuple[bytes, dict[Part, int]]:
        with self._lock:
            cached = self._payloads.get(parts)
            if cached is None:
                fed = self.federation
                meta = PayloadMeta(kind="weights", model=fed.config.model, round_index=self.round_index, parts=parts)
                tensors = {n: fed.global_state[n] for n in fed.layout.names(parts)}
                data = serialization.encode(tensors, meta)
                cached = self._payloads[parts] = (data, payload_bytes_by_part(data, fed.layout))
            return cached

    def send_whole_model(self, client: str) -> TrainTask:
        """`client`'s task again, receiving the whole model: it lost the private parts its task counted on
        (another installation took its identity over, or its state is gone). Its update is the same parts."""
        with self._lock:
            self.plan = self.plan.with_whole_model(client)
        return self.task(client)

    def mark_sent(self, client: str) -> Ledger:
        """Count a completed download (returned: what it adds); a client that got the whole model holds one.
        A task's payload counts once: downloading it again (a retry, or a worker inflating the run's traffic)
        adds nothing; the task made anew with the whole model (`send_whole_model`) counts again."""
        a = self.plan.assignment(client)
        _, by_part = self._payload(a.receives)
        event = _transfer_ledger(self.federation.layout, a.receives, by_part, down=True)
        with self._lock:
            if (client, a.receives) in self._downloaded:
                return Ledger()
            self._downloaded.add((client, a.receives))
            self._ledger.add(event)
            if a.receives == frozenset(PART_ORDER):
                self.federation.contacted.add(client)
        return event

    def check_report(self, client: str, images_seen: int) -> None:
        """HeaderError unless a training report's image count is one the task allows: at least 1, at most the
        task's epochs over the client's declared images."""
        most = self.federation.config.train.epochs * self.num_examples[client]
        if not 1 <= images_seen <= most:
            raise HeaderError(
                f"train report images_seen {images_seen} outside 1..{most} "
                f"({self.federation.config.train.epochs} epochs over the {self.num_examples[client]} images {client!r} declared)"
            )

    def value_bound(self, client: str) -> float:
        """The largest |value| this client's update may hold (fedcore.federation.robust): what its training
        reaches on the images it weighs in this round (its claim after the registered size and the share cap)."""
        return self.federation.robust.value_bound(self.federation.config.train, self.weights[client])

    def accept(self, client: str, payload: bytes | bytearray | memoryview, *, mean_loss: float, images_seen: int) -> AcceptedUpdate:
        """Check one client's delta and fold it in (clipped when the round clips); a refused update leaves the
        aggregate untouched."""
        try:
            a = self.plan.assignment(client)
        except KeyError:
            raise NotAssigned(f"client {client!r} has no task in round {self.round_index}") from None
        with self._lock:
            if client in self._accepted:
                raise DuplicateUpdate(f"client {client!r} already delivered its update for round {self.round_index}")
        self.check_report(client, images_seen)
        # Schema once per distinct header; finite values no larger than the task's training can produce.
        decoded = self._reader.read(payload, a.returns, max_magnitude=self.value_bound(client))
        event = _transfer_ledger(self.federation.layout, a.returns, decoded.table.bytes_by_part, down=False)
        with self._fold_lock:
            with self._lock:
                if client in self._accepted:
                    raise DuplicateUpdate(f"client {client!r} already delivered its update for round {self.round_index}")
                if self.closed:
                    raise LateUpdate(f"round {self.round_index} closed before the update of {client!r} was folded")
            norms = self.aggregate.fold_decoded(decoded, float(self.weights[client]), self.clip_bounds)
            bounds = self.clip_bounds or {}
            clipped = {p: bounds[p] / n for p, n in norms.items() if p in bounds and n > bounds[p]}
            update = AcceptedUpdate(client, a.returns, self.weights[client], float(mean_loss), int(images_seen), event, norms, clipped)
            with self._lock:
                self._accepted[client] = update
                self._ledger.add(event)
        return update

    def ledger_so_far(self) -> Ledger:
        """This round's communication up to now (a copy)."""
        with self._lock:
            return self._ledger.copy()

    @property
    def accepted(self) -> list[str]:
        with self._lock:
            return list(self._accepted)

    def seal(self) -> int:
        """Accept nothing more (later uploads are late); returns how many updates are in. Deciding on quorum
        after sealing means the decision and the aggregate see the same updates."""
        with self._fold_lock, self._lock:
            self.closed = True
            return len(self._accepted)

    def close(self) -> RoundOutcome:
        """Seal the round, apply the aggregate to the global model and advance the federation by one round."""
        with self._fold_lock, self._lock:
            if self.federation.completed_rounds != self.round_index:
                raise ValueError(f"round {self.round_index} is already closed")
            self.closed = True
            outcome = RoundOutcome(
                round_index=self.round_index,
                planned=tuple(self.plan.clients),
                accepted=tuple(self._accepted[c] for c in self.plan.clients if c in self._accepted),
                averaged_parts=self.aggregate.reported_parts,
                ledger=self._ledger,
            )
            self.federation._commit(outcome, self.aggregate)
            return outcome
