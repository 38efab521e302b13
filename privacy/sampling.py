"""Poisson client sampling, the sampling the subsampled-Gaussian RDP bound assumes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def poisson_sample(population: Sequence[int], sample_rate: float, rng: np.random.Generator) -> list[int]:
    """Each member joins independently with probability ``sample_rate``; may be empty."""
    keep = rng.random(len(population)) < sample_rate
    return [member for member, kept in zip(population, keep) if kept]


def fixed_size_sample(population: Sequence[int], size: int, rng: np.random.Generator) -> list[int]:
    """``size`` members uniformly without replacement (the reference code's sampling).

    Not what the Poisson-subsampled RDP bound assumes: only for ``clipping=paper``.
    """
    chosen = rng.choice(len(population), size=min(size, len(population)), replace=False)
    return [population[i] for i in sorted(chosen)]
