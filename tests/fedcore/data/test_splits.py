"""Tests for fedcore.data.splits on the real Fashion-MNIST training labels (the paper's three splits)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fedcore.data.datasets import DEFAULT_FASHION_MNIST_DIR, read_idx
from fedcore.data.splits import ShardSummary, SplitKind, describe_split, split_indices

KINDS: list[SplitKind] = ["iid", "quantity", "label"]
CLIENT_COUNTS = [5, 10]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    path = DEFAULT_FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz"
    if not path.is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return read_idx(path).astype(np.int64)


@pytest.fixture(scope="module")
def splits(labels: np.ndarray) -> dict[tuple[str, int], list[np.ndarray]]:
    return {(kind, k): split_indices(labels, k, kind) for kind in KINDS for k in CLIENT_COUNTS}


@pytest.mark.parametrize("num_clients", CLIENT_COUNTS)
@pytest.mark.parametrize("kind", KINDS)
def test_shards_are_disjoint_and_complete(splits: dict[tuple[str, int], list[np.ndarray]], labels: np.ndarray, kind: str, num_clients: int) -> None:
    shards = splits[kind, num_clients]

    assert len(shards) == num_clients
    for shard in shards:
        assert shard.dtype == np.int64
        assert np.all(np.diff(shard) > 0)  # sorted, no repeats
        assert len(shard) >= 10
    everything = np.concatenate(shards)
    assert len(everything) == len(labels)  # disjoint ...
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(labels)))  # ... and complete


@pytest.mark.parametrize("kind", KINDS)
def test_seeded(splits: dict[tuple[str, int], list[np.ndarray]], labels: np.ndarray, kind: SplitKind) -> None:
    again = split_indices(labels, 5, kind, seed=2023)
    other = split_indices(labels, 5, kind, seed=7)

    assert all(np.array_equal(a, b) for a, b in zip(splits[kind, 5], again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(splits[kind, 5], other, strict=True))


@pytest.mark.parametrize("num_clients", CLIENT_COUNTS)
def test_iid_equal_sizes(splits: dict[tuple[str, int], list[np.ndarray]], num_clients: int) -> None:
    num_examples = [len(shard) for shard in splits["iid", num_clients]]

    assert max(num_examples) - min(num_examples) <= 1


@pytest.mark.parametrize("num_clients", CLIENT_COUNTS)
def test_quantity_skew_sizes_vary_labels_balanced(splits: dict[tuple[str, int], list[np.ndarray]], labels: np.ndarray, num_clients: int) -> None:
    stats = describe_split(labels, splits["quantity", num_clients], num_classes=10)

    num_examples = np.array([s.num_examples for s in stats])
    assert num_examples.max() > 3 * num_examples.min()  # Dirichlet(0.5) shard sizes, far from equal
    assert num_examples.std() / num_examples.mean() > 0.3
    for s in stats:
        # Fashion-MNIST's classes are equal, so every client holds each class within one image.
        assert max(s.classes) - min(s.classes) <= 1


@pytest.mark.parametrize("num_clients", CLIENT_COUNTS)
def test_label_skew_histograms_skewed(splits: dict[tuple[str, int], list[np.ndarray]], labels: np.ndarray, num_clients: int) -> None:
    stats = describe_split(labels, splits["label", num_clients])

    top_class_share = np.mean([max(s.classes) / s.num_examples for s in stats])
    assert top_class_share > 0.3  # 0.1 for balanced clients
    assert sum(min(s.classes) == 0 for s in stats) >= 1  # some client lacks a class entirely


@pytest.mark.parametrize("num_clients", CLIENT_COUNTS)
def test_label_skew_stops_filling_full_clients(splits: dict[tuple[str, int], list[np.ndarray]], labels: np.ndarray, num_clients: int) -> None:
    capacity = len(labels) / num_clients

    # Classes are dealt in ascending order: before the last class a client received, it held < N/K.
    for s in describe_split(labels, splits["label", num_clients]):
        counts = np.array(s.classes)
        last = np.flatnonzero(counts)[-1]
        assert counts[:last].sum() < capacity


@pytest.mark.parametrize("kind", KINDS)
def test_single_client_gets_everything(labels: np.ndarray, kind: SplitKind) -> None:
    (shard,) = split_indices(labels, 1, kind)

    np.testing.assert_array_equal(shard, np.arange(len(labels)))


def test_describe_split_counts() -> None:
    toy = np.array([0, 0, 1, 2, 2, 2])

    stats = describe_split(toy, [np.array([0, 3]), np.array([1, 2, 4, 5])])

    assert stats == [ShardSummary(0, 2, (1, 0, 1)), ShardSummary(1, 4, (1, 1, 2))]
    assert [s.as_json() for s in stats] == [
        {"client": 0, "size": 2, "classes": [1, 0, 1]},
        {"client": 1, "size": 4, "classes": [1, 1, 2]},
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, "num_clients is 0"),
        ({"beta": 0.0}, "beta is 0.0"),
        ({"beta": -1.0}, "beta is -1.0"),
        (
            {"num_clients": 3, "min_size": 40},
            r"100 images cannot give 3 clients at least 40 images each \(needs 120\): lower the number of clients \(--num-clients\)",
        ),
        ({"kind": "feature"}, "'feature'"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    arguments = {"num_clients": 2, "kind": "iid"} | kwargs

    with pytest.raises(ValueError, match=message):
        split_indices(np.arange(100) % 10, **arguments)


def test_redraw_cap_raises() -> None:
    # 10 clients from 100 images at beta 0.01: min_size=10 would need exactly 10 images each.
    with pytest.raises(ValueError, match="1000 Dirichlet draws") as info:
        split_indices(np.arange(100) % 10, 10, "quantity", beta=0.01, min_size=10)

    assert str(info.value) == (
        "'quantity' split: 1000 Dirichlet draws at beta 0.01 each left one of the 10 clients with fewer than 10 images; "
        "raise the concentration (--beta) or lower the number of clients (--num-clients)"
    )


@pytest.mark.parametrize("beta", [1e-300, 1e-30, 1e-3])
def test_a_label_split_at_a_tiny_beta_has_no_zero_division(beta: float) -> None:
    # At such a beta the Dirichlet draw is (all but) one-hot: the open clients' shares underflow to 0 whenever
    # the clients holding the mass are full, and must be drawn again over the open clients, not divided by 0.
    labels = np.arange(1000) % 10

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a NaN from 0 / 0, or its cast to int, fails the test
        shards = split_indices(labels, 3, "label", beta=beta, seed=4)  # a seed at which each beta underflows

    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(1000))
    assert min(len(shard) for shard in shards) >= 10


@pytest.mark.parametrize("beta", [1e-300, 1e-30])
def test_a_label_split_at_a_vanishing_beta_gives_each_class_to_one_client(beta: float) -> None:
    labels = np.arange(1000) % 10

    shards = split_indices(labels, 3, "label", beta=beta, seed=4)

    owners = [{client for client, shard in enumerate(shards) if np.any(labels[shard] == c)} for c in range(10)]
    assert all(len(owner) == 1 for owner in owners)  # every class wholly in one client's shard
