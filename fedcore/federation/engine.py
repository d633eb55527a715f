"""The server side of federated rounds without any transport: global model, round plans, payloads, aggregation.

Both the gRPC coordinator and the in-process simulation drive this class, so they compute the same model."""

from __future__ import annotations

import functools
import threading
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fedcore import settings
from fedcore.errors import DifferentRun, DuplicateUpdate, HeaderError, LateUpdate, NotAssigned, SettingsError
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
from fedcore.federation.totals import Ledger, Tally
from fedcore.model.parts import PART_ORDER, Part, PartLayout
from fedcore.model.training import TrainConfig
from fedcore.model.unet import build_model, layout_of, preset
from fedcore.payload import coded, serialization
from fedcore.payload.codecs import Codec, Encoded, Identity, compression_codec
from fedcore.payload.initial import state_digest
from fedcore.payload.serialization import PayloadMeta


@dataclass(frozen=True)
class FederationConfig:
    strategy: Strategy
    model: str = "paper-fmnist"  # model preset
    rounds: int = 15  # R
    clients_per_round: int = 0  # 0 = every available client, else a seeded sample
    seed: int = 0  # seeds the initial model, the plans, the samples and every client's training
    train: TrainConfig = TrainConfig()  # sent to the clients with each task
    compression: Codec = Identity()  # how clients code their deltas (sent with each task; fedcore.payload.codecs)

    # What a resumed run must share with its checkpoint to compute what the uninterrupted run would have: the
    # model and how rounds are planned, sampled, seeded and trained. `rounds` is not among them: a run may be
    # extended, or shortened to the rounds it has completed.
    DEFINING = ("strategy", "model", "clients_per_round", "seed", "epochs", "batch_size", "lr", "loss", "compression")

    @classmethod
    def from_settings(
        cls, *, strategy: str, model: str, rounds: int, clients_per_round: int, seed: int,
        epochs: int, batch_size: int, lr: float, loss: str, compression: str = "none", compression_block: int = 0,
    ) -> FederationConfig:  # fmt: skip
        """From flat settings (flags, YAML): the one place that nests them; SettingsError for a training
        setting outside the range a worker runs, or a compression_block the codec cannot take."""
        train = settings.build(TrainConfig, {"epochs": epochs, "batch_size": batch_size, "lr": lr, "loss": loss})
        try:
            codec = compression_codec(compression, compression_block)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        return cls(Strategy(strategy), model, rounds, clients_per_round, seed, train, codec)

    def record(self) -> checkpoint.RunConfig:
        """The run's settings as its checkpoints record them (a resumed run must match those in `DEFINING`)."""
        return checkpoint.RunConfig(
            strategy=self.strategy.value,
            model=self.model,
            rounds=self.rounds,
            clients_per_round=self.clients_per_round,
            seed=self.seed,
            epochs=self.train.epochs,
            batch_size=self.train.batch_size,
            lr=self.train.lr,
            loss=self.train.loss,
            compression=self.compression.name,
        )

    def as_json(self) -> dict[str, object]:
        """`record()` as state.json holds it: compression only when there is some."""
        return self.record().as_json()

    def differences(self, saved: checkpoint.RunConfig) -> list[tuple[str, object, object]]:
        """Each setting that defines a run (`DEFINING`) whose value in `saved` (a checkpoint's) differs from this
        config's: (key, saved value, this value)."""
        now = self.record()
        return [(key, getattr(saved, key), getattr(now, key)) for key in self.DEFINING if getattr(saved, key) != getattr(now, key)]


def task_seed(seed: int, round_index: int, client: str) -> int:
    """The training seed of one client in one round, the same wherever that client runs."""
    seq = np.random.SeedSequence([seed, round_index, zlib.crc32(client.encode())])
    return int(seq.generate_state(1, dtype=np.uint32)[0])


Direction = Literal["down", "up"]  # of a transfer: to a client, or from it


