"""Empirical lower bounds on ε from one training run, and the one-shot estimate.

m canaries are each included independently with probability ½; after the run the
auditor gives every canary a score (higher: more likely included) computed from
what the threat model lets it see, and one of three statistics turns the scores
and the inclusion bits into a lower bound on ε at δ, valid with probability
``confidence`` (:func:`audit_scores`):

``threshold`` (Steinke, Nasr, Jagielski, NeurIPS 2023). Guess "included" for the
k₊ highest scores and "excluded" for the k₋ lowest, abstain on the rest. If the
mechanism is (ε, δ)-DP, the number W of correct guesses among r = k₊ + k₋
satisfies (the δ > 0 form of their main theorem, with p = e^ε/(1 + e^ε))

    P[W ≥ v] ≤ P[Bin(r, p) ≥ v] + 2mδ · max_{1≤i≤v} P[v > Bin(r, p) ≥ v − i] / i.

The largest ε that the observed v rejects at level β is the bound. It holds for any
(ε, δ)-DP mechanism, and cannot exceed about log(m): with 10³ canaries it proves
little more than ε ≈ 3.

``fdp`` (Mahloujifar, Melis, Chaudhuri, "Auditing f-Differential Privacy in One
Run", ICML 2025). The same top-k guesses, tested against the claim that the
mechanism's trade-off curve is that of the Gaussian mechanism with this (ε, δ)
(:func:`fdp_rejects`): tighter than ``threshold``, and valid for mechanisms whose
trade-off curve lies above the Gaussian one with the same (ε, δ), i.e. Gaussian
mechanisms and their compositions, not randomised response.

``gaussian`` (the Gaussian-pair view of Agrawal et al., "Let's Ask Gauss",
arXiv 2606.12733; Andrew et al., ICLR 2024). A canary's aligned signal summed over
rounds is asymptotically Gaussian: excluded canaries score N(m₀, s²), included ones
N(m₁, ·). The mechanism is then at least as leaky as the Gaussian mechanism with
μ = (m₁ − m₀)/s (μ-GDP, Dong, Roth & Su 2019), so the lower confidence limit of μ
(delta method, one-sided) gives the bound. It uses every canary rather than a
tail, so it can certify ε near the accountant's at ε = 8 where the other two
cannot, at the price of resting on the scores being Gaussian.

The one-shot estimate of Andrew et al. (arXiv 2302.03098) is the same μ without
the confidence margin: an estimate, not a bound. Both use the excluded canaries'
spread for s, as their analysis of the Gaussian mechanism does: with a fitted
included-canary variance, ε at small δ would follow the variance ratio, which
client sampling inflates (a ratio of 1.2 alone gives ε ≈ 10 at δ = 1e-5).

Why by hand: JAX Privacy's ``auditing`` implements the threshold and f-DP
statistics but needs JAX; the rest is scipy and dp-accounting's Gaussian
calibration (:func:`dp_accounting.get_epsilon_gaussian`). Pure math: no Flower,
no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from dp_accounting import get_epsilon_gaussian, get_sigma_gaussian
from scipy.optimize import brentq
from scipy.special import ndtr, ndtri
from scipy.stats import binom, norm

STATISTICS = ("threshold", "gaussian", "fdp")
# How a Gaussian bound reads when the draw left too few canaries on a side to fit μ.
NO_GAUSSIAN_FIT = "no fit: fewer than 2 included or excluded canaries"
# Guess counts tried, as fractions of the canaries: k₊ alone (an included canary that
# was never sampled looks excluded, so "excluded" guesses are weaker) and k₊ = k₋.
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)
# ε is searched up to here; beyond, the bound is reported as this value.
MAX_AUDITED_EPSILON = 50.0
# Bisection of a yes/no test over ε stops at this width.
EPSILON_TOLERANCE = 1e-4


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """An upper bound on P[W ≥ ``correct``] for an (ε, δ)-DP mechanism (Steinke et al.; see the module doc)."""
    _check_counts(canaries, guesses, correct)
    p = 1 / (1 + math.exp(-epsilon))
    tail = float(binom.sf(correct - 1, guesses, p))
    # max_i P[v > Bin ≥ v − i] / i, the cumulative masses below v divided by their width.
    below = np.cumsum(binom.pmf(np.arange(correct - 1, -1, -1), guesses, p))
    slack = float(np.max(below / np.arange(1, correct + 1))) if correct else 0.0
    return min(1.0, tail + 2 * canaries * delta * slack)


def one_run_epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float, level: float) -> float:
    """The largest ε whose p-value for ``correct`` of ``guesses`` is ≤ ``level`` (0 if none)."""
    if one_run_p_value(canaries, guesses, correct, 0.0, delta) > level:
        return 0.0
    if one_run_p_value(canaries, guesses, correct, MAX_AUDITED_EPSILON, delta) <= level:
        return MAX_AUDITED_EPSILON
    return float(brentq(lambda eps: one_run_p_value(canaries, guesses, correct, eps, delta) - level,
                        0.0, MAX_AUDITED_EPSILON, xtol=1e-6))  # fmt: skip


def gaussian_incorrect_floor(correct: float, mu: float) -> float:
    """The least probability of a wrong guess about a canary, given the probability ``correct`` of a right one,
    under μ-GDP: a test with power 1 − β has size at least Φ(Φ⁻¹(1 − β) − μ)."""
    return float(ndtr(ndtri(correct) - mu))


def fdp_rejects(
    canaries: int, guesses: int, correct: int, level: float, incorrect_floor: Callable[[float], float]
) -> bool:
    """Whether ``correct`` right guesses out of ``guesses`` reject, at ``level``, an f-DP claim.

    ``incorrect_floor`` is the claim's trade-off curve read as "least chance of a
    wrong guess given the chance of a right one" (:func:`gaussian_incorrect_floor`).
    The recursion of Mahloujifar et al.'s one-run analysis: were the event "at least
    ``correct`` right" as likely as ``level``, the mean per-canary masses of right
    (r) and wrong (h) guesses would have to start at level·v/m and level·(k − v)/m,
    and the curve then forces h up to the floor of r, which in turn forces r up by
    i/(k − i) of the increase for each of the v − 1 … 0 remaining right guesses. The
    claim is rejected when the masses so forced exceed the k/m that k guesses can
    carry.
    """
    _check_counts(canaries, guesses, correct)
    right = level * correct / canaries
    wrong = level * (guesses - correct) / canaries
    for remaining in range(correct - 1, -1, -1):
        forced = max(wrong, incorrect_floor(right))
        if forced == wrong:  # neither mass moves again
            break
        right = min(right + remaining / (guesses - remaining) * (forced - wrong), 1.0)
        wrong = forced
    return right + wrong > guesses / canaries


@lru_cache(maxsize=4096)
def gaussian_mu(epsilon: float, delta: float) -> float:
    """μ of the Gaussian mechanism that is exactly (ε, δ)-DP (dp-accounting's analytic calibration)."""
    return 1.0 / get_sigma_gaussian(epsilon, delta)


def fdp_epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float, level: float) -> float:
    """The largest ε whose Gaussian-curve claim at (ε, δ) the counts reject at ``level`` (0 if none)."""
    if not delta > 0:
        raise ValueError(f"the f-DP statistic needs delta > 0 (the Gaussian mechanism has no (epsilon, 0)), got {delta}")

    def rejected(epsilon: float) -> bool:
        mu = gaussian_mu(round(epsilon, 6), delta)
        return fdp_rejects(canaries, guesses, correct, level, lambda right: gaussian_incorrect_floor(right, mu))

    return _largest_rejected(rejected)


