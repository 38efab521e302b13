"""An empirical lower bound on ε from one training run (Steinke, Nasr, Jagielski, NeurIPS 2023).

m canaries are each included independently with probability ½; after the run the
auditor scores every canary, guesses "included" for the k₊ highest scores and
"excluded" for the k₋ lowest, and abstains on the rest. If the mechanism is
(ε, δ)-DP, the number W of correct guesses among r = k₊ + k₋ satisfies (the
δ > 0 form of their main theorem, with p = e^ε/(1 + e^ε) the accuracy of
ε-randomised response)

    P[W ≥ v] ≤ P[Bin(r, p) ≥ v] + 2mδ · max_{1≤i≤v} P[v > Bin(r, p) ≥ v − i] / i.

The largest ε that the observed v rejects at level β is the lower bound: with
probability ≥ 1 − β it is below the mechanism's true ε. Several (k₊, k₋) are
tried, each at level β / (number tried) (a union bound), so picking the best
afterwards keeps the confidence.

Why by hand: the published implementations (JAX Privacy's ``auditing``, the
authors' notebook) come with JAX or are not packaged; the statistics here are
only scipy's binomial tail and a bisection. Pure math: no Flower, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.stats import binom

# Guess counts tried, as fractions of the canaries: k₊ alone (an included canary that
# was never sampled looks excluded, so "excluded" guesses are weaker) and k₊ = k₋.
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)
# ε is searched up to here; beyond, the bound is reported as this value.
MAX_AUDITED_EPSILON = 50.0


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """An upper bound on P[W ≥ ``correct``] for an (ε, δ)-DP mechanism (see the module doc)."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}")
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


@dataclass(frozen=True)
class AuditBound:
    """The best guess of an audit: its lower bound and how it was reached."""

    epsilon_lower: float
    confidence: float
    canaries: int
    included: int
    positive_guesses: int  # k₊
    negative_guesses: int  # k₋
    correct: int
    choices_tried: int


def guess_choices(canaries: int) -> list[tuple[int, int]]:
    """(k₊, k₋) pairs tried for ``canaries`` canaries (see :data:`GUESS_FRACTIONS`)."""
    sizes = sorted({max(1, round(fraction * canaries)) for fraction in GUESS_FRACTIONS})
    pairs = [(k, 0) for k in sizes] + [(k, k) for k in sizes if 2 * k <= canaries]
    return pairs


def audit_scores(scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float) -> AuditBound:
    """The one-run lower bound from each canary's score (higher: more likely included)."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1 or not len(scores):
        raise ValueError("need one score and one inclusion flag per canary")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    canaries = len(scores)
    order = np.argsort(-scores, kind="stable")  # highest first
    choices = guess_choices(canaries)
    level = (1 - confidence) / len(choices)
    best = None
    for positive, negative in choices:
        correct = int(included[order[:positive]].sum()) + int((~included[order[canaries - negative:]]).sum())
        bound = one_run_epsilon_lower_bound(canaries, positive + negative, correct, delta, level)
        if best is None or bound > best.epsilon_lower:
            best = AuditBound(bound, confidence, canaries, int(included.sum()), positive, negative, correct, len(choices))
    assert best is not None
    return best
