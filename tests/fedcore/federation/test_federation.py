"""Tests for fedcore.federation.engine and fedcore.federation.client: one round driven by hand, payloads, refusals, the ledger."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fedcore.errors import (
    DuplicateUpdate,
    HeaderError,
    LateUpdate,
    MissingPrivateState,
    NonFiniteAggregate,
    NotAssigned,
    SchemaError,
    ValueOutOfBounds,
    WrongRound,
)
from fedcore.federation.aggregate import delta
from fedcore.federation.client import ClientRuntime, TrainTask
from fedcore.federation.engine import Federation, FederationConfig, payload_bytes_by_part, task_seed
from fedcore.federation.robust import NormHistory, RobustConfig
from fedcore.federation.roundlog import round_record
from fedcore.federation.strategies import Strategy, plan_traffic
from fedcore.federation.totals import Ledger, Tally
from fedcore.model.diffusion import Schedule
from fedcore.model.parts import ALL_PARTS, PART_ORDER, Part
from fedcore.model.training import LocalTrainer, SpeedConfig, TrainConfig
from fedcore.model.unet import build_model
from fedcore.payload.serialization import PayloadMeta, decode, encode

ENC, MID, DEC = Part.ENCODER, Part.BOTTLENECK, Part.DECODER
NUM_EXAMPLES = {"alice": 30, "bob": 10}


def _federation(strategy: Strategy = Strategy.FULL, **kw) -> Federation:
    return Federation(FederationConfig(strategy=strategy, model="tiny", rounds=3, seed=3, **kw))


def _delta_payload(fed: Federation, round_index: int, parts, seed: int, scale: float = 1e-4) -> tuple[bytes, dict]:
    g = torch.Generator().manual_seed(seed)
    tensors = {n: scale * torch.randn(fed.global_state[n].shape, generator=g) for n in fed.layout.names(parts)}
    meta = PayloadMeta(kind="delta", model="tiny", wire_round=round_index, parts=frozenset(parts))
    return encode(tensors, meta), tensors


def test_a_two_client_full_round_by_hand() -> None:
    fed = _federation()
    initial = {n: t.clone() for n, t in fed.global_state.items()}
    plan = fed.plan(["bob", "alice"])
    round_ = fed.open_round(plan, NUM_EXAMPLES)

    # One payload per receive set, whatever the number of clients.
    payloads = {c: round_.payload(plan.assignment(c).receives) for c in plan.clients}
    assert plan.clients == ["alice", "bob"]
    assert payloads["alice"] is payloads["bob"]
    weights = decode(payloads["alice"], fed.layout, kind="weights", parts=ALL_PARTS, wire_round=0, model="tiny")
    assert all(torch.equal(weights[n], initial[n]) for n in initial)

    for c in plan.clients:
        round_.mark_sent(c)
    updates = {c: _delta_payload(fed, 0, ALL_PARTS, seed=i) for i, c in enumerate(plan.clients)}
    for c, (data, _) in updates.items():
        accepted = round_.accept(c, data, mean_loss=0.5, images_seen=2 * NUM_EXAMPLES[c])
        assert accepted.fedavg_weight == NUM_EXAMPLES[c] and accepted.parts == ALL_PARTS
    outcome = round_.close()

    # close applies the weighted mean: global += (30 d_alice + 10 d_bob) / 40
    for n, before in initial.items():
        expected = before.double() + (30 * updates["alice"][1][n].double() + 10 * updates["bob"][1][n].double()) / 40
        torch.testing.assert_close(fed.global_state[n].double(), expected, rtol=0, atol=1e-6)
    assert fed.completed_rounds == 1
    assert fed.contacted == {"alice", "bob"}
    assert outcome.averaged_parts == ALL_PARTS
    assert [u.client for u in outcome.accepted] == ["alice", "bob"]
    assert outcome.mean_loss == pytest.approx(0.5)
    # The paper's count for the plan, and bytes that add up to the payloads.
    assert outcome.ledger.traffic == plan_traffic(plan, fed.layout.sizes)
    assert outcome.ledger.full_fedavg == 2 * 2 * fed.layout.total
    assert sum(outcome.ledger.bytes_down.values()) == 2 * len(payloads["alice"])
    assert sum(outcome.ledger.bytes_up.values()) == sum(len(d) for d, _ in updates.values())
    assert fed.ledger.traffic == outcome.ledger.traffic


def test_accept_refuses_duplicates_strangers_and_wrong_parts() -> None:
    fed = _federation(Strategy.UDEC)
    plan = fed.plan(["alice", "bob"])
    round_ = fed.open_round(plan, NUM_EXAMPLES)
    good, _ = _delta_payload(fed, 0, {DEC}, seed=0)
    round_.accept("alice", good, mean_loss=0.1, images_seen=30)
    sums_before = {n: t.clone() for n, t in round_.aggregate.mean().items()}

    with pytest.raises(DuplicateUpdate, match="'alice' already delivered"):
        round_.accept("alice", good, mean_loss=0.1, images_seen=30)
    with pytest.raises(NotAssigned, match="'mallory' has no task in round 0"):
        round_.accept("mallory", good, mean_loss=0.1, images_seen=30)
    with pytest.raises(NotAssigned, match="payload holds parts"):
        round_.accept("bob", _delta_payload(fed, 0, ALL_PARTS, seed=1)[0], mean_loss=0.1, images_seen=10)
    with pytest.raises(WrongRound):
        round_.accept("bob", _delta_payload(fed, 1, {DEC}, seed=1)[0], mean_loss=0.1, images_seen=10)

    after = round_.aggregate.mean()
    assert all(torch.equal(after[n], sums_before[n]) for n in sums_before)
    assert round_.accepted == ["alice"]
    assert round_.aggregate.reported_parts == {DEC} and round_.aggregate.weight(DEC) == round_.fedavg_weights["alice"]


def test_late_update_after_close_is_refused() -> None:
    fed = _federation()
    plan = fed.plan(["alice", "bob"])
    round_ = fed.open_round(plan, NUM_EXAMPLES)
    round_.accept("alice", _delta_payload(fed, 0, ALL_PARTS, seed=0)[0], mean_loss=0.1, images_seen=30)
    round_.close()

    with pytest.raises(LateUpdate):
        round_.accept("bob", _delta_payload(fed, 0, ALL_PARTS, seed=1)[0], mean_loss=0.1, images_seen=10)
    with pytest.raises(ValueError, match="already closed"):
        round_.close()


def test_open_round_checks_the_plan_and_weights() -> None:
    fed = _federation()
    plan = fed.plan(["alice", "bob"])

    with pytest.raises(ValueError, match=r"clients \['bob'\] have no positive image count"):
        fed.open_round(plan, {"alice": 3, "bob": 0})
    fed.open_round(plan, NUM_EXAMPLES).close()
    with pytest.raises(ValueError, match="plan for round 0, but round 1 is next"):
        fed.open_round(plan, NUM_EXAMPLES)


def test_closing_with_no_updates_keeps_the_global_model() -> None:
    fed = _federation()
    before = {n: t.clone() for n, t in fed.global_state.items()}
    round_ = fed.open_round(fed.plan(["alice"]), {"alice": 1})

    outcome = round_.close()

    assert outcome.averaged_parts == frozenset()
    assert all(torch.equal(fed.global_state[n], before[n]) for n in before)
    assert fed.completed_rounds == 1


def test_udec_second_round_sends_only_the_decoder_except_to_newcomers() -> None:
    fed = _federation(Strategy.UDEC)
    first = fed.open_round(fed.plan(["alice", "bob"]), NUM_EXAMPLES)
    for c in ("alice", "bob"):
        first.mark_sent(c)
    first.close()

    plan = fed.plan(["alice", "bob", "carol"], lost_state=["bob"])
    round_ = fed.open_round(plan, {**NUM_EXAMPLES, "carol": 5})

    assert plan.assignment("alice").receives == {DEC}
    assert plan.assignment("bob").receives == ALL_PARTS  # lost its private parts: the full model again
    assert plan.assignment("carol").receives == ALL_PARTS
    assert round_.payload(frozenset({DEC})) is round_.payload(frozenset({DEC}))
    assert len(round_.payload(frozenset({DEC}))) < len(round_.payload(ALL_PARTS))
    task = round_.task("alice")
    assert task.round_index == 1 and task.private_parts == {ENC, MID} and task.returns == {DEC}
    assert task.seed == task_seed(3, 1, "alice") != task_seed(3, 1, "bob")


def test_payload_bytes_by_part_add_up(tiny_layout) -> None:
    fed = _federation(Strategy.ULATDEC)
    round_ = fed.open_round(fed.plan(["alice"]), {"alice": 1})

    for parts in (ALL_PARTS, frozenset({MID, DEC}), frozenset({DEC})):
        data = round_.payload(parts)
        by_part = payload_bytes_by_part(data, fed.layout)
        assert sum(by_part.values()) == len(data)
        for p in PART_ORDER:
            if p in parts:
                assert by_part[p] >= 4 * fed.layout.numel(p)
            else:
                assert by_part[p] == 0


def test_ledger_json_roundtrip() -> None:
    fed = _federation()
    round_ = fed.open_round(fed.plan(["alice", "bob"]), NUM_EXAMPLES)
    round_.mark_sent("alice")
    round_.accept("alice", _delta_payload(fed, 0, ALL_PARTS, seed=0)[0], mean_loss=0.1, images_seen=30)
    ledger = round_.close().ledger

    again = Ledger.from_json(ledger.as_json())

    assert again == ledger
    assert ledger.reduction_vs_full == 0.0


def test_tally_adds_counts_and_roundtrips_through_json() -> None:
    tally = Tally({"complete": 2}, {"accepted": 4, "bad_hash": 1})

    more = tally.plus({"complete": 1, "no_quorum": 1}, {"accepted": 2, "late": 1})

    assert more == Tally({"complete": 3, "no_quorum": 1}, {"accepted": 6, "bad_hash": 1, "late": 1})
    assert tally == Tally({"complete": 2}, {"accepted": 4, "bad_hash": 1}), "plus makes a new tally"
    assert Tally.from_json(more.as_json()) == more
    assert Tally.from_json({}) == Tally(), "a checkpoint from before tallies counts nothing"


def test_the_tally_is_checkpointed_and_restored_with_the_ledger(tmp_path) -> None:
    fed = _federation()
    round_ = fed.open_round(fed.plan(["alice", "bob"]), NUM_EXAMPLES)
    round_.mark_sent("alice")
    round_.accept("alice", _delta_payload(fed, 0, ALL_PARTS, seed=0)[0], mean_loss=0.1, images_seen=30)
    round_.close()
    fed.tally = Tally({"quorum": 1}, {"accepted": 1, "late": 1})
    fed.save(tmp_path)

    again = Federation.restore(fed.config, tmp_path)

    assert again is not None
    assert again.tally == fed.tally and again.ledger == fed.ledger and again.completed_rounds == 1


# --- hostile updates: values, reports, FedAvg weights, clipping, an overflowing aggregate -------------------
def _hostile_federation(**robust: Any) -> Federation:
    return Federation(FederationConfig(strategy=Strategy.FULL, model="tiny", rounds=3, seed=3), robust=RobustConfig(**robust))


def _filled(fed: Federation, value: float, round_index: int = 0) -> bytes:
    tensors = {n: torch.full(t.shape, value) for n, t in fed.global_state.items()}
    return encode(tensors, PayloadMeta(kind="delta", model="tiny", wire_round=round_index, parts=ALL_PARTS))


def test_an_update_beyond_what_training_reaches_is_refused_before_it_is_folded() -> None:
    fed = _federation()
    round_ = fed.open_round(fed.plan(["alice", "bob"]), NUM_EXAMPLES)
    bound = round_.value_bound("alice")

    with pytest.raises(ValueOutOfBounds, match=r"holds a value of magnitude 1e\+38; an update of this task holds at most"):
        round_.accept("alice", _filled(fed, 1e38), mean_loss=0.1, images_seen=30)
    with pytest.raises(ValueOutOfBounds):
        round_.accept("alice", _filled(fed, -bound * 1.01), mean_loss=0.1, images_seen=30)
    round_.accept("alice", _filled(fed, bound * 0.99), mean_loss=0.1, images_seen=30)

    assert bound == pytest.approx(8 * 1e-4 * 5), "lr 1e-4, 5 epochs of one batch, Adam's 8 lr per step"
    assert round_.accepted == ["alice"]


def test_a_claim_beyond_the_registered_size_raises_neither_the_weight_nor_the_value_bound() -> None:
    """A worker claiming 2^32-1 images is bounded, in weight and in values, as the size registered for it."""
    fed = _hostile_federation(max_weight_share=1.0, registered={"mallory": 30, "alice": 30})
    honest = fed.open_round(fed.plan(["alice", "mallory"]), {"alice": 30, "mallory": 30})
    round_ = fed.open_round(fed.plan(["alice", "mallory"]), {"alice": 30, "mallory": 2**32 - 1})

    assert round_.fedavg_weights["mallory"] == 30
    assert round_.value_bound("mallory") == honest.value_bound("mallory") == pytest.approx(8 * 1e-4 * 5)
    with pytest.raises(ValueOutOfBounds):
        round_.accept("mallory", _filled(fed, 1.01 * honest.value_bound("mallory")), mean_loss=0.1, images_seen=30)


def test_a_large_honest_worker_is_weighed_by_the_share_cap_but_its_values_bounded_by_its_images() -> None:
    """Beside a worker of 2 images, one of 3,000 weighs 2 (the share cap) but trains 3,000 images' steps: its
    honest values passed 8 lr x the 2-image steps, and were refused at every try, so the round never closed."""
    fed = _hostile_federation(max_weight_share=0.5)
    round_ = fed.open_round(fed.plan(["alice", "bob"]), {"alice": 2, "bob": 3000})
    steps = 5 * math.ceil(3000 / 128)  # 5 epochs of batches of 128 (the default training)

    assert round_.fedavg_weights == {"alice": 2, "bob": 2}
    assert round_.value_bound("bob") == pytest.approx(8 * 1e-4 * steps)
    round_.accept("bob", _filled(fed, 1e-4 * steps), mean_loss=0.1, images_seen=5 * 3000)  # one lr per step, 12x the 2-image bound
    assert round_.accepted == ["bob"]


def test_a_task_downloaded_again_adds_nothing_to_the_run_traffic() -> None:
    """1000 downloads of one task counted 1000 payloads in the run's traffic; a task counts once."""
    fed = _federation()
    round_ = fed.open_round(fed.plan(["alice", "bob"]), NUM_EXAMPLES)
    first = round_.mark_sent("alice")

    again = [round_.mark_sent("alice") for _ in range(5)]

    assert first.traffic.total > 0 and all(e == Ledger() for e in again)
    assert round_.ledger_so_far().traffic == first.traffic


