"""Tests for fedcore.federation.aggregate: streaming FedAvg equals the direct weighted mean, per part, refusals leave no trace."""

from __future__ import annotations

import itertools
import json
import math
import struct

import pytest
import torch

from fedcore.errors import NonFiniteAggregate, NonFiniteTensor, NotAssigned, SchemaError, ValueOutOfBounds
from fedcore.federation.aggregate import RunningAggregate, delta
from fedcore.model.parts import ALL_PARTS, PART_ORDER, Part, PartLayout
from fedcore.model.unet import build_model

ENC, MID, DEC = Part.ENCODER, Part.BOTTLENECK, Part.DECODER


@pytest.fixture(scope="module")
def global_state() -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in build_model("tiny", seed=0).state_dict().items()}


def _local_models(global_state, k: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """K locally 'trained' models: the global plus a random perturbation."""
    g = torch.Generator().manual_seed(seed)
    return [{n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in global_state.items()} for _ in range(k)]


def _direct_mean(models, fedavg_weights, names) -> dict[str, torch.Tensor]:
    """The FedAvg target computed independently, in float64: sum_k w_k x_k / sum_k w_k."""
    total = float(sum(fedavg_weights))
    return {n: sum(w * m[n].double() for m, w in zip(models, fedavg_weights, strict=True)) / total for n in names}


def _parts_of(layout: PartLayout, state, parts) -> dict[str, torch.Tensor]:
    return {n: state[n] for n in layout.names(parts)}


def test_delta_is_local_minus_received(global_state) -> None:
    local = {n: t + 1.5 for n, t in global_state.items()}

    d = delta(local, global_state)

    assert set(d) == set(global_state)
    assert all(torch.allclose(d[n], torch.full_like(t, 1.5), atol=1e-6) for n, t in global_state.items())
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in d.values())


def test_weighted_mean_equals_the_direct_fedavg(global_state, tiny_layout: PartLayout) -> None:
    models = _local_models(global_state, 4, seed=1)
    fedavg_weights = [12_000, 3, 700, 47_297]
    agg = RunningAggregate(tiny_layout, ALL_PARTS)

    for m, w in zip(models, fedavg_weights, strict=True):
        agg.fold(delta(m, global_state), ALL_PARTS, float(w))
    new_global = {n: t.clone() for n, t in global_state.items()}
    changed = agg.apply_to(new_global)

    expected = _direct_mean(models, fedavg_weights, global_state)
    assert changed == ALL_PARTS
    for n in global_state:
        torch.testing.assert_close(new_global[n].double(), expected[n], rtol=0, atol=1e-6)
    assert agg.reported_parts == ALL_PARTS and all(agg.weight(p) == sum(fedavg_weights) for p in PART_ORDER)


def test_mean_is_independent_of_arrival_order(global_state, tiny_layout: PartLayout) -> None:
    models = _local_models(global_state, 5, seed=2)
    fedavg_weights = [10.0, 20.0, 30.0, 40.0, 1000.0]
    deltas = [delta(m, global_state) for m in models]
    means = []

    for perm_seed in range(6):
        order = torch.randperm(5, generator=torch.Generator().manual_seed(perm_seed)).tolist()
        agg = RunningAggregate(tiny_layout, ALL_PARTS)
        for i in order:
            agg.fold(deltas[i], ALL_PARTS, fedavg_weights[i])
        means.append(agg.mean())

    for other in means[1:]:
        for n in means[0]:
            torch.testing.assert_close(other[n], means[0][n], rtol=0, atol=1e-7)


def test_each_part_is_averaged_over_its_reporters_only(global_state, tiny_layout: PartLayout) -> None:
    # USplit-like round: a returns encoder + bottleneck, b the decoder, c the encoder, d decoder + bottleneck.
    models = _local_models(global_state, 4, seed=3)
    fedavg_weights = [100, 200, 300, 400]
    returns = [{ENC, MID}, {DEC}, {ENC}, {DEC, MID}]
    agg = RunningAggregate(tiny_layout, ALL_PARTS)

    for m, w, parts in zip(models, fedavg_weights, returns, strict=True):
        agg.fold(_parts_of(tiny_layout, delta(m, global_state), parts), parts, float(w))
    new_global = {n: t.clone() for n, t in global_state.items()}
    agg.apply_to(new_global)

    for part in PART_ORDER:
        idx = [i for i, parts in enumerate(returns) if part in parts]
        expected = _direct_mean([models[i] for i in idx], [fedavg_weights[i] for i in idx], tiny_layout.names([part]))
        for n, value in expected.items():
            torch.testing.assert_close(new_global[n].double(), value, rtol=0, atol=1e-6)
        assert agg.weight(part) == sum(fedavg_weights[i] for i in idx)  # each subset of the FedAvg weights has its own sum
    assert agg.reported_parts == ALL_PARTS