def gdp_epsilon(mu: float, delta: float) -> float:
    """ε at ``delta`` of a μ-GDP mechanism (the Gaussian mechanism with σ = 1/μ); 0 for μ ≤ 0."""
    if not mu > 0:
        return 0.0
    return min(float(get_epsilon_gaussian(1.0 / mu, delta)), MAX_AUDITED_EPSILON)


@dataclass(frozen=True)
class AuditBound:
    """One statistic's lower bound and how it was reached."""

    statistic: str
    epsilon_lower: float
    confidence: float
    canaries: int
    included: int
    # threshold and fdp: the best guess (k₊ "included", k₋ "excluded", how many right) and
    # how many guesses were tried (each at level (1 − confidence)/choices_tried).
    positive_guesses: int = 0
    negative_guesses: int = 0
    correct: int = 0
    choices_tried: int = 1
    # gaussian: the lower confidence limit of μ; None when the inclusion draw left fewer
    # than 2 canaries on a side (then the bound is the trivial ε ≥ 0).
    mu_lower: float | None = None

    def describe(self) -> str:
        """How the bound was reached, in a few words."""
        if self.statistic == "gaussian":
            return NO_GAUSSIAN_FIT if self.mu_lower is None else f"mu >= {self.mu_lower:.3f}"
        guesses = self.positive_guesses + self.negative_guesses
        return f"{self.correct} of {guesses} right (+{self.positive_guesses}/-{self.negative_guesses})"


@dataclass(frozen=True)
class OneShotEstimate:
    """Andrew et al.'s one-shot estimate: μ from the canaries' means and the excluded canaries' spread."""

    epsilon: float
    mu: float


def guess_choices(canaries: int) -> list[tuple[int, int]]:
    """(k₊, k₋) pairs tried for ``canaries`` canaries (see :data:`GUESS_FRACTIONS`)."""
    sizes = sorted({max(1, round(fraction * canaries)) for fraction in GUESS_FRACTIONS})
    pairs = [(k, 0) for k in sizes] + [(k, k) for k in sizes if 2 * k <= canaries]
    return pairs