@pytest.mark.parametrize("images_seen", [0, 5 * 30 + 1, 10**12])
def test_a_training_report_outside_its_task_is_refused(images_seen: int) -> None:
    fed = _federation()
    round_ = fed.open_round(fed.plan(["alice", "bob"]), NUM_EXAMPLES)

    with pytest.raises(HeaderError, match=f"images_seen {images_seen} outside 1..150 \\(5 epochs over the 30 images 'alice' declared\\)"):
        round_.accept("alice", _delta_payload(fed, 0, ALL_PARTS, seed=0)[0], mean_loss=0.1, images_seen=images_seen)
    assert round_.accepted == []


def test_an_aggregate_that_overflows_is_not_committed_and_the_round_runs_again() -> None:
    fed = _hostile_federation(max_delta_value=3e38)
    before = {n: t.clone() for n, t in fed.global_state.items()}
    round_ = fed.open_round(fed.plan(["alice", "bob"]), NUM_EXAMPLES)
    round_.accept("alice", _filled(fed, 1e38), mean_loss=0.1, images_seen=30)  # 30 x 1e38 overflows float32

    with pytest.raises(NonFiniteAggregate, match=r"would make .* values of tensor .* NaN or infinite"):
        round_.close()

    assert fed.completed_rounds == 0
    assert all(torch.equal(fed.global_state[n], before[n]) for n in before)
    again = fed.open_round(fed.plan(["alice", "bob"]), NUM_EXAMPLES)
    again.accept("bob", _delta_payload(fed, 0, ALL_PARTS, seed=1)[0], mean_loss=0.1, images_seen=10)
    assert again.attempt == 2 and again.close().accepted[0].client == "bob" and fed.completed_rounds == 1


