"""Tests for fedcore.federation.strategies: the paper's communication numbers, USplit's pairing rule, and round plans."""

from __future__ import annotations

from collections import Counter

import pytest

from fedcore.federation.strategies import (
    Strategy,
    Traffic,
    account,
    full_fedavg_parameters,
    plan_round,
    plan_traffic,
    private_parts,
    round_rng,
    select_clients,
    shared_parts,
)
from fedcore.model.parts import ALL_PARTS, PART_ORDER, Part

ENC, MID, DEC = Part.ENCODER, Part.BOTTLENECK, Part.DECODER


def _ids(k: int) -> list[str]:
    return [f"client-{i}" for i in range(k)]


# --- golden numbers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("clients", [1, 2, 5, 10])
def test_udec_and_ulatdec_reductions_match_the_paper(clients: int, paper_sizes: dict[Part, int]) -> None:
    udec = account(Strategy.UDEC, paper_sizes, clients, 15)
    ulatdec = account(Strategy.ULATDEC, paper_sizes, clients, 15)

    assert round(udec.reduction_vs_full, 3) == 0.736
    assert round(ulatdec.reduction_vs_full, 3) == 0.413


def test_usplit_reduction_at_ten_clients_is_a_quarter(paper_sizes: dict[Part, int]) -> None:
    summary = account(Strategy.USPLIT, paper_sizes, 10, 15)

    assert round(summary.reduction_vs_full, 3) == 0.250


def test_usplit_reduction_at_five_clients_is_between_22_and_24_percent(paper_sizes: dict[Part, int]) -> None:
    reductions = [account(Strategy.USPLIT, paper_sizes, 5, 15, seed=s).reduction_vs_full for s in range(5)]

    assert all(0.22 <= r <= 0.24 for r in reductions), reductions


def test_full_saves_nothing(paper_sizes: dict[Part, int]) -> None:
    summary = account(Strategy.FULL, paper_sizes, 5, 15)

    assert summary.reduction_vs_full == 0.0
    assert summary.traffic.total == summary.full_fedavg


def test_udec_later_round_saves_76_percent(paper_sizes: dict[Part, int]) -> None:
    n, u = sum(paper_sizes.values()), paper_sizes[DEC]

    assert round(1 - 2 * u / (2 * n), 3) == 0.761


# --- closed forms of "Counting communication" -------------------------------------------------------------