def audit_scores(
    scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float, statistic: str = "threshold"
) -> AuditBound:
    """The one-run lower bound of ``statistic`` (:data:`STATISTICS`) from each canary's score."""
    scores, included = _checked(scores, included, confidence)
    if statistic == "threshold":
        return _guessing_bound(scores, included, delta, confidence, statistic, guess_choices(len(scores)),
                               one_run_epsilon_lower_bound)  # fmt: skip
    if statistic == "fdp":
        # One-sided guesses, as Mahloujifar et al. analyse them.
        choices = [(k, 0) for k, negative in guess_choices(len(scores)) if negative == 0]
        return _guessing_bound(scores, included, delta, confidence, statistic, choices, fdp_epsilon_lower_bound)
    if statistic == "gaussian":
        return _gaussian_bound(scores, included, delta, confidence)
    raise ValueError(f"unknown statistic {statistic!r}; known: {', '.join(STATISTICS)}")


def one_shot_estimate(scores: Sequence[float], included: Sequence[bool], delta: float) -> OneShotEstimate:
    """Andrew et al.'s estimate of ε at ``delta`` (no confidence: an estimate, not a bound)."""
    scores, included = _checked(scores, included, 0.5)
    fit = _gaussian_mu_and_error(scores, included)
    if fit is None:
        return OneShotEstimate(math.nan, math.nan)
    return OneShotEstimate(gdp_epsilon(fit[0], delta), fit[0])


def _guessing_bound(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float,
    statistic: str,
    choices: list[tuple[int, int]],
    bound_of: Callable[[int, int, int, float, float], float],
) -> AuditBound:
    canaries = len(scores)
    order = np.argsort(-scores, kind="stable")  # highest first
    level = (1 - confidence) / len(choices)
    best = None
    for positive, negative in choices:
        correct = int(included[order[:positive]].sum()) + int((~included[order[canaries - negative:]]).sum())
        bound = bound_of(canaries, positive + negative, correct, delta, level)
        if best is None or bound > best.epsilon_lower:
            best = AuditBound(statistic, bound, confidence, canaries, int(included.sum()), positive, negative,
                              correct, len(choices))  # fmt: skip
    assert best is not None
    return best


def _gaussian_mu_and_error(scores: np.ndarray, included: np.ndarray) -> tuple[float, float] | None:
    """μ̂ = (mean₁ − mean₀)/s₀ and its standard error by the delta method.

    None when fewer than 2 canaries are included or excluded: inclusion is a fair coin per
    canary (the one-run bounds need independent coins), so a small audit can draw that,
    and with one score on a side there is no spread to measure.
    """
    present, absent = scores[included], scores[~included]
    if len(present) < 2 or len(absent) < 2:
        return None
    spread = float(np.std(absent, ddof=1))
    shift = float(np.mean(present) - np.mean(absent))
    if spread == 0:
        return (math.inf if shift > 0 else 0.0), 0.0
    mu = shift / spread
    # Var(mean₁)/s₀² + Var(mean₀)/s₀² + μ²·Var(s₀)/s₀², with Var(s₀) ≈ s₀²/(2(n₀ − 1)).
    variance = float(np.var(present, ddof=1)) / (len(present) * spread**2) + 1 / len(absent) + mu**2 / (2 * (len(absent) - 1))
    return mu, math.sqrt(variance)


def _gaussian_bound(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float) -> AuditBound:
    fit = _gaussian_mu_and_error(scores, included)
    if fit is None:
        return AuditBound("gaussian", 0.0, confidence, len(scores), int(included.sum()))
    mu, error = fit
    mu_lower = mu - float(norm.ppf(confidence)) * error
    return AuditBound("gaussian", gdp_epsilon(mu_lower, delta), confidence, len(scores), int(included.sum()),
                      mu_lower=mu_lower)  # fmt: skip


def _largest_rejected(rejected: Callable[[float], bool]) -> float:
    """The largest ε in [0, MAX_AUDITED_EPSILON] with ``rejected(ε)``, for a test that rejects an interval from 0."""
    low = EPSILON_TOLERANCE
    if not rejected(low):
        return 0.0
    if rejected(MAX_AUDITED_EPSILON):
        return MAX_AUDITED_EPSILON
    high = MAX_AUDITED_EPSILON
    while high - low > EPSILON_TOLERANCE:
        middle = (low + high) / 2
        low, high = (middle, high) if rejected(middle) else (low, middle)
    return low


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}")


def _checked(scores: Sequence[float], included: Sequence[bool], confidence: float) -> tuple[np.ndarray, np.ndarray]:
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1 or not len(scores):
        raise ValueError("need one score and one inclusion flag per canary")
    if not np.all(np.isfinite(scores)):
        raise ValueError("every canary score must be finite")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return scores, included