def test_a_claim_over_the_registered_size_or_the_share_weighs_less() -> None:
    fed = _hostile_federation(max_weight_share=0.5, registered={"alice": 30, "bob": 10, "mallory": 20})
    round_ = fed.open_round(fed.plan(["alice", "bob", "mallory"]), {**NUM_EXAMPLES, "mallory": 2**32 - 1})

    assert round_.fedavg_weights == {"alice": 30, "bob": 10, "mallory": 20}
    assert round_.lowered == {"mallory": ("registered",)}
    accepted = round_.accept("mallory", _delta_payload(fed, 0, ALL_PARTS, seed=2)[0], mean_loss=999.0, images_seen=5 * (2**32 - 1))
    assert accepted.fedavg_weight == 20
    round_.accept("alice", _delta_payload(fed, 0, ALL_PARTS, seed=0)[0], mean_loss=0.1, images_seen=150)
    assert round_.close().mean_loss == pytest.approx((20 * 999 + 30 * 0.1) / 50), "the loss is weighted as the update"


def test_a_scaled_update_is_clipped_to_the_fixed_bound() -> None:
    fed = _hostile_federation(clip_norm=0.05, max_delta_value=1e6)  # the value bound would refuse it: clipping alone
    honest, _ = _delta_payload(fed, 0, ALL_PARTS, seed=0)
    _, hostile = _delta_payload(fed, 0, ALL_PARTS, seed=1)
    scaled = encode({n: t * 1e6 for n, t in hostile.items()}, PayloadMeta(kind="delta", model="tiny", wire_round=0, parts=ALL_PARTS))
    before = {n: t.clone() for n, t in fed.global_state.items()}
    round_ = fed.open_round(fed.plan(["alice", "bob"]), {"alice": 10, "bob": 10})

    a = round_.accept("alice", honest, mean_loss=0.1, images_seen=10)
    b = round_.accept("bob", scaled, mean_loss=0.1, images_seen=10)
    outcome = round_.close()

    assert a.clipped == {} and set(b.clipped) == set(PART_ORDER), "the honest update is within the bound"
    for p in PART_ORDER:
        names = fed.layout.tensors[p]
        change = torch.cat([(fed.global_state[n] - before[n]).flatten() for n in names]).norm()
        assert b.norms[p] > 1e3 and float(change) <= (a.norms[p] + 0.05) / 2 * (1 + 1e-5), p
    assert fed.norms.median(DEC) == min(a.norms[DEC], b.norms[DEC]), "norms before clipping, for the next round"
    assert outcome.accepted[1].clipped[DEC] == pytest.approx(0.05 / b.norms[DEC])
    record = round_record(outcome, fed.ledger, 1.0)
    assert record.fedavg_weights == {"alice": 10, "bob": 10} and set(record.clipped) == {"bob"}, "the round log says who was clipped"
    assert record.as_json()["clipped"] == {"bob": {p.value: b.clipped[p] for p in PART_ORDER}}


