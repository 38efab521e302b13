"""Quantile-based adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021).

Each sampled client also reports the bit b = [‖u‖ ≤ C] of its private part u. The
server releases the noisy fraction of unclipped updates and moves C geometrically
towards the target quantile γ of the update norms:

    b̃ = (Σ (b_i − ½) + N(0, σ_b²)) / (qN) + ½,      C ← C · exp(−η_C (b̃ − γ)).

The bits are centred (b − ½ ∈ {−½, +½}, sensitivity ½) and the ½ added back with
the *expected* count qN: under Poisson sampling the realised count is private, so
the shift must not depend on it (Flower and the paper, with a fixed cohort size m,
shift by m). The mechanism raises the update's noise multiplier to

    σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2)

(the paper's Theorem 1; with ``min-replies`` the reply count's share is taken too): per client the two releases then form one Gaussian
mechanism whose noise-normalised sensitivity is √(σ_Δ⁻² + (2σ_b)⁻²) = 1/σ, so the
accountant, told σ, accounts both exactly, sampling amplification included.

Pure math: no Flower, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dpfl.errors import UsageError
from dpfl.privacy.randomness import RandomStream

CLIP_MODES = ("fixed", "adaptive")
# The sensitivity of one client's centred bit b − ½.
CENTRED_BIT_SENSITIVITY = 0.5
# Andrew et al.'s choice of σ_b: the expected cohort size over 20.
COUNT_NOISE_PER_EXPECTED_CLIENT = 1 / 20
# The automatic σ_b is raised, where qN/20 is too small, so that σ_Δ ≤ 1.05 σ.
MAX_UPDATE_NOISE_INFLATION = 1.05


def count_noise_multiplier(count_noise_std: float) -> float:
    """The clipped count's noise multiplier: σ_b over the centred bit's sensitivity ½.

    The mechanism splits σ with it (:func:`dpfl.privacy.mechanism.split_noise_multiplier`):
    σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2).
    """
    return count_noise_std / CENTRED_BIT_SENSITIVITY


def check_count_noise(noise_multiplier: float, count_noise_std: float) -> None:
    """Refuse 2σ_b ≤ σ: the count alone would then cost at least the whole budget."""
    if not count_noise_multiplier(count_noise_std) > noise_multiplier:
        raise UsageError(
            f"clip-count-noise {count_noise_std:g} must be more than half the noise multiplier "
            f"({noise_multiplier / 2:.4g}): the clipped count would cost the whole privacy budget"
        )


def default_count_noise_std(expected_clients: float, noise_multiplier: float) -> float:
    """qN/20 (Andrew et al.), raised where needed so that σ_Δ is at most 5% above σ."""
    # σ_Δ/σ = (1 − (σ/2σ_b)²)^(−1/2) ≤ k  ⇔  σ_b ≥ σ / (2√(1 − k⁻²)).
    smallest = noise_multiplier * CENTRED_BIT_SENSITIVITY / math.sqrt(1 - MAX_UPDATE_NOISE_INFLATION**-2)
    return max(COUNT_NOISE_PER_EXPECTED_CLIENT * expected_clients, smallest)


def check_adaptive_clipping_supported(noise_placement: str, clipping: str) -> None:
    """Adaptive clipping needs flat clipping and the noise added on the server."""
    if clipping != "flat":
        raise UsageError(f"adaptive clipping needs clipping=flat, got clipping={clipping!r}")
    if noise_placement != "server":
        # The count noise is the server's; with client placement the server would see raw bits.
        raise UsageError(f"adaptive clipping needs noise-placement server, got {noise_placement!r}")


@dataclass(frozen=True)
class AdaptiveClipping:
    """The public parameters of quantile-based adaptive clipping."""

    target_quantile: float  # γ: the fraction of updates that should end up unclipped
    learning_rate: float  # η_C of the geometric update
    count_noise_std: float  # σ_b, on the sum of centred bits

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise UsageError(f"target-quantile must be in (0, 1), got {self.target_quantile}")
        if not self.learning_rate > 0:
            raise UsageError(f"clip-lr must be > 0, got {self.learning_rate}")
        if not self.count_noise_std > 0:
            raise UsageError(f"clip-count-noise must be > 0, got {self.count_noise_std}")

    @classmethod
    def resolve(
        cls, target_quantile: float, learning_rate: float, count_noise_std: float, expected_clients: float,
        noise_multiplier: float,
    ) -> AdaptiveClipping:  # fmt: skip
        """The run's parameters; ``count_noise_std`` 0 takes :func:`default_count_noise_std`."""
        count_noise_std = count_noise_std or default_count_noise_std(expected_clients, noise_multiplier)
        return cls(target_quantile, learning_rate, count_noise_std)

    def noisy_unclipped_fraction(self, bits: Sequence[float], expected_clients: float, stream: RandomStream) -> float:
        """b̃: the centred bit sum plus N(0, σ_b²), over qN, plus ½.

        Every bit is clamped to [0, 1] first, so the sensitivity is ½ whatever a client sent.
        """
        centred = sum(min(1.0, max(0.0, float(bit))) - 0.5 for bit in bits)
        noise = float(stream.gaussian((1,), self.count_noise_std)[0])
        return (centred + noise) / expected_clients + 0.5

    def next_clip_norm(self, clip_norm: float, unclipped_fraction: float) -> float:
        """C · exp(−η_C (b̃ − γ)): smaller when more than γ of the updates fit under C."""
        return clip_norm * math.exp(-self.learning_rate * (unclipped_fraction - self.target_quantile))


def unclipped_bit(norm: float, clip_norm: float) -> int:
    """[‖u‖ ≤ C]; a non-finite norm (an update sent as zeros) counts as clipped."""
    return int(bool(np.isfinite(norm)) and norm <= clip_norm)