def test_unreported_parts_are_left_alone(global_state, tiny_layout: PartLayout) -> None:
    (model,) = _local_models(global_state, 1, seed=4)
    agg = RunningAggregate(tiny_layout, ALL_PARTS)
    agg.fold(_parts_of(tiny_layout, delta(model, global_state), {DEC}), {DEC}, 5.0)
    new_global = {n: t.clone() for n, t in global_state.items()}

    changed = agg.apply_to(new_global)

    assert changed == {DEC} == agg.reported_parts
    assert set(agg.mean()) == set(tiny_layout.names({DEC}))
    assert all(torch.equal(new_global[n], global_state[n]) for n in tiny_layout.names({ENC, MID}))
    assert not torch.equal(new_global["final_conv.weight"], global_state["final_conv.weight"])


def _valid_update(global_state, layout: PartLayout, parts, seed: int = 5) -> dict[str, torch.Tensor]:
    (model,) = _local_models(global_state, 1, seed=seed)
    return _parts_of(layout, delta(model, global_state), parts)


def _refusals(global_state, layout: PartLayout):
    dec = _valid_update(global_state, layout, {DEC})
    wrong_shape = dict(dec, **{"final_conv.weight": torch.zeros(2, 6, 1, 1)})
    wrong_dtype = dict(dec, **{"final_conv.weight": dec["final_conv.weight"].double()})
    missing = {n: t for n, t in dec.items() if n != "final_conv.bias"}
    unknown = dict(dec, **{"init_conv.weight": global_state["init_conv.weight"]})
    nan = dict(dec, **{"final_conv.bias": torch.tensor([float("nan")])})
    return [
        ("no parts", dec, set(), 1.0, NotAssigned),
        ("part not averaged", _valid_update(global_state, layout, {ENC}), {ENC}, 1.0, NotAssigned),
        ("zero weight", dec, {DEC}, 0.0, SchemaError),
        ("negative weight", dec, {DEC}, -3.0, SchemaError),
        ("nan weight", dec, {DEC}, float("nan"), SchemaError),
        ("inf weight", dec, {DEC}, float("inf"), SchemaError),
        ("wrong shape", wrong_shape, {DEC}, 1.0, SchemaError),
        ("wrong dtype", wrong_dtype, {DEC}, 1.0, SchemaError),
        ("missing tensor", missing, {DEC}, 1.0, SchemaError),
        ("unknown tensor", unknown, {DEC}, 1.0, SchemaError),
        ("parts claim more than sent", dec, {DEC, MID}, 1.0, SchemaError),
        ("non-finite", nan, {DEC}, 1.0, NonFiniteTensor),
    ]


def test_refused_updates_leave_the_sums_untouched(global_state, tiny_layout: PartLayout) -> None:
    agg = RunningAggregate(tiny_layout, {MID, DEC})
    agg.fold(_valid_update(global_state, tiny_layout, {MID, DEC}, seed=6), {MID, DEC}, 10.0)
    before = {n: t.clone() for n, t in agg.mean().items()}
    fedavg_weights_before = {p: agg.weight(p) for p in (MID, DEC)}

    for label, update, parts, weight, error in _refusals(global_state, tiny_layout):
        with pytest.raises(error):
            agg.fold(update, parts, weight)
        after = agg.mean()
        assert set(after) == set(before), label
        assert all(torch.equal(after[n], before[n]) for n in before), label
        assert {p: agg.weight(p) for p in (MID, DEC)} == fedavg_weights_before, label  # counted once, the valid update


def test_memory_is_one_float32_copy_of_the_averaged_parts(global_state, tiny_layout: PartLayout) -> None:
    parts = {MID, DEC}
    agg = RunningAggregate(tiny_layout, parts)

    for m in _local_models(global_state, 6, seed=7):
        agg.fold(_parts_of(tiny_layout, delta(m, global_state), parts), parts, 1.0)

    sums = agg._sums  # the aggregate's only per-tensor state
    assert sum(t.numel() for t in sums.values()) == tiny_layout.numel(MID) + tiny_layout.numel(DEC)
    assert all(t.dtype == torch.float32 for t in sums.values())
    assert set(sums) == set(tiny_layout.names(parts))
    # views of one buffer of exactly that size, none overlapping another
    assert len({t.untyped_storage().data_ptr() for t in sums.values()}) == 1
    assert next(iter(sums.values())).untyped_storage().nbytes() == 4 * (tiny_layout.numel(MID) + tiny_layout.numel(DEC))
    spans = sorted((t.storage_offset(), t.storage_offset() + t.numel()) for t in sums.values())
    assert all(end <= begin for (_, end), (begin, _) in itertools.pairwise(spans))