def test_adaptive_clipping_follows_the_last_rounds_median_norm() -> None:
    fed = _hostile_federation(clip_multiplier=2.0, max_delta_value=1.0)
    first = fed.open_round(fed.plan(["alice", "bob"]), {"alice": 10, "bob": 10})
    a = first.accept("alice", _delta_payload(fed, 0, ALL_PARTS, seed=0)[0], mean_loss=0.1, images_seen=10)
    first.accept("bob", _delta_payload(fed, 0, ALL_PARTS, seed=1, scale=1e-3)[0], mean_loss=0.1, images_seen=10)
    first.close()
    second = fed.open_round(fed.plan(["alice", "bob"]), {"alice": 10, "bob": 10})

    assert first.clip_bounds == {}, "no earlier round: nothing to be adaptive to"
    assert second.clip_bounds == {p: 2.0 * a.norms[p] for p in PART_ORDER}, "twice the lower median of the two norms"
    b = second.accept("bob", _delta_payload(fed, 1, ALL_PARTS, seed=1, scale=1e-3)[0], mean_loss=0.1, images_seen=10)
    assert b.clipped[DEC] == pytest.approx(2.0 * a.norms[DEC] / b.norms[DEC])


def test_clipping_state_is_checkpointed_and_a_resume_clips_the_same(tmp_path) -> None:
    fed = _hostile_federation(clip_multiplier=2.0)
    first = fed.open_round(fed.plan(["alice"]), {"alice": 10})
    first.accept("alice", _delta_payload(fed, 0, ALL_PARTS, seed=0)[0], mean_loss=0.1, images_seen=10)
    first.close()
    fed.save(tmp_path)

    resumed = Federation.restore(fed.config, tmp_path, robust=fed.robust)

    assert resumed is not None and resumed.norms == fed.norms != NormHistory()


