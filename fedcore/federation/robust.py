"""Bounds on what one client's update can do to the global model: the largest value a trained delta can hold,
FedAvg weights (`fedavg_weights`: each client's n_k in the mean) bounded by registered image counts and capped
per round, and update norm clipping (fixed, or adaptive to the last round's norms).

The value bound leaves every honest update as it is; the weight bounds leave honest FedAvg weights as they are
unless one client holds more than its share of a round's images; clipping is off unless configured (the
paper's FedAvg exactly)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from fedcore.errors import UnregisteredWorker
from fedcore.model.parts import PART_ORDER, Part
from fedcore.model.training import ADAM_BETAS, TrainConfig, steps_per_epoch


def adam_step_bound(beta1: float, beta2: float) -> float:
    """The largest |m_t / sqrt(v_t)| Adam's bias-corrected moments reach, over every step t and gradient
    sequence, in units of lr (Kingma & Ba 2015, sec. 2.1, bound the ratio only in common cases; this is the
    supremum). By Cauchy-Schwarz, |m_t| <= (1-b1) sqrt(sum_k (b1^2/b2)^k) sqrt(v_t / (1-b2)), reached by
    gradients growing as (b2/b1)^k; the bias corrections sqrt(1-b2^t) / (1-b1^t) tend to 1 as t grows. With
    b1 = 0.9, b2 = 0.999 it is 7.27. Honest training stays far below it: on the tiny model the largest value of a
    round's delta is 1.00 to 1.01 times lr x steps (lr 1e-4 and 2e-3, 8 steps)."""
    ratio = beta1 * beta1 / beta2
    if ratio >= 1:
        raise ValueError(f"Adam betas {beta1}, {beta2}: the step is unbounded when beta1^2 >= beta2")
    return (1 - beta1) / math.sqrt((1 - beta2) * (1 - ratio))


# Every value of a round's delta moves by at most this many lr per optimizer step: Adam's bound (7.27 with the
# trainer's betas), rounded up so that float rounding of the parameters and of local - received stays inside.
ADAM_STEP_BOUND = float(math.ceil(adam_step_bound(*ADAM_BETAS)))


def local_steps(train: TrainConfig, num_examples: int) -> int:
    """Optimizer steps of one round on `num_examples` images: every batch, the last partial one too."""
    return train.epochs * steps_per_epoch(num_examples, train.batch_size)


def delta_value_bound(train: TrainConfig, num_examples: int) -> float:
    """The largest |value| a delta trained as `train` says on `num_examples` images can hold: lr x steps x
    ADAM_STEP_BOUND. A value beyond it was not produced by the task's training."""
    return ADAM_STEP_BOUND * train.lr * local_steps(train, num_examples)


def capped_fedavg_weights(fedavg_weights: Mapping[str, int], share: float) -> dict[str, int]:
    """FedAvg weights such that no client holds more than `share` of their sum: the largest ones are lowered
    to a common cap (water-filling), the others kept. Where the cap cannot hold (fewer than 1/share clients)
    every client weighs the same, the smallest weight. Weights stay integers of at least 1 (the cap rounded
    down), so a capped client's share is at most `share`."""
    if share >= 1 or not fedavg_weights:
        return dict(fedavg_weights)
    ordered = sorted(fedavg_weights.values(), reverse=True)
    rest = sum(ordered)
    for capped, largest in enumerate(ordered):  # `capped` clients at the cap, the others as they are
        if capped * share >= 1:
            break
        cap = share * rest / (1 - capped * share)  # the cap t solves t = share * (capped * t + rest)
        if largest <= cap:
            if capped == 0:
                return dict(fedavg_weights)
            whole = max(1, math.floor(cap))
            return {c: min(w, whole) for c, w in fedavg_weights.items()}
        rest -= largest
    smallest = ordered[-1]
    return dict.fromkeys(fedavg_weights, smallest)


WeightBound = Literal["registered", "share"]  # what lowered a client's FedAvg weight (feddiff_weights_bounded_total)
WEIGHT_BOUNDS: tuple[WeightBound, ...] = get_args(WeightBound)


@dataclass(frozen=True)
class FedAvgWeights:
    """The FedAvg weight of each client of a round, and which bounds lowered it below the images it claimed."""

    fedavg_weights: Mapping[str, int]
    lowered: Mapping[str, tuple[WeightBound, ...]]  # only the clients a bound lowered


