"""Opacus's PRV accountant (Gopi et al. 2021): the exact privacy loss, composed numerically."""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant

from dpfl.privacy.accountants.base import Accountant, HistoryKey


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


class PRVClientAccountant(Accountant):
    """Opacus's PRV accountant, one step per round; ε is its upper bound."""

    mechanism = "prv"

    def _privacy_spent(self, history: HistoryKey) -> tuple[float, float]:
        return prv_epsilon(history, self.delta), math.nan
