"""Tests for fedcore.federation.robust: Adam's bound on a delta's values, FedAvg weights capped per round, norm clipping
bounds and their history."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fedcore.errors import UnregisteredWorker
from fedcore.federation.robust import (
    ADAM_STEP_BOUND,
    FedAvgWeights,
    NormHistory,
    RobustConfig,
    adam_step_bound,
    capped_fedavg_weights,
    delta_value_bound,
    local_steps,
)
from fedcore.model.parts import Part
from fedcore.model.training import ADAM_BETAS, TrainConfig

ENC, MID, DEC = Part.ENCODER, Part.BOTTLENECK, Part.DECODER


def _adam_steps(gradients: torch.Tensor, lr: float = 1e-3) -> torch.Tensor:
    """|each step| torch's Adam takes on float64 parameters fed `gradients` (steps, parameters), in units of lr:
    one independent gradient sequence per parameter, all in one optimizer."""
    p = torch.zeros(gradients.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=lr, betas=ADAM_BETAS, eps=1e-300)
    steps = torch.empty_like(gradients)
    for t, g in enumerate(gradients):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        steps[t] = (p.detach() - before).abs() / lr
    return steps


def test_adams_largest_step_is_reached_by_growing_gradients_and_never_passed() -> None:
    b1, b2 = ADAM_BETAS
    n = 4000
    worst = 1e150 * (b1 / b2) ** torch.arange(n - 1, -1, -1, dtype=torch.float64)  # the Cauchy-Schwarz equality case (scaled: no underflow)
    rng = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 3, n, dtype=torch.float64)[:, None]  # growing gradients, the kind that push the ratio up
    random = torch.randn(n, 16, generator=rng, dtype=torch.float64) * scales
    shuffled = random[torch.randperm(n, generator=rng)]  # the same magnitudes in no order

    steps = _adam_steps(torch.cat([worst[:, None], random, shuffled], dim=1))

    assert adam_step_bound(b1, b2) == pytest.approx(7.2703, abs=1e-4)
    assert ADAM_STEP_BOUND == 8.0
    assert 7.0 < float(steps[-1, 0]) <= adam_step_bound(b1, b2)
    assert float(steps.max()) <= adam_step_bound(b1, b2)
    with pytest.raises(ValueError, match="unbounded"):
        adam_step_bound(0.99, 0.9)


def test_a_trained_delta_stays_within_the_value_bound() -> None:
    from fedcore.model.diffusion import Schedule
    from fedcore.model.training import LocalTrainer, SpeedConfig
    from fedcore.model.unet import build_model

    model = build_model("tiny", seed=0)
    trainer = LocalTrainer(model, Schedule(), SpeedConfig(threads=1))
    data = trainer.prepare_data(torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=2e-3)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}

    result = trainer.train(data, cfg, seed=1)
    largest = max(float((t - before[n]).abs().max()) for n, t in model.state_dict().items())

    assert result.steps == local_steps(cfg, 20) == 6
    assert cfg.lr * result.steps * 0.5 < largest <= delta_value_bound(cfg, 20)


def test_the_value_bound_is_lr_times_steps_times_eight() -> None:
    paper = TrainConfig(epochs=5, batch_size=128, lr=1e-4)

    assert local_steps(paper, 6000) == 5 * 47  # the last partial batch is a step too
    assert delta_value_bound(paper, 6000) == pytest.approx(8 * 1e-4 * 235)
    assert RobustConfig().value_bound(paper, 6000) == delta_value_bound(paper, 6000)
    assert RobustConfig(max_delta_value=0.01).value_bound(paper, 6000) == 0.01


@pytest.mark.parametrize(
    ("fedavg_weights", "share", "expected"),
    [
        ({"a": 100, "b": 10, "c": 10}, 1.0, {"a": 100, "b": 10, "c": 10}),  # no cap
        ({"a": 30, "b": 30, "c": 40}, 0.5, {"a": 30, "b": 30, "c": 40}),  # within the cap: untouched
        ({"a": 100, "b": 10, "c": 10}, 0.5, {"a": 20, "b": 10, "c": 10}),  # 20 / 40 = one half
        ({"a": 10**12, "b": 6000, "c": 6000}, 0.4, {"a": 8000, "b": 6000, "c": 6000}),  # 8000 / 20000
        ({"a": 10**12, "b": 6000, "c": 6000}, 0.25, {"a": 6000, "b": 6000, "c": 6000}),  # three cannot stay under 1/4: equal FedAvg weights
        ({"a": 90, "b": 80, "c": 5, "d": 5}, 0.3, {"a": 7, "b": 7, "c": 5, "d": 5}),  # two capped: 7 / 24 (the cap 7.5 rounded down)
        ({"a": 100, "b": 10}, 0.4, {"a": 10, "b": 10}),  # two clients cannot both stay under 0.4: equal FedAvg weights
    ],
)
def test_no_client_weighs_more_than_its_share(fedavg_weights: dict[str, int], share: float, expected: dict[str, int]) -> None:
    capped = capped_fedavg_weights(fedavg_weights, share)

    assert capped == expected
    if len(fedavg_weights) * share >= 1:
        assert max(capped.values()) <= share * sum(capped.values())


def test_capped_fedavg_weights_hold_for_random_claims() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        k = int(torch.randint(2, 9, (1,), generator=g))
        fedavg_weights = {str(i): int(w) for i, w in enumerate(torch.randint(1, 10**6, (k,), generator=g))}
        share = float(torch.empty(1).uniform_(1 / k, 1, generator=g))

        capped = capped_fedavg_weights(fedavg_weights, share)

        assert max(capped.values()) <= share * sum(capped.values()) + 1e-9
        assert all(1 <= capped[c] <= w for c, w in fedavg_weights.items())
        assert all(capped[c] == max(capped.values()) for c in fedavg_weights if capped[c] != fedavg_weights[c]), "lowered to one common cap"


@pytest.mark.parametrize("claim", [10**12, 2**64 - 1])
def test_an_absurd_claim_is_held_to_the_registered_size_and_the_share(claim: int) -> None:
    registered = RobustConfig(registered={"mallory": 6000, "alice": 6000, "bob": 3000})
    capped = RobustConfig(max_weight_share=0.5)
    both = RobustConfig(max_weight_share=0.5, registered={"mallory": 9000, "alice": 6000, "bob": 3000})
    claims = {"mallory": claim, "alice": 6000, "bob": 3000}

    assert registered.bound_fedavg_weights(claims) == FedAvgWeights({"mallory": 6000, "alice": 6000, "bob": 3000}, {"mallory": ("registered",)})
    assert capped.bound_fedavg_weights(claims) == FedAvgWeights({"mallory": 9000, "alice": 6000, "bob": 3000}, {"mallory": ("share",)})
    assert both.bound_fedavg_weights(claims).lowered == {"mallory": ("registered",)}, "9000 of 18000 is within the share"
    assert RobustConfig().bound_fedavg_weights(claims).fedavg_weights == claims, "no bound configured: as claimed"


def test_honest_claims_keep_their_weights_and_a_shrunk_shard_weighs_less() -> None:
    policy = RobustConfig(max_weight_share=0.5, registered={"alice": 6000, "bob": 3000, "carol": 3000})

    assert policy.bound_fedavg_weights({"alice": 6000, "bob": 3000, "carol": 3000}) == FedAvgWeights({"alice": 6000, "bob": 3000, "carol": 3000}, {})
    assert policy.bound_fedavg_weights({"alice": 2000, "bob": 3000, "carol": 3000}).lowered == {}, "a claim under its size is kept"
    assert policy.bound_fedavg_weights({"alice": 9000, "bob": 1000, "carol": 1000}) == FedAvgWeights(
        {"alice": 2000, "bob": 1000, "carol": 1000}, {"alice": ("registered", "share")}
    ), "both bounds lowered it: 6000 registered, then one half of the round"
    assert policy.bound_fedavg_weights({"alice": 6000, "bob": 3000}).fedavg_weights == {"alice": 3000, "bob": 3000}, "an honest majority is capped too"


def test_an_unregistered_client_is_refused_only_where_sizes_are_registered() -> None:
    RobustConfig().check_registered("anyone")
    RobustConfig(registered={"alice": 10}).check_registered("alice")
    with pytest.raises(UnregisteredWorker, match="'mallory' has no registered size"):
        RobustConfig(registered={"alice": 10}).check_registered("mallory")
    with pytest.raises(ValueError, match="registered sizes"):
        RobustConfig(registered={"alice": 0})


def test_clip_bounds_are_fixed_adaptive_or_the_smaller_of_both() -> None:
    history = NormHistory({DEC: (1.0, 2.0, 100.0), MID: (3.0, 5.0)})

    assert RobustConfig().clip_bounds(history) == {} and not RobustConfig().clips
    assert RobustConfig(clip_norm=2.5).clip_bounds(NormHistory()) == {ENC: 2.5, MID: 2.5, DEC: 2.5}
    assert RobustConfig(clip_multiplier=2).clip_bounds(history) == {MID: 6.0, DEC: 4.0}  # the lower median of two is the smaller
    assert RobustConfig(clip_norm=5.0, clip_multiplier=2).clip_bounds(history) == {ENC: 5.0, MID: 5.0, DEC: 4.0}
    assert RobustConfig(clip_multiplier=2).clip_bounds(NormHistory()) == {}, "no earlier round: nothing to be adaptive to"


def test_the_norm_history_keeps_the_last_round_of_each_part_and_survives_json() -> None:
    history = NormHistory().after_round([{ENC: 4.0, DEC: 1.0}, {DEC: 3.0}, {DEC: 1e6}])
    later = history.after_round([{DEC: 2.0}])

    assert history.median(DEC) == 3.0 and history.median(ENC) == 4.0 and history.median(MID) is None
    assert later.norms == {ENC: (4.0,), DEC: (2.0,)}, "a part this round did not average keeps its earlier norms"
    assert later.after_round([{DEC: math.inf}, {DEC: 5.0}]).norms[DEC] == (5.0,), "an overflowed norm is not kept"
    assert NormHistory.from_json(later.as_json()) == later
    assert NormHistory.from_json({}) == NormHistory()


@pytest.mark.parametrize(
    "bad", [{"max_delta_value": -1.0}, {"clip_norm": math.inf}, {"clip_multiplier": math.nan}, {"max_weight_share": 0.0}, {"max_weight_share": 1.5}]
)
def test_robust_config_refuses_out_of_range_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        RobustConfig(**bad)
