"""Rényi-DP accounting of the distributed Skellam mechanism behind secure aggregation.

The accountant interface of :mod:`.base` (a ledger of (σ, q, rounds), ε at a fixed δ,
JSON state) for rounds of :mod:`dpfl.privacy.distributed_dp`: each round's RDP is the
Skellam bound at the run's rounded sensitivity and threshold-sized noise, amplified by
Poisson(q) with Zhu and Wang's general bound. The mechanism's values other than σ and q
(clip norm, dimension, threshold, clients, bits) are fixed for the run and given at
construction; a ledger entry with another σ is refused rather than accounted as if it
were this mechanism. It takes the mechanism's parameters, so it is built by whoever
builds the run's secure aggregation, not by name from ``ACCOUNTANTS``.
"""

from __future__ import annotations

from dpfl.privacy.accountants.base import Accountant, HistoryKey
from dpfl.privacy.distributed_dp import DistributedDPParams, epsilon


class DistributedSkellamAccountant(Accountant):
    mechanism = "skellam"

    def __init__(self, delta: float, params: DistributedDPParams) -> None:
        super().__init__(delta)
        self.params = params

    def _privacy_spent(self, history: HistoryKey) -> tuple[float, float]:
        others = sorted({sigma for sigma, _, _ in history} - {self.params.noise_multiplier})
        if others:
            raise ValueError(
                f"the ledger holds rounds at noise multipliers {others}, but this accountant covers the distributed "
                f"Skellam mechanism at {self.params.noise_multiplier:g} only"
            )
        return epsilon(self.params, [(q, steps) for _, q, steps in history], self.delta)
