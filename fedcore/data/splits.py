"""Seeded splits of a labelled dataset into K clients' shards: IID, quantity skew and Dirichlet label skew."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, TypeGuard, get_args

import numpy as np

SplitKind = Literal["iid", "quantity", "label"]


def is_split_kind(name: str) -> TypeGuard[SplitKind]:
    return name in get_args(SplitKind)


MAX_REDRAWS: Final = 1000  # Dirichlet draws tried before giving up on reaching min_size for every client


def split_indices(
    labels: np.ndarray,
    num_clients: int,
    kind: SplitKind,
    *,
    beta: float = 0.5,
    seed: int = 2023,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Split the indices of `labels` (N,) into one shard per client (`num_clients` of them), as the paper's
    "Data splits" say.

    Returns each client's shard as a sorted int64 index array; the shards are disjoint and together hold every
    index. The same arguments always give the same shards (numpy `default_rng(seed)`). ValueError, naming
    the value, for labels that are not (N,) class ids >= 0, an unknown kind, num_clients < 1, beta <= 0,
    min_size < 0, or fewer than num_clients x min_size labels; and when the skewed splits' Dirichlet draws
    leave a client below min_size MAX_REDRAWS times.
    """
    labels = _checked_labels(labels)
    _check_split_settings(len(labels), num_clients, kind, beta, min_size)
    if num_clients == 1:
        return [np.arange(len(labels), dtype=np.int64)]
    shards = _draw_split(labels, num_clients, kind, beta, min_size, np.random.default_rng(seed))
    return [np.sort(shard).astype(np.int64) for shard in shards]


def _checked_labels(labels: np.ndarray) -> np.ndarray:
    """`labels` as an array, or ValueError unless it is (N,) integer class ids >= 0."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels have shape {labels.shape} and dtype {labels.dtype}, expected (N,) integers")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels hold {labels.min()}, expected class ids >= 0")
    return labels


def _check_split_settings(n: int, num_clients: int, kind: SplitKind, beta: float, min_size: int) -> None:
    """ValueError naming the first setting a split of n labels cannot run with."""
    if kind not in get_args(SplitKind):
        raise ValueError(f"split kind is {kind!r}, expected one of {get_args(SplitKind)}")
    if num_clients < 1:
        raise ValueError(f"num_clients is {num_clients}, expected >= 1")
    if not beta > 0:
        raise ValueError(f"beta is {beta}, expected > 0")
    if min_size < 0:
        raise ValueError(f"min_size is {min_size}, expected >= 0")
    if n < num_clients * min_size:
        raise ValueError(
            f"{n} images cannot give {num_clients} client{'' if num_clients == 1 else 's'} at least {min_size} images each (needs {num_clients * min_size}): "
            f"lower the number of clients (--num-clients)"
        )


def _draw_split(labels: np.ndarray, num_clients: int, kind: SplitKind, beta: float, min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The clients' shards (unsorted index arrays) of a split of `kind` over two or more clients."""
    if kind == "iid":
        return _split_iid(len(labels), num_clients, rng)
    if kind == "quantity":
        return _split_quantity_skew(labels, num_clients, beta, min_size, rng)
    return _split_label_skew(labels, num_clients, beta, min_size, rng)


def _split_iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """IID: a random permutation cut into equal shards (their image counts differ by at most one)."""
    return np.array_split(rng.permutation(n), num_clients)


