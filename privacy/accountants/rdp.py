"""Rényi-DP accounting of client-level DP: one Poisson-subsampled Gaussian per round.

The RDP of the subsampled Gaussian and its conversion to (ε, δ) are Opacus's
(``opacus.accountants.analysis.rdp``, Mironov et al. 2019; Balle et al. 2020,
Thm. 21). What is added here: after Opacus's order grid, the best order is refined
between its grid neighbours (any order gives a valid bound, so the minimum over
more orders is as sound as over the grid and never larger). Flower's
``RdpAccountant`` stops at its fixed grid.

Opacus evaluates a fractional order by a series whose terms cancel: above its own
fractional grid (1.1 to 10.9) the series loses all precision at large σ (at σ = 40,
q = 0.25 it gives a negative RDP at order 127.5, and so a negative ε), while an
integer order is a finite sum of positive terms. So the refinement is continuous
only below :data:`FRACTIONAL_LIMIT` and runs over the integers above it.

Opacus and SciPy are imported when ε is first computed, not with this module, so
that ``dpfl`` starts without them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import cache, lru_cache

import numpy as np

from dpfl.privacy.accountants.base import Accountant, History, HistoryKey

# Orders added above Opacus's grid (which ends at 63): large σ and few rounds need them.
LARGE_ORDERS = (80.0, 128.0, 256.0, 512.0)
# The end of Opacus's fractional orders (its grid then goes on in integers from 12):
# fractional orders are refined only below it.
FRACTIONAL_LIMIT = 12.0


@cache
def default_orders() -> tuple[float, ...]:
    """Opacus's default RDP orders and :data:`LARGE_ORDERS`."""
    from opacus.accountants import RDPAccountant

    return tuple(float(order) for order in RDPAccountant.DEFAULT_ALPHAS) + LARGE_ORDERS


def _rdp(history: History, orders: np.ndarray | float) -> np.ndarray:
    orders_key = tuple(np.atleast_1d(orders).tolist())
    return sum(steps * _one_step_rdp(q, sigma, orders_key) for sigma, q, steps in history)


# RDP composes additively, so one step's curve per (q, σ) serves every round count;
# fractional orders cost a series evaluation each, which a run would otherwise repeat
# every round.
@lru_cache(maxsize=256)
def _one_step_rdp(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    from opacus.accountants.analysis import rdp as rdp_analysis

    return np.atleast_1d(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)))


def _to_dp(orders: np.ndarray, rdp: np.ndarray, delta: float) -> tuple[float, float]:
    from opacus.accountants.analysis import rdp as rdp_analysis

    # Opacus warns when the best order is at an end of the list it is given; the
    # refinement below calls it with a few orders at a time, so that warning is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, order = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    # The conversion can be below 0 for a tiny RDP and a large δ (or order): an (ε, δ)
    # guarantee with ε < 0 implies the one with ε = 0, which is what is reported.
    return max(float(eps), 0.0), float(order)


def _epsilon_at(history: History, order: float, delta: float) -> float:
    return _to_dp(np.atleast_1d(order), _rdp(history, order), delta)[0]


def epsilon_of_history(
    history: History, delta: float, orders: Sequence[float] | None = None, refine: bool = True
) -> tuple[float, float]:
    """(ε, best RDP order) after the rounds in ``history`` at ``delta`` (``orders``: the
    grid searched first, :func:`default_orders` if None)."""
    return _epsilon_of_history(tuple(map(tuple, history)), delta, tuple(orders or default_orders()), refine)


# Memoised: a run asks for ε after the next round (the budget check), then for the
# same ε once the round is released.
@lru_cache(maxsize=64)
def _epsilon_of_history(
    history: tuple[tuple[float, float, int], ...], delta: float, orders: tuple[float, ...], refine: bool
) -> tuple[float, float]:
    if not history or all(steps == 0 for _, _, steps in history):
        return 0.0, math.nan
    grid = np.asarray(sorted(orders), dtype=float)
    eps, order = _to_dp(grid, _rdp(history, grid), delta)
    if not refine or not math.isfinite(eps):
        return eps, order
    best = int(np.flatnonzero(grid == order)[0])
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    # A bracket can straddle FRACTIONAL_LIMIT (the grid's best at 10.9 or 12): its part below is
    # searched continuously and its part above over the integers, so that a best order between 11
    # and 12 is found whichever of 10.9 and 12 the grid picked (else ε could fall with more rounds).
    candidates = []
    if low < FRACTIONAL_LIMIT:
        from scipy.optimize import minimize_scalar

        found = minimize_scalar(
            lambda a: _epsilon_at(history, a, delta),
            bounds=(low, min(high, FRACTIONAL_LIMIT)),
            method="bounded",
            options={"xatol": 1e-4},
        )
        candidates += [(float(found.fun), float(found.x))] if found.success else []
    integers = np.arange(max(math.floor(low), FRACTIONAL_LIMIT) + 1, math.ceil(high), dtype=float)
    if len(integers):
        candidates.append(_to_dp(integers, _rdp(history, integers), delta))
    for refined_eps, refined_order in candidates:
        if refined_eps < eps:
            eps, order = refined_eps, refined_order
    return eps, order


def epsilon_for(
    noise_multiplier: float, sample_rate: float, rounds: int, delta: float, refine: bool = True
) -> tuple[float, float]:
    """(ε, best order) of ``rounds`` Poisson-subsampled Gaussian releases."""
    return epsilon_of_history([(noise_multiplier, sample_rate, rounds)], delta, refine=refine)


class RDPClientAccountant(Accountant):
    """Opacus's RDP analysis with one step per round and a refined order search."""

    mechanism = "rdp"

    def __init__(self, delta: float, refine: bool = True) -> None:
        super().__init__(delta)
        self.refine = refine

    def _privacy_spent(self, history: HistoryKey) -> tuple[float, float]:
        return epsilon_of_history(history, self.delta, refine=self.refine)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "refine": self.refine}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.refine = bool(state["refine"])
