"""Seeded, reproducible partitions of a training set over clients."""

from __future__ import annotations

import numpy as np

from dpfl.errors import UsageError

PARTITION_SCHEMES = ("iid", "dirichlet")


def partition_indices(
    labels: np.ndarray, num_clients: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``num_clients`` disjoint, non-empty parts."""
    n = len(labels)
    if num_clients < 1:
        raise UsageError(f"number of clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise UsageError(f"{num_clients} clients is more than the {n} training samples")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]
    if scheme == "dirichlet":
        if not alpha > 0:
            raise UsageError(f"Dirichlet alpha must be > 0, got {alpha}")
        return _dirichlet(np.asarray(labels), num_clients, alpha, rng)
    raise UsageError(f"unknown partition {scheme!r}; choose one of {', '.join(PARTITION_SCHEMES)}")


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Each client draws its label mix p_i ~ Dir(α) and fills its share of the data from it.

    Clients get equal shares (as in the DP-FedPGN reference setup), drawn without
    replacement from per-class pools; a client whose preferred classes have run out
    takes from what is left, renormalising its own p_i. Unlike splitting each class
    over clients, this leaves no client empty however many there are.
    """
    classes = np.unique(labels)
    pools = {int(c): list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    sizes = [len(part) for part in np.array_split(np.arange(len(labels)), num_clients)]
    parts = []
    for size in sizes:
        mix = rng.dirichlet(np.full(len(classes), alpha))
        taken: list[int] = []
        while len(taken) < size:
            available = np.array([len(pools[int(c)]) > 0 for c in classes])
            weights = np.where(available, mix, 0.0)
            weights = weights / weights.sum() if weights.sum() > 0 else available / available.sum()
            counts = rng.multinomial(size - len(taken), weights)
            for c, count in zip(classes, counts):
                pool = pools[int(c)]
                grab = min(int(count), len(pool))
                taken.extend(pool[:grab])
                del pool[:grab]
        parts.append(np.sort(np.asarray(taken, dtype=np.int64)))
    return parts


def check_partition_id(partition_id: int, num_partitions: int) -> None:
    """Refuse a partition id outside ``0 .. num_partitions - 1`` (and a count below 1), in one line."""
    if num_partitions < 1:
        raise UsageError(f"num-partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise UsageError(
            f"partition-id must be in 0..{num_partitions - 1} for {num_partitions} partitions, got {partition_id}"
        )