def test_federation_refuses_a_global_state_of_another_model() -> None:
    other = build_model("paper-fmnist", seed=0).state_dict()

    with pytest.raises(SchemaError, match="tensor"):
        Federation(FederationConfig(strategy=Strategy.FULL, model="tiny"), global_state=other)
    with pytest.raises(ValueError, match="unknown model preset"):
        Federation(FederationConfig(strategy=Strategy.FULL, model="huge"))


# --- a real client ---------------------------------------------------------------------------------------


def _runtime(client: str, seed: int, images: int = 16) -> ClientRuntime:
    trainer = LocalTrainer(build_model("tiny", seed=123), Schedule(), SpeedConfig(device="cpu"))
    data = torch.rand(images, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return ClientRuntime(client, "tiny", trainer, trainer.prepare_data(data))


def test_client_round_trip_through_the_federation() -> None:
    fed = _federation(Strategy.UDEC, train=TrainConfig(epochs=1, batch_size=16))
    plan = fed.plan(["alice"])
    round_ = fed.open_round(plan, {"alice": 16})
    client = _runtime("alice", seed=0)
    task = round_.task("alice")

    client.load(round_.payload(task.receives), task)
    loaded = {n: t.clone() for n, t in client.sampling_model().state_dict().items()}  # before training changes it
    result = client.train(task)
    payload = client.delta_payload(task)
    round_.accept("alice", payload, mean_loss=result.mean_loss, images_seen=result.images_seen)
    before = {n: t.clone() for n, t in fed.global_state.items()}
    round_.close()

    assert all(torch.equal(loaded[n], before[n]) for n in before)  # the payload replaced the client's own init
    assert set(client.private_tensors) == set(fed.layout.names({ENC, MID}))
    trained = client.sampling_model().state_dict()
    assert all(torch.equal(client.private_tensors[n], trained[n]) for n in client.private_tensors)
    # One client: the global decoder becomes the client's decoder; the encoder is never averaged.
    for n in fed.layout.names({DEC}):
        torch.testing.assert_close(fed.global_state[n], trained[n], rtol=0, atol=1e-6)
    assert all(torch.equal(fed.global_state[n], before[n]) for n in fed.layout.names({ENC, MID}))
    assert result.images_seen == 16 and result.steps == 1


def test_client_without_private_state_asks_for_the_full_model() -> None:
    fed = _federation(Strategy.UDEC)
    client = _runtime("alice", seed=0)
    payload = encode(
        {n: fed.global_state[n] for n in fed.layout.names({DEC})},
        PayloadMeta(kind="weights", model="tiny", wire_round=1, parts=frozenset({DEC})),
    )
    task = TrainTask(
        round_index=1,
        task_id="r1-alice",
        receives=frozenset({DEC}),
        returns=frozenset({DEC}),
        private_parts=frozenset({ENC, MID}),
        train=TrainConfig(),
        seed=0,
    )

    with pytest.raises(MissingPrivateState, match="needs the full model again"):
        client.load(payload, task)


def test_client_delta_payload_is_the_delta_of_its_returned_parts() -> None:
    fed = _federation(Strategy.ULATDEC, train=TrainConfig(epochs=1, batch_size=8))
    round_ = fed.open_round(fed.plan(["alice"]), {"alice": 8})
    client = _runtime("alice", seed=1, images=8)
    task = round_.task("alice")
    client.load(round_.payload(task.receives), task)
    client.train(task)

    decoded = decode(client.delta_payload(task), fed.layout, kind="delta", parts={MID, DEC}, wire_round=0, model="tiny")

    expected = delta(client.sampling_model().state_dict(), {n: fed.global_state[n] for n in fed.layout.names({MID, DEC})})
    assert set(decoded) == set(fed.layout.names({MID, DEC}))
    assert all(torch.equal(decoded[n], expected[n]) for n in expected)
    assert any(bool(t.abs().sum() > 0) for t in decoded.values())