@pytest.mark.parametrize("clients", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("rounds", [1, 2, 15])
def test_account_equals_the_papers_closed_forms(clients: int, rounds: int, paper_sizes: dict[Part, int]) -> None:
    k, r = clients, rounds
    n = sum(paper_sizes.values())
    u, m = paper_sizes[DEC], paper_sizes[MID]

    full = account(Strategy.FULL, paper_sizes, k, r)
    udec = account(Strategy.UDEC, paper_sizes, k, r)
    ulatdec = account(Strategy.ULATDEC, paper_sizes, k, r)
    usplit = account(Strategy.USPLIT, paper_sizes, k, r)

    assert full.traffic.total == 2 * k * n * r
    assert udec.traffic.total == k * (n + u) + k * (r - 1) * 2 * u
    assert ulatdec.traffic.total == k * (n + u + m) + k * (r - 1) * 2 * (u + m)
    assert sum(usplit.traffic.down.values()) == k * n * r
    for summary in (full, udec, ulatdec, usplit):
        assert summary.full_fedavg == 2 * k * n * r
        assert summary.clients == k and summary.rounds == r


@pytest.mark.parametrize("clients", [2, 4, 10])
def test_usplit_uploads_half_the_model_per_client_with_even_k(clients: int, paper_sizes: dict[Part, int]) -> None:
    n = sum(paper_sizes.values())

    summary = account(Strategy.USPLIT, paper_sizes, clients, 15, seed=3)

    assert sum(summary.traffic.up.values()) == clients * n * 15 // 2
    assert summary.traffic.up[ENC] == clients // 2 * paper_sizes[ENC] * 15
    assert summary.traffic.up[DEC] == clients // 2 * paper_sizes[DEC] * 15
    assert summary.traffic.up[MID] == clients // 2 * paper_sizes[MID] * 15


def test_udec_traffic_by_part_and_direction(paper_sizes: dict[Part, int]) -> None:
    k, r = 5, 15

    t = account(Strategy.UDEC, paper_sizes, k, r).traffic

    assert t.down == {ENC: k * paper_sizes[ENC], MID: k * paper_sizes[MID], DEC: k * r * paper_sizes[DEC]}
    assert t.up == {ENC: 0, MID: 0, DEC: k * r * paper_sizes[DEC]}


def test_accounting_json_is_consistent(paper_sizes: dict[Part, int]) -> None:
    summary = account(Strategy.ULATDEC, paper_sizes, 10, 15)

    js = summary.as_json()

    assert js["strategy"] == "ulatdec"
    assert js["parameters_total"] == js["parameters_down"] + js["parameters_up"] == summary.traffic.total
    assert round(js["reduction_vs_full"], 3) == 0.413
    assert sum(js["parameters_by_part"]["up"].values()) == js["parameters_up"]


def test_traffic_addition_is_per_part() -> None:
    a = Traffic({ENC: 1, MID: 2, DEC: 3}, {ENC: 4, MID: 5, DEC: 6})
    b = Traffic({ENC: 10, MID: 20, DEC: 30}, {ENC: 40, MID: 50, DEC: 60})

    total = a + b

    assert total.down == {ENC: 11, MID: 22, DEC: 33}
    assert total.up == {ENC: 44, MID: 55, DEC: 66}
    assert total.total == 231
    assert Traffic.zero().total == 0


def test_full_fedavg_parameters() -> None:
    assert full_fedavg_parameters(3, {ENC: 1, MID: 2, DEC: 4}) == 42


# --- USplit pairing rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("clients", [1, 2, 3, 4, 5, 8, 10, 15])
def test_usplit_pairing_rule(clients: int) -> None:
    ids = _ids(clients)
    for seed in range(40):
        plan = plan_round(Strategy.USPLIT, seed % 7, ids, round_rng(seed, seed % 7))
        returns = {a.client: a.returns for a in plan.assignments}

        # Everyone receives the whole model and keeps nothing private.
        assert all(a.receives == ALL_PARTS and a.private_parts == frozenset() for a in plan.assignments)
        # Every part is returned by someone, every round.
        assert plan.averaged_parts == ALL_PARTS
        if clients == 1:
            assert returns == {ids[0]: ALL_PARTS}
            continue
        halves: Counter[Part] = Counter()
        for parts in returns.values():
            # Each client returns exactly one half, never both.
            assert (ENC in parts) != (DEC in parts), parts
            assert parts <= ALL_PARTS and parts - {MID} in ({ENC}, {DEC})
            halves[ENC if ENC in parts else DEC] += 1
        pairs = clients // 2
        with_mid = [c for c, parts in returns.items() if MID in parts]
        if clients % 2 == 0:
            # Pairs split encoder / decoder; the bottleneck goes to exactly one member of each pair.
            assert halves[ENC] == halves[DEC] == pairs
            assert len(with_mid) == pairs
        else:
            # One odd client out returns the bottleneck plus a random half.
            assert len(with_mid) == pairs + 1
            assert sorted(halves.values()) == [pairs, pairs + 1]


@pytest.mark.parametrize("clients", [2, 4, 6])
def test_usplit_bottleneck_goes_to_either_half_of_a_pair(clients: int) -> None:
    seen: Counter[frozenset[Part]] = Counter()
    for seed in range(60):
        plan = plan_round(Strategy.USPLIT, 0, _ids(clients), round_rng(seed, 0))
        for a in plan.assignments:
            seen[a.returns] += 1

    # Both coin outcomes occur: {enc+mid, dec} and {enc, dec+mid}.
    assert set(seen) == {frozenset({ENC, MID}), frozenset({DEC}), frozenset({ENC}), frozenset({DEC, MID})}


def test_usplit_odd_client_returns_either_half_with_the_bottleneck() -> None:
    odd_returns: set[frozenset[Part]] = set()
    for seed in range(60):
        plan = plan_round(Strategy.USPLIT, 0, _ids(3), round_rng(seed, 0))
        mids = [a.returns for a in plan.assignments if MID in a.returns]
        odd_returns.update(m for m in mids if len(m) == 2)

    assert frozenset({MID, ENC}) in odd_returns and frozenset({MID, DEC}) in odd_returns


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize("clients", [1, 3, 4])
def test_the_averaged_parts_are_those_some_client_returns(strategy: Strategy, clients: int) -> None:
    plan = plan_round(strategy, 2, _ids(clients), round_rng(5, 2))

    returning = {part: [a.client for a in plan.assignments if part in a.returns] for part in PART_ORDER}

    assert plan.averaged_parts == {part for part, who in returning.items() if who}
    if strategy is Strategy.USPLIT and clients == 4:
        assert len(returning[ENC]) == len(returning[DEC]) == len(returning[MID]) == 2


def test_usplit_plans_are_reproducible_per_seed_and_round() -> None:
    ids = _ids(10)

    a = plan_round(Strategy.USPLIT, 3, ids, round_rng(1, 3))
    b = plan_round(Strategy.USPLIT, 3, ids, round_rng(1, 3))
    others = [plan_round(Strategy.USPLIT, r, ids, round_rng(1, r)) for r in range(4, 10)]

    assert a == b
    assert any(o.assignments != a.assignments for o in others)


# --- UDec / ULatDec / Full plans -------------------------------------------------------------------------


def test_udec_first_contact_gets_everything_then_only_the_decoder() -> None:
    ids = _ids(3)

    first = plan_round(Strategy.UDEC, 0, ids, round_rng(0, 0), first_contact=ids)
    later = plan_round(Strategy.UDEC, 1, ids, round_rng(0, 1), first_contact=())

    assert all(a.receives == ALL_PARTS for a in first.assignments)
    assert all(a.returns == {DEC} and a.private_parts == {ENC, MID} for a in first.assignments)
    assert all(a.receives == {DEC} and a.returns == {DEC} for a in later.assignments)
    assert {a.receives for a in first.assignments} == {ALL_PARTS}
    assert {a.receives for a in later.assignments} == {frozenset({DEC})}


def test_a_late_joiner_gets_the_whole_model_once() -> None:
    plan = plan_round(Strategy.ULATDEC, 4, ["a", "b", "new"], round_rng(0, 4), first_contact=["new"])

    assert plan.assignment("new").receives == ALL_PARTS
    assert plan.assignment("a").receives == {MID, DEC}
    assert {a.receives for a in plan.assignments} == {ALL_PARTS, frozenset({MID, DEC})}
    assert all(a.returns == {MID, DEC} and a.private_parts == {ENC} for a in plan.assignments)


def test_full_plan_sends_and_returns_everything() -> None:
    plan = plan_round(Strategy.FULL, 0, _ids(4), round_rng(0, 0))

    assert all(a.receives == a.returns == ALL_PARTS and not a.private_parts for a in plan.assignments)
    assert plan_traffic(plan, {ENC: 1, MID: 10, DEC: 100}).total == 2 * 4 * 111


def test_shared_and_private_parts() -> None:
    assert shared_parts(Strategy.FULL) == shared_parts(Strategy.USPLIT) == ALL_PARTS
    assert shared_parts(Strategy.UDEC) == {DEC}
    assert shared_parts(Strategy.ULATDEC) == {MID, DEC}
    assert private_parts(Strategy.FULL) == private_parts(Strategy.USPLIT) == frozenset()
    assert private_parts(Strategy.UDEC) == {ENC, MID}
    assert private_parts(Strategy.ULATDEC) == {ENC}


def test_plan_refuses_empty_and_duplicate_clients() -> None:
    with pytest.raises(ValueError, match="no clients"):
        plan_round(Strategy.FULL, 0, [], round_rng(0, 0))
    with pytest.raises(ValueError, match="duplicate client ids"):
        plan_round(Strategy.FULL, 0, ["a", "a"], round_rng(0, 0))


def test_assignment_of_an_unknown_client_raises_key_error() -> None:
    plan = plan_round(Strategy.FULL, 0, ["a"], round_rng(0, 0))

    with pytest.raises(KeyError, match="'b' is not in round 0"):
        plan.assignment("b")


# --- client selection ------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_round", [0, -1, 5, 9])
def test_select_clients_takes_everyone_when_not_sampling(per_round: int) -> None:
    available = ["c", "a", "e", "b", "d"]

    assert select_clients(available, per_round, seed=0, round_index=0) == ["a", "b", "c", "d", "e"]


def test_select_clients_is_a_seeded_sorted_sample() -> None:
    available = [f"w{i:02d}" for i in range(20)]

    a = select_clients(available, 5, seed=4, round_index=2)
    b = select_clients(list(reversed(available)), 5, seed=4, round_index=2)
    per_round = [select_clients(available, 5, seed=4, round_index=r) for r in range(10)]

    assert a == b  # independent of the order the clients are listed in
    assert a == sorted(a) and len(set(a)) == 5 and set(a) <= set(available)
    assert all(isinstance(c, str) for c in a)
    assert len({tuple(s) for s in per_round}) > 1
    assert select_clients(available, 5, seed=5, round_index=2) != a or select_clients(available, 5, 6, 2) != a


def test_select_clients_samples_uniformly() -> None:
    available = [f"w{i}" for i in range(10)]
    counts: Counter[str] = Counter()
    rounds = 2000

    for r in range(rounds):
        counts.update(select_clients(available, 3, seed=0, round_index=r))

    expected = rounds * 3 / 10
    assert set(counts) == set(available)
    assert all(abs(n - expected) < 0.12 * expected for n in counts.values()), counts
