"""The client-level accountant interface, and the PRV and PLD accountants.

Every accountant counts one Poisson-subsampled Gaussian release per round and
keeps Opacus's history format, ``[(noise multiplier, sample rate, rounds), ...]``,
with consecutive equal rounds merged. Its ε is a pure, memoised function of that
history: a run asks for ε after the next round (the budget check), then for the
same ε once the round is released, so each round costs one computation.

``prv`` is Opacus's PRV accountant (Gopi et al. 2021), ``pld`` is dp-accounting's
PLD accountant (Koskela et al.; Doroshenko et al. 2022). Both compose the exact
privacy loss numerically and are tighter than RDP; the RDP accountant and the
registry of all three are in :mod:`dpfl.privacy.accounting`.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache
from typing import ClassVar

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from opacus.accountants import PRVAccountant

from dpfl.errors import UsageError

# (noise multiplier, sample rate, number of rounds), as in Opacus's accountant history.
History = Sequence[tuple[float, float, int]]
HistoryKey = tuple[tuple[float, float, int], ...]

# dp-accounting's default is 1e-4. Its PLD is a pessimistic estimate, an upper bound at
# any interval; 1e-3 is ~10x faster and on the test grid at most 0.3% (0.002 in ε) looser.
PLD_VALUE_DISCRETIZATION = 1e-3


class Accountant(ABC):
    """ε of client-level DP after the rounds recorded so far, at a fixed δ.

    ``state_dict`` round-trips through JSON, so a resumed run keeps its full ledger.
    """

    mechanism: ClassVar[str]

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self._history: list[tuple[float, float, int]] = []

    @abstractmethod
    def _privacy_spent(self, history: HistoryKey) -> tuple[float, float]:
        """(ε, best RDP order or NaN) after a non-empty ``history``."""

    def spent(self, history: History) -> tuple[float, float]:
        """(ε, best RDP order, NaN for accountants without one) after ``history``, not recorded."""
        if not any(steps for _, _, steps in history):
            return 0.0, math.nan
        return self._privacy_spent(tuple(map(tuple, history)))

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self._history = _with_round(self._history, noise_multiplier, sample_rate)

    def privacy_spent(self) -> tuple[float, float]:
        return self.spent(self._history)

    def epsilon(self) -> float:
        return self.privacy_spent()[0]

    def epsilon_after_step(self, noise_multiplier: float, sample_rate: float) -> float:
        """ε if one more round were released, without recording it."""
        return self.spent(_with_round(self._history, noise_multiplier, sample_rate))[0]

    def state_dict(self) -> dict:
        return {"accountant": self.mechanism, "delta": self.delta, "history": [list(h) for h in self._history]}

    def continue_from(self, history: History) -> None:
        """Count the rounds of ``history`` (another run's ledger over the same clients) as already spent.

        Only the (σ, q, rounds) history carries over: composition does not depend on
        δ or on which accountant recorded it, so this accountant's ε covers both runs.
        """
        merged: list[tuple[float, float, int]] = []
        for sigma, q, steps in [*history, *self._history]:
            for _ in range(int(steps)):
                merged = _with_round(merged, float(sigma), float(q))
        self._history = merged

    def load_state_dict(self, state: dict) -> None:
        # States saved before the accountant was selectable are RDP's.
        saved = state.get("accountant", "rdp")
        if saved != self.mechanism:
            raise UsageError(
                f"this run was accounted with {saved!r}; it cannot be resumed with the {self.mechanism!r} accountant"
            )
        self.delta = float(state["delta"])
        self._history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]


def _with_round(history: History, noise_multiplier: float, sample_rate: float) -> list[tuple[float, float, int]]:
    """``history`` plus one round, merged into the last entry when σ and q are unchanged (as Opacus does)."""
    if history and history[-1][:2] == (noise_multiplier, sample_rate):
        return [*history[:-1], (noise_multiplier, sample_rate, history[-1][2] + 1)]
    return [*history, (noise_multiplier, sample_rate, 1)]


@lru_cache(maxsize=64)
def prv_epsilon(history: HistoryKey, delta: float) -> float:
    """Opacus's PRV bound on ε after ``history``.

    The PRV accountant estimates ε with an error bound (eps_error 0.01, delta_error
    δ/1000); Opacus's ``get_epsilon`` returns the upper end of that bound, which is what
    keeps the budget stop sound, not the central estimate.
    """
    accountant = PRVAccountant()
    accountant.history = list(history)
    # At q = 1 Opacus's PRV takes log(1 - q) = -inf on purpose, and it sizes its domain
    # with an RDP bound that may warn about its order grid: both warnings are noise here.
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


@lru_cache(maxsize=64)
def pld_epsilon(history: HistoryKey, delta: float) -> float:
    """dp-accounting's PLD (pessimistic, add-or-remove-one) ε after ``history``.

    Each entry is composed as one round's PLD self-convolved ``rounds`` times (one FFT
    power), not round by round.
    """
    accountant = PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
    for noise_multiplier, sample_rate, rounds in history:
        accountant.compose(
            dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), rounds
        )
    return float(accountant.get_epsilon(delta))


class PRVClientAccountant(Accountant):
    """Opacus's PRV accountant, one step per round; ε is its upper bound."""

    mechanism = "prv"

    def _privacy_spent(self, history: HistoryKey) -> tuple[float, float]:
        return prv_epsilon(history, self.delta), math.nan


class PLDClientAccountant(Accountant):
    """dp-accounting's PLD accountant, one Poisson-sampled Gaussian event per round."""

    mechanism = "pld"

    def _privacy_spent(self, history: HistoryKey) -> tuple[float, float]:
        return pld_epsilon(history, self.delta), math.nan