def _split_quantity_skew(labels: np.ndarray, num_clients: int, beta: float, min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Quantity skew with balanced labels.

    Shard sizes follow NIID-Bench's "iid-diff-quantity" (Li et al. 2022, "Federated Learning on Non-IID
    Data Silos: An Experimental Study", `partition_data`): proportions q ~ Dir(beta), cut points
    floor(cumsum(q) * N), redrawn until every client has >= min_size images. Unlike NIID-Bench, whose
    clients take a plain random slice, each client's images are stratified over the classes, so every
    class appears in it in proportion to its share of the dataset (within one image).
    """
    n = len(labels)
    for _ in range(MAX_REDRAWS):
        proportions = rng.dirichlet(np.full(num_clients, beta))
        cuts = (np.cumsum(proportions) * n).astype(np.int64)[:-1]
        num_examples = np.diff(np.concatenate([[0], cuts, [n]]))  # (K,) images per client
        if num_examples.min() >= min_size:
            break
    else:
        raise _redraws_exhausted("quantity", num_clients, beta, min_size)

    # A stratified order of all images: image j (of m_c, shuffled) of class c sits at (j + 0.5) / m_c, so
    # any run of consecutive images holds every class in proportion, within one image per class.
    # Ties (equal class sizes) are broken by class, which makes the order a round-robin over classes.
    positions = np.empty(n, dtype=np.float64)
    shuffled = rng.permutation(n)
    for c in np.unique(labels):
        members = shuffled[labels[shuffled] == c]
        positions[members] = (np.arange(len(members)) + 0.5) / len(members)
    stratified = np.lexsort((labels, positions))
    return np.split(stratified, cuts)


def _split_label_skew(labels: np.ndarray, num_clients: int, beta: float, min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Dirichlet label skew: NIID-Bench's "noniid-labeldir" (Li et al. 2022, `partition_data`; FedLab's
    `hetero_dir_partition`), after Yurochkin et al. 2019 / Hsu et al. 2019.

    For every class in ascending order, shares over the clients are drawn from Dir(beta); a client that
    already holds >= N/K images gets a zero share of this and all later classes (the rest renormalised).
    The whole split is redrawn until every client has >= min_size images.

    With a tiny beta the draw is all but one-hot, and the open clients' shares can underflow to 0 while a full
    client takes all the mass; the open clients' shares are then drawn again from Dir(beta) over them alone,
    which is their renormalised shares' distribution (the Dirichlet's aggregation property). Draws whose
    open shares do not underflow (every normal beta) take no such step, so their split stays as it was.
    """
    n = len(labels)
    capacity = n / num_clients
    classes = np.unique(labels)
    for _ in range(MAX_REDRAWS):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        num_examples = np.zeros(num_clients, dtype=np.int64)  # (K,) images per client so far
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            is_open = num_examples < capacity  # the clients' image counts so far sum to less than N: some client is open
            proportions = rng.dirichlet(np.full(num_clients, beta)) * is_open
            if not proportions.sum() > 0:  # the open shares underflowed (a tiny beta)
                proportions = np.zeros(num_clients)
                proportions[is_open] = rng.dirichlet(np.full(int(is_open.sum()), beta))
            proportions = proportions / proportions.sum()
            cuts = (np.cumsum(proportions) * len(members)).astype(np.int64)[:-1]
            for client, share in enumerate(np.split(members, cuts)):
                shards[client].append(share)
                num_examples[client] += len(share)
        if num_examples.min() >= min_size:
            return [np.concatenate(shard) for shard in shards]
    raise _redraws_exhausted("label", num_clients, beta, min_size)


def _redraws_exhausted(kind: SplitKind, num_clients: int, beta: float, min_size: int) -> ValueError:
    return ValueError(
        f"{kind!r} split: {MAX_REDRAWS} Dirichlet draws at beta {beta} each left one of the {num_clients} clients with "
        f"fewer than {min_size} images; raise the concentration (--beta) or lower the number of clients (--num-clients)"
    )


@dataclass(frozen=True)
class ShardSummary:
    """One client's shard as logs and `feddiff split` show it."""

    client: int  # the client's index
    num_examples: int  # images in the shard
    classes: tuple[int, ...]  # images of class 0, 1, ...

    def as_json(self) -> dict[str, Any]:
        return {"client": self.client, "size": self.num_examples, "classes": list(self.classes)}


def describe_split(labels: np.ndarray, shards: list[np.ndarray], num_classes: int | None = None) -> list[ShardSummary]:
    """Each client's shard: its image count and class histogram (`num_classes` bins, default: max label + 1)."""
    labels = np.asarray(labels)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    return [ShardSummary(i, len(shard), tuple(np.bincount(labels[shard], minlength=num_classes).tolist())) for i, shard in enumerate(shards)]
