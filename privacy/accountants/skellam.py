"""Rényi-DP accounting of the distributed Skellam mechanism behind secure aggregation.

The accountant interface of :mod:`.base` (a ledger of (σ, q, rounds), ε at a fixed δ,
JSON state) for rounds of :mod:`dpfl.privacy.distributed_dp`: each round's RDP is the
Skellam bound at the run's rounded sensitivity with released noise μ = (σΔ₂)²/2 (what
any t threshold-sized shares carry), amplified by Poisson(q) with the sampled Gaussian's
binomial formula (a bound in both directions because Skellam noise is symmetric:
:func:`~dpfl.privacy.distributed_dp.poisson_subsampled_rdp`). The mechanism's values other
than σ and q (clip norm, dimension, bits) are fixed for the run and given at construction,
so noise calibration can search σ with this accountant as with any other. It takes the
mechanism's parameters, so it is built by whoever builds the run's secure aggregation, not
by name from ``ACCOUNTANTS``.
"""

from __future__ import annotations

from dpfl.privacy.accountants.base import Accountant, HistoryKey
from dpfl.privacy.distributed_dp import DistributedDPParams, ledger_epsilon


class DistributedSkellamAccountant(Accountant):
    mechanism = "skellam"

    def __init__(self, delta: float, params: DistributedDPParams) -> None:
        super().__init__(delta)
        self.params = params

    def _privacy_spent(self, history: HistoryKey) -> tuple[float, float]:
        return ledger_epsilon(self.params, history, self.delta)