def test_empty_aggregate_has_no_mean(tiny_layout: PartLayout) -> None:
    agg = RunningAggregate(tiny_layout, ALL_PARTS)
    state = {"final_conv.bias": torch.zeros(1)}

    assert agg.mean() == {}
    assert agg.apply_to(state) == frozenset()
    assert agg.reported_parts == frozenset()


# --- decoded payloads: folded as a few slices of one buffer, the same sums as tensor by tensor -------------


def _payload(layout: PartLayout, tensors, parts, round_index: int = 0) -> bytearray:
    from fedcore.payload.serialization import PayloadMeta, encode

    return bytearray(encode(tensors, PayloadMeta(kind="delta", model="tiny", wire_round=round_index, parts=frozenset(parts))))


@pytest.mark.parametrize("parts", [ALL_PARTS, frozenset({MID, DEC}), frozenset({ENC})])
def test_a_decoded_payload_folds_to_the_same_sums_as_its_tensors(parts, global_state, tiny_layout: PartLayout) -> None:
    from fedcore.payload.serialization import PayloadReader

    reader = PayloadReader(tiny_layout, kind="delta", wire_round=0, model="tiny")
    by_tensor, by_payload = RunningAggregate(tiny_layout, ALL_PARTS), RunningAggregate(tiny_layout, ALL_PARTS)
    for i, m in enumerate(_local_models(global_state, 3, seed=11)):
        update = _parts_of(tiny_layout, delta(m, global_state), parts)
        by_tensor.fold(update, parts, 10.0 + i)
        decoded = reader.read(_payload(tiny_layout, update, parts), parts)
        assert decoded.values() is not None  # encode writes float32 tensors back to back
        by_payload.fold_decoded(decoded, 10.0 + i)

    # name order on both sides: one add per run of consecutive names of one part, at most one per top-level module
    plan = by_payload._copy_plan(decoded.table)
    assert set(plan) == set(parts)
    assert len(parts) <= sum(len(runs) for runs in plan.values()) <= len({n.split(".")[0] for n in update})
    for name, t in by_tensor._sums.items():
        assert torch.equal(by_payload._sums[name], t), name
    assert all(by_payload.weight(p) == by_tensor.weight(p) for p in parts)


def _padded(clean: bytearray) -> bytearray:
    """The same payload with 8 bytes of padding after each tensor: not float32 back to back."""
    (n,) = struct.unpack("<Q", clean[:8])
    header = json.loads(clean[8 : 8 + n])
    body = bytearray()
    for name in sorted(k for k in header if k != "__metadata__"):
        start = len(body)
        body += clean[8 + n + header[name]["data_offsets"][0] : 8 + n + header[name]["data_offsets"][1]] + bytes(8)
        header[name]["data_offsets"] = [start, len(body) - 8]
    text = json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(text)) + text + body)


def test_a_payload_that_is_not_back_to_back_is_folded_tensor_by_tensor(global_state, tiny_layout: PartLayout) -> None:
    from fedcore.payload.serialization import PayloadReader

    update = _parts_of(tiny_layout, delta(_local_models(global_state, 1, seed=12)[0], global_state), {DEC})

    reader = PayloadReader(tiny_layout, kind="delta", wire_round=0, model="tiny")
    decoded = reader.read(_padded(_payload(tiny_layout, update, {DEC})), {DEC})
    assert decoded.values() is None
    agg, reference = RunningAggregate(tiny_layout, {DEC}), RunningAggregate(tiny_layout, {DEC})
    agg.fold_decoded(decoded, 3.0)
    reference.fold(update, {DEC}, 3.0)
    assert all(torch.equal(agg._sums[n], reference._sums[n]) for n in update)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_in_a_decoded_payload_are_named_and_leave_the_sums(bad_value: float, global_state, tiny_layout: PartLayout) -> None:
    from fedcore.payload.serialization import PayloadReader

    reader = PayloadReader(tiny_layout, kind="delta", wire_round=0, model="tiny")
    agg = RunningAggregate(tiny_layout, ALL_PARTS)
    good = _parts_of(tiny_layout, delta(_local_models(global_state, 1, seed=13)[0], global_state), ALL_PARTS)
    agg.fold_decoded(reader.read(_payload(tiny_layout, good, ALL_PARTS), ALL_PARTS), 2.0)
    before = agg._flat.clone()
    last = sorted(good)[-1]  # the last tensor of the payload
    poisoned = dict(good, **{last: good[last].clone()})
    poisoned[last].view(-1)[-1] = bad_value

    with pytest.raises(NonFiniteTensor, match=f"tensor '{last}' holds 1 NaN/Inf"):
        agg.fold_decoded(reader.read(_payload(tiny_layout, poisoned, ALL_PARTS), ALL_PARTS), 2.0)
    assert torch.equal(agg._flat, before) and all(agg.weight(p) == 2.0 for p in ALL_PARTS)


