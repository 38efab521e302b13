"""Seeded, reproducible partitions of a training set over clients."""

from __future__ import annotations

import numpy as np

from dpfl.errors import UsageError

PARTITION_SCHEMES = ("iid", "dirichlet")
# Redraws of a Dirichlet partition before giving up on one where every client has data.
DIRICHLET_MAX_DRAWS = 100


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
    # Per class, client shares ~ Dir(alpha); redraw until no client is left empty.
    classes = np.unique(labels)
    for _ in range(DIRICHLET_MAX_DRAWS):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) > 0:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise UsageError(
        f"Dirichlet(alpha={alpha}) left a client without data in {DIRICHLET_MAX_DRAWS} draws; "
        "use fewer clients or a larger alpha"
    )