@dataclass(frozen=True)
class AcceptedUpdate:
    client: str
    parts: frozenset[Part]
    fedavg_weight: int  # its FedAvg weight: the images it trained on, or less where a bound lowered it (fedcore.federation.robust)
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
        total = sum(u.fedavg_weight for u in self.accepted)
        return sum(u.mean_loss * u.fedavg_weight for u in self.accepted) / total if total else float("nan")


SHARED_STEM = "shared"  # the shared model of a run with lossy coding, checkpointed beside the global one


def _holds(held: tuple[int, frozenset[Part]] | None, version: int, parts: frozenset[Part]) -> bool:
    """Whether a client's holding is `version` of at least `parts`."""
    return held is not None and held[0] == version and parts <= held[1]


def payload_bytes_by_part(payload: bytes | bytearray | memoryview, layout: PartLayout) -> dict[Part, int]:
    """A payload's size split over its parts (`PartLayout.split_bytes`), plain or coded; one without tensors
    (the shared model unchanged) over the parts its metadata names, in proportion to their tensors."""
    metadata, entries, _ = serialization.read_header(payload)
    if not entries:
        return layout.split_bytes(len(payload), dict.fromkeys(layout.names(PayloadMeta.from_metadata(metadata).parts), 0))
    return layout.split_bytes(len(payload), coded.tensor_bytes({name: (e.begin, e.end) for name, e in entries.items()}))