def test_the_largest_magnitude_is_finite_for_finite_values_only() -> None:
    from fedcore.payload.serialization import largest_magnitude

    assert largest_magnitude(torch.tensor([3e38, 1.0, -3.2e38])) == pytest.approx(3.2e38) and largest_magnitude(torch.empty(0)) == 0
    assert math.isnan(largest_magnitude(torch.tensor([1.0, float("nan")])))
    assert largest_magnitude(torch.tensor([float("-inf"), 0.0])) == math.inf


# --- hostile updates: values beyond a bound, norm clipping, an aggregate that overflows ---------------------
@pytest.mark.parametrize("padded", [False, True], ids=["back-to-back", "tensor-by-tensor"])
def test_a_value_beyond_the_bound_is_named_and_refused(padded: bool, global_state, tiny_layout: PartLayout) -> None:
    from fedcore.payload.serialization import PayloadReader

    reader = PayloadReader(tiny_layout, kind="delta", wire_round=0, model="tiny")
    update = _parts_of(tiny_layout, delta(_local_models(global_state, 1, seed=14)[0], global_state), {DEC})
    name = sorted(update)[3]
    update[name] = update[name].clone()
    update[name].view(-1)[5] = -1e38
    data = _payload(tiny_layout, update, {DEC})

    with pytest.raises(ValueOutOfBounds, match=f"tensor '{name}' holds a value of magnitude 1e\\+38; an update of this task holds at most 1"):
        reader.read(_padded(data) if padded else data, {DEC}, max_magnitude=1.0)
    assert reader.read(data, {DEC}, max_magnitude=1e38).values() is not None, "within a bound: read"


@pytest.mark.parametrize("padded", [False, True], ids=["back-to-back", "tensor-by-tensor"])
def test_clipping_scales_each_part_down_to_its_bound_and_returns_the_norms(padded: bool, global_state, tiny_layout: PartLayout) -> None:
    from fedcore.payload.serialization import PayloadReader

    reader = PayloadReader(tiny_layout, kind="delta", wire_round=0, model="tiny")
    update = _parts_of(tiny_layout, delta(_local_models(global_state, 1, seed=15)[0], global_state), ALL_PARTS)
    norms = {p: float(torch.cat([update[n].double().flatten() for n in tiny_layout.tensors[p]]).norm()) for p in PART_ORDER}
    bounds = {DEC: norms[DEC] / 4, ENC: norms[ENC] * 2}  # the decoder is clipped, the encoder within, the bottleneck unbounded
    data = _payload(tiny_layout, update, ALL_PARTS)
    agg, reference = RunningAggregate(tiny_layout, ALL_PARTS), RunningAggregate(tiny_layout, ALL_PARTS)

    got = agg.fold_decoded(reader.read(_padded(data) if padded else data, ALL_PARTS), 3.0, bounds)
    for p in PART_ORDER:
        scale = bounds[DEC] / got[DEC] if p == DEC else 1.0
        reference.fold({n: update[n] for n in tiny_layout.tensors[p]}, {p}, 3.0 * scale)

    assert got == pytest.approx(norms, rel=1e-5)
    assert all(torch.equal(agg._sums[n], reference._sums[n]) for n in update)
    assert agg.weight(DEC) == 3.0, "a clipped update keeps its weight: its direction counts, its length does not"
    assert agg.fold_decoded(reader.read(data, ALL_PARTS), 1.0) == {}, "without clipping no norm is taken"


def test_an_aggregate_that_would_make_the_model_non_finite_is_refused_before_it_is_applied(global_state, tiny_layout: PartLayout) -> None:
    state = {n: t.clone() for n, t in global_state.items()}
    huge = {n: torch.full(global_state[n].shape, 3e38) for n in tiny_layout.names({DEC})}
    agg = RunningAggregate(tiny_layout, ALL_PARTS)
    agg.fold(huge, {DEC}, 1.0)
    agg.fold(huge, {DEC}, 1.0)  # 6e38: the sum overflows float32

    with pytest.raises(NonFiniteAggregate, match=r"would make \d+ of \d+ values of tensor '.+' NaN or infinite"):
        agg.check_applicable(state)
    assert all(torch.equal(state[n], global_state[n]) for n in state)

    finite = RunningAggregate(tiny_layout, ALL_PARTS)
    finite.fold(huge, {DEC}, 1.0)
    finite.check_applicable(state)  # 3e38 plus a small global value: finite
