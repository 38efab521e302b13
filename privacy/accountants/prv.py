"""Opacus's PRV accountant (Gopi et al. 2021): the exact privacy loss, composed numerically."""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

from dpfl.errors import UsageError
from dpfl.privacy.accountants.base import Accountant, HistoryKey

# Opacus's error bounds: ε to within EPS_ERROR, δ to within δ / 1000 (its defaults).
EPS_ERROR = 0.01
# The PRV's grid grows with ε and the number of rounds (Gopi et al.'s domain is about
# ε wide, its mesh EPS_ERROR / √rounds). Measured on the 2-core machine: 3M points take
# 5 s, 17M points 13-20 s, 49M points 160 s and then ε = inf; beyond this many points
# the history is refused (in one line) rather than computed for minutes.
MAX_GRID_POINTS = 2**24


@lru_cache(maxsize=64)
def prv_epsilon(history: HistoryKey, delta: float) -> float:
    """Opacus's PRV bound on ε after ``history``.

    The PRV accountant estimates ε with an error bound (EPS_ERROR, delta_error
    δ/1000); Opacus's ``get_epsilon`` returns the upper end of that bound, which is what
    keeps the budget stop sound, not the central estimate.
    """
    import numpy as np
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    accountant = PRVAccountant()
    accountant.history = list(history)
    # At q = 1 Opacus's PRV takes log(1 - q) = -inf on purpose, and it sizes its domain
    # with an RDP bound that may warn about its order grid: both warnings are noise here.
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        domain = accountant._get_domain(
            prvs=[PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history],
            num_self_compositions=[steps for _, _, steps in history], eps_error=EPS_ERROR, delta_error=delta / 1000,
        )  # fmt: skip
        if domain.size > MAX_GRID_POINTS:
            raise UsageError(
                f"the prv accountant would need {domain.size:.2g} grid points for {list(history)} (noise multiplier, "
                f"sample rate, rounds), more than {MAX_GRID_POINTS:.2g}: epsilon is far above any useful budget "
                f"(up to {domain.t_max:.0f}); use rdp or pld"
            )
        epsilon = float(accountant.get_epsilon(delta, eps_error=EPS_ERROR))
    if not math.isfinite(epsilon):
        raise UsageError(f"the prv accountant found no finite epsilon for {list(history)}; use rdp or pld")
    return epsilon


class PRVClientAccountant(Accountant):
    """Opacus's PRV accountant, one step per round; ε is its upper bound."""

    mechanism = "prv"

    def _privacy_spent(self, history: HistoryKey) -> tuple[float, float]:
        return prv_epsilon(history, self.delta), math.nan
