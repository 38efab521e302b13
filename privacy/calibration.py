"""Noise calibration: the smallest σ whose client-level ε meets a target, for any accountant."""

from __future__ import annotations

import math

from dpfl.errors import UsageError
from dpfl.privacy.accountants import Accountant, History, create_accountant
from dpfl.privacy.accountants.last_iterate import last_iterate_epsilon
from dpfl.privacy.participation import ParticipationSchema, accounted_shape

# Noise multipliers searched by calibration.
MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER = 1e-2, 1e3


def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, rounds: int, accountant: str | Accountant = "rdp",
    prior: History = (),
) -> float:
    """Smallest σ (to 1e-4 relative) whose ε after ``rounds`` rounds is ≤ ``target_epsilon``.

    ``accountant``: a name from ``ACCOUNTANTS``, or an accountant of a mechanism that needs
    more than a name (secure aggregation's Skellam), searched like RDP.

    ``prior``: rounds already spent on the same clients (an earlier run's ledger),
    which the target includes. A target that even σ = :data:`MAX_NOISE_MULTIPLIER`
    does not reach is refused with the smallest ε that σ gives.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise UsageError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    spent = (accountant if isinstance(accountant, Accountant) else create_accountant(accountant, delta)).spent
    name = accountant.mechanism if isinstance(accountant, Accountant) else accountant
    already = spent(prior)[0]
    if already >= target_epsilon:
        raise UsageError(
            f"target epsilon {target_epsilon} is already spent: the ledger carried over gives epsilon {already:.3f}"
        )

    def excess(sigma: float) -> float:
        return spent([*prior, (sigma, sample_rate, rounds)])[0] - target_epsilon

    smallest = excess(MAX_NOISE_MULTIPLIER) + target_epsilon
    if smallest > target_epsilon:
        raise UsageError(
            f"target epsilon {target_epsilon:g} cannot be reached in {rounds} rounds at sample rate {sample_rate:g}: "
            f"the smallest epsilon ({name}, delta {delta:g}) with a noise multiplier up to "
            f"{MAX_NOISE_MULTIPLIER:g} is {smallest:.4g}"
        )
    if not isinstance(accountant, str) or accountant == "rdp":
        low, high = MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER
    else:
        # PRV and PLD bound ε more tightly than RDP, so RDP's σ (where RDP reaches the
        # target) meets it too and the search brackets the answer below it: these
        # accountants get slow at small σ. The guard covers their small numerical error.
        try:
            high = calibrate_noise_multiplier(target_epsilon, delta, sample_rate, rounds, prior=prior)
        except UsageError:  # beyond RDP's reach, not beyond this accountant's
            high = MAX_NOISE_MULTIPLIER
        while excess(high) > 0:
            high = min(high * 1.01, MAX_NOISE_MULTIPLIER)
        low = max(high / 2, MIN_NOISE_MULTIPLIER)
        while excess(low) <= 0 and low > MIN_NOISE_MULTIPLIER:
            low = max(low / 2, MIN_NOISE_MULTIPLIER)
    if excess(low) <= 0:
        return low
    from scipy.optimize import brentq

    sigma = brentq(excess, low, high, rtol=1e-6)
    # brentq may land a hair on the wrong side of the root: step up until within budget.
    while excess(sigma) > 0:
        sigma *= 1 + 1e-4
    return float(sigma)


def privacy_spent(
    accountant: str, sample_rate: float, rounds: int, delta: float, *,
    noise_multiplier: float | None = None, target_epsilon: float | None = None,
    schema: ParticipationSchema | None = None,
) -> dict[str, float | int | str | None]:
    """One accountant's row for one mechanism: σ (given, or calibrated to ``target_epsilon``) and the ε it spends.

    ``schema`` (None: Poisson sampling, independent noise) decides what the accountant
    composes, one step per block of min-separation rounds (:func:`accounted_shape`),
    and the noise the model carries: ``model-noise`` is the RMS over the rounds of the
    noise std in the model (a sum of released means), per coordinate, in units of C/N.
    """
    rate, steps = accounted_shape(schema, sample_rate, rounds)
    sigma = noise_multiplier or calibrate_noise_multiplier(target_epsilon, delta, rate, steps, accountant=accountant)
    epsilon, order = create_accountant(accountant, delta).spent([(sigma, rate, steps)])
    error = schema.factorisation.total_squared_error() if schema is not None else rounds * (rounds + 1) / 2
    fraction = (schema.expected_clients(sample_rate, 1) if schema is not None else sample_rate)
    model_noise = sigma * math.sqrt(error / rounds) / fraction
    return {"accountant": accountant, "noise-multiplier": sigma, "sample-rate": sample_rate, "rounds": rounds,
            "delta": delta, "epsilon": epsilon, "best-rdp-order": None if math.isnan(order) else order,
            # A heuristic for who sees only the final model (Steinke et al. 2025), not a guarantee; it
            # assumes independent noise in every round a client may take part in (Poisson only).
            "last-iterate-epsilon": last_iterate_epsilon([(sigma, sample_rate, rounds)], delta) if schema is None else None,
            "mechanism": schema.mechanism if schema is not None else "gaussian",
            "participation": schema.participation if schema is not None else "poisson",
            "min-separation": schema.min_separation if schema is not None else 1,
            "accounted-steps": steps, "accounted-sample-rate": rate, "model-noise": model_noise}  # fmt: skip