def transfer_ledger(layout: PartLayout, direction: Direction, parts: frozenset[Part], by_part: Mapping[Part, int]) -> Ledger:
    """One payload's worth of communication: the parameters of `parts` and the payload's bytes by part
    (`payload_bytes_by_part`), and what plain FedAvg would have sent instead (the whole model). The coordinator's
    round and the worker count a transfer with it, both ends alike."""
    sizes = layout.sizes
    params = {p: sizes[p] if p in parts else 0 for p in PART_ORDER}
    zeros = dict.fromkeys(PART_ORDER, 0)
    down = direction == "down"
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
        settings: checkpoint.ResumableSettings | None = None,
        shared: Mapping[str, torch.Tensor] | None = None,
    ):
        preset(cfg.model)  # validates the name
        self.config = cfg
        model = build_model(cfg.model, seed=cfg.seed)
        self.layout = layout_of(model)
        initial = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        if global_state is not None:
            serialization.check_schema({k: (v.dtype, tuple(v.shape)) for k, v in global_state.items()}, self.layout.specs(PART_ORDER))
            initial = {k: v.detach().float().clone() for k, v in global_state.items()}
        seeded = global_state is None and shared is None  # version 0 is the model the run's seed builds
        self.global_state: dict[str, torch.Tensor] = initial
        self.completed_rounds = completed_rounds
        self.contacted: set[str] = set(contacted)
        self.ledger = ledger or Ledger()
        self.tally = tally or Tally()
        self.robust = robust
        self.norms = norms or NormHistory()  # adaptive clipping's memory of the last rounds' update norms
        # The driver's settings that may change on resume, as its checkpoints carry them (set by the coordinator
        # before it saves, so that a resumed one can say what changed)
        self.settings = settings or checkpoint.ResumableSettings()
        self._attempts = 0  # rounds opened at the current index (a round without quorum is re-run)
        # With a lossy codec the downloads are coded too: `shared` is the model as the clients reconstruct it,
        # bit for bit, version `shared_version`; `holds` says which version and parts each client holds
        # (a download counted). The global model's lead over it is carried into the next round's change.
        # In a fresh run version 0 is the initial model, which a client builds from the seed instead of
        # downloading it (fedcore.payload.initial): `seed_digest` checks its build; `unseeded` are the clients
        # whose build differed (their downloads are the values). A resumed run or one started from a given
        # model has none.
        self.shared: dict[str, torch.Tensor] | None = None
        self.seed_digest: str | None = None
        if not isinstance(cfg.compression, Identity):
            source = self.global_state if shared is None else shared
            self.shared = {k: source[k].detach().float().clone() for k in self.global_state}
            if seeded:
                self.seed_digest = state_digest(self.shared, self.layout)
        self.shared_version = 0
        self.holds: dict[str, tuple[int, frozenset[Part]]] = {}
        self.unseeded: set[str] = set()

    @property
    def finished(self) -> bool:
        return self.completed_rounds >= self.config.rounds

    def save(self, directory: str | Path) -> None:
        """Checkpoint the global model and the round state (atomically; see fedcore.federation.checkpoint)."""
        self.save_shared(directory)
        checkpoint.save_run(directory, self.global_state, self.run_state())

    def save_shared(self, directory: str | Path) -> None:
        """In a run with coded downloads, the shared model of this round, before the run's state that names the
        round: a resumed run finds it."""
        if self.shared is not None:
            checkpoint.save_private(directory, SHARED_STEM, self.completed_rounds, self.shared)

    def run_state(self) -> checkpoint.RunState:
        """The round state a checkpoint of the federation as it is now commits."""
        return checkpoint.RunState(
            completed_rounds=self.completed_rounds,
            config=self.config.record(),
            contacted=tuple(sorted(self.contacted)),
            ledger=self.ledger.copy(),  # later rounds add to the federation's, not to the checkpoint's
            global_file=checkpoint.global_file_name(self.completed_rounds),
            tally=self.tally,
            norms=self.norms,
            settings=self.settings,
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
        shared = checkpoint.load_private(directory, SHARED_STEM, state.completed_rounds)
        if not isinstance(cfg.compression, Identity) and (shared is None or shared[1] != state.completed_rounds):
            raise ValueError(
                f"{directory}: no shared model of round {state.completed_rounds} ({SHARED_STEM}-r{state.completed_rounds:04d}.safetensors) to resume with"
            )
        return cls(
            cfg,
            global_state=weights,
            completed_rounds=state.completed_rounds,
            contacted=state.contacted,
            ledger=state.ledger.copy(),
            tally=state.tally,
            robust=robust,
            norms=state.norms,
            settings=state.settings,
            shared=shared[0] if shared else None,
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
        return OpenRound(self, plan, num_examples, attempt=self._attempts, downlink=self._advance_shared())

    def _advance_shared(self) -> dict[str, Encoded] | None:
        """The coded change from the shared model to the global one, applied to the shared model as a client
        applies it (a new version); None in a run without lossy coding, and when the global model equals the
        shared one (round 1 of a fresh run, a round opened again after an attempt without quorum): no new
        version, the clients that hold the current one apply nothing."""
        if self.shared is None or all(torch.equal(self.global_state[n], s) for n, s in self.shared.items()):
            return None
        codec = self.config.compression
        encoded = codec.encode_all({n: self.global_state[n] - s for n, s in self.shared.items()})
        decoded = codec.decode_all({n: e.tensors for n, e in encoded.items()}, {n: e.shape for n, e in encoded.items()})
        for n, s in self.shared.items():
            s.add_(decoded[n])
        self.shared_version += 1
        return encoded

    def forget_holdings(self, client: str) -> None:
        """`client` holds no shared model any more (a new process): its next download is the values, or a change
        from version 0 while it may build that from the seed (`can_hold`)."""
        self.holds.pop(client, None)

    def refused_shared(self, client: str) -> None:
        """`client` refused a download of the shared model (MissingSharedState): it holds no version the
        coordinator knows of, and is never offered the seed again (its build of version 0 differed from this
        one, or it applied another download than was counted): its downloads are the values from now on."""
        self.forget_holdings(client)
        self.unseeded.add(client)

    def can_hold(self, client: str, version: int, parts: frozenset[Part]) -> bool:
        """Whether `client` holds `version` of the shared model's `parts`, or can build it: version 0 from the
        run's seed, unless its build differed once."""
        seeded = version == 0 and self.seed_digest is not None and client not in self.unseeded
        return seeded or _holds(self.holds.get(client), version, parts)

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

    def __init__(
        self, federation: Federation, plan: RoundPlan, num_examples: Mapping[str, int], *, attempt: int = 1, downlink: Mapping[str, Encoded] | None = None
    ):
        self.federation = federation
        self.downlink = downlink  # the coded change since the last version of the shared model (lossy runs; None: unchanged)
        self.version = federation.shared_version
        self.base = self.version - 1 if downlink is not None else self.version  # the version the change is from
        # In a run with lossy coding, clients that hold (or can build) the base version of every part they
        # receive get the change (nothing when unchanged), the others the values
        lossy = federation.shared is not None
        self._changes = {c for c in plan.clients if lossy and federation.can_hold(c, self.base, plan.assignment(c).receives)}
        self.attempt = attempt
        self.plan = plan
        self.num_examples = {c: num_examples.get(c, 0) for c in plan.clients}
        missing = [c for c in plan.clients if self.num_examples[c] <= 0]
        if missing:
            raise ValueError(f"clients {missing} have no positive image count")
        robust = federation.robust
        bounded = robust.bound_fedavg_weights(self.num_examples)
        self.fedavg_weights = dict(bounded.fedavg_weights)
        self.lowered = bounded.lowered  # client -> the bounds that lowered its weight below its claim
        self.clip_bounds = robust.clip_bounds(federation.norms) if robust.clips else None  # per part; None: no norms taken
        self.aggregate = RunningAggregate(federation.layout, plan.averaged_parts)
        self._reader = serialization.PayloadReader(federation.layout, kind="delta", wire_round=plan.round_index, model=federation.config.model)
        self._payloads: dict[tuple[frozenset[Part], bool], tuple[bytes, dict[Part, int]]] = {}
        self._accepted: dict[str, AcceptedUpdate] = {}
        self._ledger = Ledger()
        self._downloaded: set[tuple[str, frozenset[Part], bool]] = set()  # (client, parts, a change) whose download is counted
        self._lock = threading.Lock()
        self._fold_lock = threading.Lock()
        self._decode_lock = threading.Lock()
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
            private_parts=a.private_parts,
            train=cfg.train,
            seed=task_seed(cfg.seed, self.round_index, client),
            codec=cfg.compression,
        )

    def payload(self, parts: frozenset[Part]) -> bytes:
        """The weights payload of the values of a set of parts; serialized once per round, whatever the number
        of clients."""
        return self._payload(parts, change=False)[0]

    def payload_for(self, client: str) -> bytes:
        """The weights payload of `client`'s task: the values of the parts it receives, or in a run with lossy
        coding and when it holds (or can build from the seed) the version before, their coded change (nothing
        when the round made no new version)."""
        return self._payload_of(client)[0]

    def _payload_of(self, client: str) -> tuple[bytes, dict[Part, int]]:
        receives = self.plan.assignment(client).receives
        with self._lock:
            change = client in self._changes
        return self._payload(receives, change=change)

    def _payload(self, parts: frozenset[Part], *, change: bool) -> tuple[bytes, dict[Part, int]]:
        with self._lock:
            cached = self._payloads.get((parts, change))
            if cached is None:
                data = self._change(parts) if change else self._values(parts)
                cached = self._payloads[(parts, change)] = (data, payload_bytes_by_part(data, self.federation.layout))
            return cached

    def _values(self, parts: frozenset[Part]) -> bytes:
        """The parts' values: the shared model's in a run with lossy coding (version `version`), else the global's."""
        fed = self.federation
        source = fed.global_state if fed.shared is None else fed.shared
        version = -1 if fed.shared is None else self.version
        meta = PayloadMeta(kind="weights", model=fed.config.model, wire_round=self.round_index, parts=parts, version=version)
        return serialization.encode({n: source[n] for n in fed.layout.names(parts)}, meta)

    def _change(self, parts: frozenset[Part]) -> bytes:
        """The parts' coded change from version `base` of the shared model to version `version`: no tensors when
        they are the same version (unchanged). From version 0 of a fresh run, with the seed that builds version 0
        and its digest (fedcore.payload.initial), for the clients that hold none."""
        fed, downlink = self.federation, self.downlink
        cfg = fed.config
        digest = fed.seed_digest if self.base == 0 else None  # version 0 built from the seed (a fresh run)
        meta = PayloadMeta(
            kind="weights",
            model=cfg.model,
            wire_round=self.round_index,
            parts=parts,
            codec=cfg.compression.name,
            version=self.version,
            base=self.base,
            seed=cfg.seed if digest else -1,
            digest=digest or "",
        )
        if downlink is None:
            return serialization.encode({}, meta)
        return coded.encode({}, meta, {n: downlink[n] for n in fed.layout.names(parts)})

    def send_whole_model(self, client: str) -> TrainTask:
        """`client`'s task again, receiving the whole model: it lost the private parts its task counted on
        (another installation took its identity over, or its state is gone). Its update is the same parts."""
        with self._lock:
            self.plan = self.plan.with_whole_model(client)
            if not self.federation.can_hold(client, self.base, self.plan.assignment(client).receives):
                self._changes.discard(client)
        return self.task(client)

    def send_values(self, client: str) -> bool:
        """`client`'s download is the values of its parts, not their change: it holds no shared model (a new
        process; its holdings forgotten), unless it can build the change's base from the seed. The task is the
        same. True when its download was the change and is now the values."""
        with self._lock:
            if client not in self._changes or self.federation.can_hold(client, self.base, self.plan.assignment(client).receives):
                return False
            self._changes.discard(client)
            return True

    def mark_sent(self, client: str) -> Ledger:
        """Count a completed download (returned: what it adds); a client that got the whole model holds one.
        A task's payload counts once: downloading it again (a retry, or a worker inflating the run's traffic)
        adds nothing; the task made anew with the whole model (`send_whole_model`) counts again."""
        a = self.plan.assignment(client)
        _, by_part = self._payload_of(client)
        event = transfer_ledger(self.federation.layout, "down", a.receives, by_part)
        with self._lock:
            if self.federation.shared is not None:  # the client holds this version of the parts it received
                self.federation.holds[client] = (self.version, a.receives)
            key = (client, a.receives, client in self._changes)
            if key in self._downloaded:
                return Ledger()
            self._downloaded.add(key)
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
        reaches on the images it trains on (its claim, at most its registered image count)."""
        robust = self.federation.robust
        return robust.value_bound(self.federation.config.train, robust.trained_images(client, self.num_examples[client]))

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
        codec, bound = self.federation.config.compression, self.value_bound(client)
        if isinstance(codec, Identity):
            # Schema once per distinct header; finite values no larger than the task's training can produce.
            decoded = self._reader.read(payload, a.returns, max_magnitude=bound)
            fold = functools.partial(self.aggregate.fold_decoded, decoded)
            return self._fold(client, decoded.table.bytes_by_part, fold, mean_loss, images_seen)
        with self._decode_lock:  # one decoded float32 update at a time, whatever the uploads in progress
            tensors, by_part = coded.decode(self._reader, codec, payload, a.returns, max_magnitude=bound)
            fold = functools.partial(self.aggregate.fold_tensors, tensors, a.returns)
            return self._fold(client, by_part, fold, mean_loss, images_seen)

    def _fold(
        self,
        client: str,
        by_part: Mapping[Part, int],
        fold: Callable[[float, Mapping[Part, float] | None], dict[Part, float]],
        mean_loss: float,
        images_seen: int,
    ) -> AcceptedUpdate:
        """Fold a checked update in with `fold(weight, clip bounds)` (returning its norms) unless the round has
        it already or has closed; counted as `by_part` bytes."""
        a = self.plan.assignment(client)
        event = transfer_ledger(self.federation.layout, "up", a.returns, by_part)
        with self._fold_lock:
            with self._lock:
                if client in self._accepted:
                    raise DuplicateUpdate(f"client {client!r} already delivered its update for round {self.round_index}")
                if self.closed:
                    raise LateUpdate(f"round {self.round_index} closed before the update of {client!r} was folded")
            norms = fold(float(self.fedavg_weights[client]), self.clip_bounds)
            bounds = self.clip_bounds or {}
            clipped = {p: bounds[p] / n for p, n in norms.items() if p in bounds and n > bounds[p]}
            update = AcceptedUpdate(client, a.returns, self.fedavg_weights[client], float(mean_loss), int(images_seen), event, norms, clipped)
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
