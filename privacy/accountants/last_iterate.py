"""The last-iterate heuristic ε (Steinke, Nasr, Ganesh, Balle, Choquette-Choo, Jagielski, Hayes,
Thakurta, Smith, Terzis, "The Last Iterate Advantage", ICLR 2025, arXiv 2410.06186).

An accountant's ε covers everyone who sees every released model. Someone who sees
only the final model sees less; the heuristic prices what it sees when every
client's contribution is the same vector in every round it is sampled (their
"linear losses", under which the final model is the sum of the releases). A client
then moves the sum by K·C, K the number of rounds it was sampled in (a sum of
Bernoulli(q_t)), under Gaussian noise of variance Σ_t σ_t²C²: the mechanism is

    with the client: Σ_k P[K = k] · N(k, τ²)    without it: N(0, τ²),    τ² = Σ_t σ_t²,

and the heuristic ε at δ is that scalar mechanism's (both adjacency directions).
It is a heuristic, not a guarantee (there are contrived losses that beat it), but it
upper-bounded every audit of the final model they ran; dpfl reports it beside the
accountant's ε, never instead of it.

Why by hand: dp-accounting builds this mixture's PLD (``MixtureOfGaussiansDpEvent``)
in about 80 s for 40 rounds; since the privacy loss of a mixture of Gaussians with
non-negative shifts is increasing in the output, each δ(ε) is a few normal tails
at the root of one monotone equation, which takes milliseconds. Pure math.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.special import logsumexp, ndtr
from scipy.stats import binom

from dpfl.privacy.accountants.base import History

# ε is searched up to here (e^ε must stay a float).
MAX_EPSILON = 500.0


def participation_distribution(history: History) -> np.ndarray:
    """P[K = k] for k = 0 … rounds, K the number of rounds a client is sampled in (Poisson sampling)."""
    distribution = np.ones(1)
    for _, sample_rate, rounds in history:
        distribution = np.convolve(distribution, binom.pmf(np.arange(int(rounds) + 1), int(rounds), sample_rate))
    return distribution


def last_iterate_epsilon(history: History, delta: float) -> float:
    """The heuristic ε at ``delta`` of the final model after the rounds of ``history`` (see the module doc)."""
    rounds = sum(int(steps) for _, _, steps in history)
    if rounds == 0:
        return 0.0
    noise = math.sqrt(sum(int(steps) * sigma**2 for sigma, _, steps in history))
    if noise == 0:
        return math.inf
    weights = participation_distribution(history)
    kept = weights > 0
    shifts, log_weights = np.arange(len(weights))[kept] / noise, np.log(weights[kept])

    # The loss's infimum (x → −∞): log P[K = 0], or −∞ when every round samples everyone.
    lowest_loss = log_weights[0] if shifts[0] == 0 else -math.inf

    def privacy_loss(x: float) -> float:
        """log of (with the client)/(without) at the noise-normalised output x: increasing in x."""
        return float(logsumexp(log_weights + shifts * x - shifts**2 / 2))

    def output_where_loss_is(level: float) -> float:
        low, high = -1.0, 1.0
        while privacy_loss(low) > level:
            low *= 2
        while privacy_loss(high) < level:
            high *= 2
        return brentq(lambda x: privacy_loss(x) - level, low, high, xtol=1e-12)

    def excess_delta(epsilon: float) -> float:
        # With the client against without: outputs whose loss exceeds ε (the upper tail).
        upper = output_where_loss_is(epsilon)
        remove = float(np.sum(weights[kept] * ndtr(shifts - upper))) - math.exp(epsilon) * float(ndtr(-upper))
        # Without against with: the loss stays above log P[K = 0], so only a lower tail below −ε counts.
        add = 0.0
        if lowest_loss < -epsilon:
            lower = output_where_loss_is(-epsilon)
            add = float(ndtr(lower)) - math.exp(epsilon) * float(np.sum(weights[kept] * ndtr(lower - shifts)))
        return max(remove, add) - delta

    if excess_delta(0.0) <= 0:
        return 0.0
    if excess_delta(MAX_EPSILON) > 0:
        return MAX_EPSILON
    return float(brentq(excess_delta, 0.0, MAX_EPSILON, xtol=1e-9))
