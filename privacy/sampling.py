"""Poisson client sampling, the sampling the subsampled-Gaussian RDP bound assumes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def poisson_sample(population: Sequence[int], sample_rate: float, rng: np.random.Generator) -> list[int]:
    """Each member joins independently with probability ``sample_rate``; may be empty."""
    keep = rng.random(len(population)) < sample_rate
    return [member for member, kept in zip(population, keep) if kept]