@dataclass(frozen=True)
class RobustConfig:
    """What the server does against updates that are well-formed but hostile (or broken). Not part of the
    run's identity: it may change across a resume."""

    max_delta_value: float = 0.0  # largest |value| of an update; 0 = what the task's training can reach (delta_value_bound)
    max_weight_share: float = 1.0  # most of a round's planned FedAvg weight one client gets; 1 = no cap
    clip_norm: float = 0.0  # largest L2 norm of one part of an update (scaled down beyond); 0 = no fixed bound
    clip_multiplier: float = 0.0  # adaptive bound: this times the median norm of the part in the last round; 0 = off
    registered: Mapping[str, int] = field(default_factory=dict)  # client -> most images it may weigh; empty = any client, as claimed

    def __post_init__(self) -> None:
        for name in ("max_delta_value", "clip_norm", "clip_multiplier"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} = {value}: expected a finite number >= 0")
        if not 0 < self.max_weight_share <= 1:
            raise ValueError(f"max_weight_share = {self.max_weight_share}: expected a fraction in (0, 1]")
        bad = {c: n for c, n in self.registered.items() if not (isinstance(n, int) and n >= 1)}
        if bad:
            raise ValueError(f"registered sizes {bad}: expected an image count >= 1 per client")

    def check_registered(self, client: str) -> None:
        """UnregisteredWorker when image counts are registered and `client` has none: it has no weight to get."""
        if self.registered and client not in self.registered:
            raise UnregisteredWorker(f"worker {client!r} has no registered size (worker_sizes): it may not take part in this run")

    def bound_fedavg_weights(self, claimed: Mapping[str, int]) -> FedAvgWeights:
        """The FedAvg weights of a round's clients from the images each claimed: at most its registered image count,
        then at most `max_weight_share` of the round's sum (`capped_fedavg_weights`)."""
        granted = {c: self.trained_images(c, n) for c, n in claimed.items()}
        fedavg_weights = capped_fedavg_weights(granted, self.max_weight_share)
        lowered = {
            c: tuple(b for b, lower in zip(WEIGHT_BOUNDS, (granted[c] < n, fedavg_weights[c] < granted[c]), strict=True) if lower)
            for c, n in claimed.items()
            if fedavg_weights[c] < n
        }
        return FedAvgWeights(fedavg_weights, lowered)

    def trained_images(self, client: str, claimed: int) -> int:
        """The images a client's training is taken to run over: its claim, at most its registered image count."""
        return min(claimed, self.registered.get(client, claimed))

    def value_bound(self, train: TrainConfig, images: int) -> float:
        """The largest |value| of an update: `max_delta_value`, else what training as `train` says reaches on
        `images` images (`trained_images`: its claim, at most its registered image count). Not the share cap: that
        lowers a large client's FedAvg weight, not the steps its honest training takes over all its images."""
        return self.max_delta_value or delta_value_bound(train, images)

    @property
    def clips(self) -> bool:
        return self.clip_norm > 0 or self.clip_multiplier > 0

    def clip_bounds(self, history: NormHistory) -> dict[Part, float]:
        """The norm bound of each part this round: the fixed one, the adaptive one (once a round has averaged
        the part), or the smaller of both; a part without a bound is not clipped."""
        bounds: dict[Part, float] = {}
        for p in PART_ORDER:
            candidates = [self.clip_norm] if self.clip_norm > 0 else []
            median = history.median(p)
            if self.clip_multiplier > 0 and median is not None:
                candidates.append(self.clip_multiplier * median)
            if candidates:
                bounds[p] = min(candidates)
        return bounds


@dataclass(frozen=True)
class NormHistory:
    """The L2 norms of each part's updates in the last committed round that averaged it (before clipping),
    which adaptive clipping takes its median of. Checkpointed with the run, so a resume clips the same."""

    norms: Mapping[Part, tuple[float, ...]] = field(default_factory=dict)

    def median(self, part: Part) -> float | None:
        """The lower median (of two norms, the smaller: one outsized update of two cannot raise it), or None
        before any committed round averaged the part."""
        values = self.norms.get(part)
        return statistics.median_low(values) if values else None

    def after_round(self, round_norms: Iterable[Mapping[Part, float]]) -> NormHistory:
        """This history with the parts a committed round averaged replaced by that round's norms (a norm that
        overflowed float32, of a clipped-away update, is left out)."""
        collected: dict[Part, list[float]] = {}
        for update in round_norms:
            for p, n in update.items():
                if math.isfinite(n):
                    collected.setdefault(p, []).append(n)
        return NormHistory({**self.norms, **{p: tuple(sorted(v)) for p, v in collected.items()}})

    def as_json(self) -> dict[str, list[float]]:
        return {p.value: list(self.norms[p]) for p in PART_ORDER if p in self.norms}

    @classmethod
    def from_json(cls, obj: object) -> NormHistory:
        """From state.json's "norms" (as parsed); a checkpoint written before norms were kept holds none.
        ValueError naming the part and its value where one is not a part's list of norms."""
        if not isinstance(obj, Mapping):
            raise ValueError(f"is {obj!r}, expected a JSON object")
        norms: dict[Part, tuple[float, ...]] = {}
        for name, values in obj.items():
            if name not in {p.value for p in Part}:
                raise ValueError(f"{name!r} is no part ({', '.join(PART_ORDER)})")
            if not (isinstance(values, list) and all(_is_norm(v) for v in values)):
                raise ValueError(f"{name} is {values!r}, expected a list of norms (finite numbers >= 0)")
            norms[Part(name)] = tuple(float(v) for v in values)
        return cls(norms)


def _is_norm(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
