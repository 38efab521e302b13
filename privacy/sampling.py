"""Client sampling from a secure stream: Poisson, as the subsampled-Gaussian bound assumes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dpfl.privacy.randomness import RandomStream


def poisson_sample(population: Sequence[int], sample_rate: float, stream: RandomStream) -> list[int]:
    """Each member joins independently with probability ``sample_rate``; may be empty."""
    keep = stream.bernoulli(len(population), sample_rate)
    return [member for member, kept in zip(population, keep) if kept]


def fixed_size_sample(population: Sequence[int], size: int, stream: RandomStream) -> list[int]:
    """``size`` members uniformly without replacement (the DP-FedPGN authors' code's sampling).

    Not what the Poisson-subsampled RDP bound assumes: only for ``clipping=paper``.
    The ranks of secure uniforms give a uniformly random order.
    """
    order = np.argsort(stream.uniform(len(population)), kind="stable")
    return [population[i] for i in sorted(order[: min(size, len(population))])]
