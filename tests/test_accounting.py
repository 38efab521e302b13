"""Client-level RDP accounting against Opacus, an exact integral, dp-accounting and Flower."""

from __future__ import annotations

import math

import dp_accounting
import mpmath
import pytest
from dp_accounting import rdp as dp_rdp
from hypothesis import given, settings
from hypothesis import strategies as st
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from dpfl.errors import UsageError
from dpfl.privacy.accountants import RDPClientAccountant, create_accountant
from dpfl.privacy.accountants.rdp import default_orders, epsilon_for, epsilon_of_history
from dpfl.privacy.calibration import calibrate_noise_multiplier

# (sigma, q, rounds, delta)
GRID = [
    (0.8, 0.25, 40, 1e-5),
    (1.0, 0.1, 200, 1e-5),
    (1.318, 0.25, 40, 1e-5),
    (2.0, 0.01, 1000, 1e-6),
    (5.0, 0.5, 10, 1e-3),
]
INTEGER_ORDERS = tuple(float(a) for a in range(2, 257))


def exact_rdp(q: float, sigma: float, alpha: float) -> float:
    """RDP of one Poisson-subsampled Gaussian by numerical integration (Mironov et al. 2019, Sec. 3.3)."""
    mpmath.mp.dps = 40
    density = lambda z: mpmath.npdf(z, 0, sigma) * ((1 - q) + q * mpmath.e ** ((2 * z - 1) / (2 * sigma**2))) ** alpha
    moment = mpmath.quad(density, [-mpmath.inf, -10, 0, 1, 10, 50, mpmath.inf])
    return float(mpmath.log(moment) / (alpha - 1))


@pytest.mark.parametrize("sigma,q,rounds,delta", GRID)
def test_epsilon_matches_opacus_accountant_on_the_same_orders(sigma, q, rounds, delta):
    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    expected, _ = accountant.get_privacy_spent(delta=delta, alphas=list(default_orders()))
    assert epsilon_for(sigma, q, rounds, delta, refine=False)[0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("sigma,q,rounds,delta", GRID)
def test_epsilon_matches_dp_accounting_on_integer_orders(sigma, q, rounds, delta):
    reference = dp_rdp.RdpAccountant(orders=list(INTEGER_ORDERS))
    reference.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds)
    expected = reference.get_epsilon(delta)
    ours, _ = epsilon_of_history([(sigma, q, rounds)], delta, orders=INTEGER_ORDERS, refine=False)
    assert ours == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("sigma,q,rounds,delta", GRID)
def test_refined_order_is_a_valid_bound_no_larger_than_the_grid(sigma, q, rounds, delta):
    grid_eps, _ = epsilon_for(sigma, q, rounds, delta, refine=False)
    eps, order = epsilon_for(sigma, q, rounds, delta)
    assert eps <= grid_eps
    # Recompute epsilon at the refined (fractional) order from the exact RDP integral.
    rdp = rounds * exact_rdp(q, sigma, order)
    independent = rdp - (math.log(delta) + math.log(order)) / (order - 1) + math.log((order - 1) / order)
    assert eps == pytest.approx(independent, rel=1e-6)


# σ log-uniform over what calibration searches, q down to one client in a million.
@settings(max_examples=40, deadline=None)
@given(st.floats(math.log(0.3), math.log(1000)).map(math.exp), st.floats(1e-6, 1.0), st.integers(1, 1000))
def test_the_refined_epsilon_is_never_negative_nor_above_the_grid(sigma, q, rounds):
    # Refining over fractional orders above 12 once gave ε = -11.56 (σ = 40.37, q = 0.25, 40 rounds).
    grid = epsilon_for(sigma, q, rounds, 1e-5, refine=False)[0]
    assert 0 <= epsilon_for(sigma, q, rounds, 1e-5)[0] <= grid


def test_a_best_order_between_11_and_12_is_found_when_the_grid_picks_12():
    # The grid's best order was 12 at 24 rounds and 10.9 at 36, and only the second bracket was
    # searched continuously: ε fell from 0.81494 to 0.81449 with 12 more rounds (a hypothesis find).
    sigma, q = 1.1328125, 0.01
    eps_24, order_24 = epsilon_for(sigma, q, 24, 1e-5)
    assert epsilon_for(sigma, q, 24, 1e-5, refine=False)[1] == 12.0
    assert 11 < order_24 < 12
    assert eps_24 <= epsilon_for(sigma, q, 36, 1e-5)[0]
    rdp = 24 * exact_rdp(q, sigma, order_24)
    independent = rdp - (math.log(1e-5) + math.log(order_24)) / (order_24 - 1) + math.log((order_24 - 1) / order_24)
    assert eps_24 == pytest.approx(independent, rel=1e-6)


@pytest.mark.parametrize("q,sigma,alpha", [(0.25, 0.8, 2.1), (0.1, 1.0, 3.2), (0.01, 2.0, 17.5)])
def test_fractional_order_rdp_equals_the_exact_integral(q, sigma, alpha):
    assert opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0] == pytest.approx(
        exact_rdp(q, sigma, alpha), rel=1e-8
    )


# Flower's accountant composes one round at a time: about half of `make test-fast`'s CPU
# time for these three cases, so they run with the slow tests (CI runs both).
@pytest.mark.slow
@pytest.mark.parametrize("sigma,q,rounds,delta", GRID[:3])
def test_no_looser_than_flowers_rdp_accountant(sigma, q, rounds, delta):
    population = 1000
    flower = RdpAccountant(
        PrivacyConfig(delta, population, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.POISSON)
    )
    event = GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=round(q * population), population_size=population)
    for _ in range(rounds):
        flower.compose(event)
    assert epsilon_for(sigma, q, rounds, delta)[0] <= flower.get_privacy_spent().epsilon


@pytest.mark.parametrize(
    "accountant,target,q,rounds",
    [("rdp", 9.0, 0.25, 40), ("rdp", 1.0, 0.01, 500), ("rdp", 4.0, 0.1, 100), ("prv", 8.0, 0.25, 40), ("pld", 8.0, 0.25, 40)],
)
def test_calibration_round_trips(accountant, target, q, rounds):
    sigma = calibrate_noise_multiplier(target, 1e-5, q, rounds, accountant=accountant)
    spent = create_accountant(accountant, 1e-5).spent
    assert target * (1 - 1e-3) <= spent([(sigma, q, rounds)])[0] <= target
    assert spent([(sigma * 0.99, q, rounds)])[0] > target


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf, math.nan])
def test_calibration_refuses_a_target_that_is_not_positive(target):
    with pytest.raises(UsageError) as err:
        calibrate_noise_multiplier(target, 1e-5, 0.25, 40)
    assert str(err.value) == f"target epsilon must be a finite number > 0, got {target}"


def test_calibration_counts_the_carried_ledger_in_the_target():
    prior = [(1.5, 0.25, 20)]
    sigma = calibrate_noise_multiplier(8.0, 1e-5, 0.25, 20, prior=prior)
    total = RDPClientAccountant(1e-5).spent([*prior, (sigma, 0.25, 20)])[0]
    assert 8.0 * (1 - 1e-3) <= total <= 8.0
    assert sigma > calibrate_noise_multiplier(8.0, 1e-5, 0.25, 20)  # less budget left: more noise


def test_calibration_refuses_a_target_the_carried_ledger_has_spent():
    prior = [(1.0, 0.25, 40)]
    spent_already = RDPClientAccountant(1e-5).spent(prior)[0]
    with pytest.raises(UsageError) as err:
        calibrate_noise_multiplier(spent_already, 1e-5, 0.25, 10, prior=prior)  # exactly spent: nothing left
    assert str(err.value) == (
        f"target epsilon {spent_already} is already spent: the ledger carried over gives epsilon {spent_already:.3f}")


def test_the_accountant_reports_the_refined_order_by_default():
    history = [(1.1, 0.25, 40)]
    grid = epsilon_of_history(history, 1e-5, refine=False)[0]
    refined = epsilon_of_history(history, 1e-5)[0]
    assert refined < grid  # refining between grid orders tightens this case
    assert RDPClientAccountant(1e-5).spent(history)[0] == refined
    assert RDPClientAccountant(1e-5, refine=False).spent(history)[0] == grid


def test_calibration_rejects_unreachable_targets():
    with pytest.raises(UsageError, match="cannot be reached"):
        calibrate_noise_multiplier(1e-6, 1e-5, 1.0, 10_000)


def test_accountant_counts_rounds_projects_without_recording_and_round_trips():
    accountant = RDPClientAccountant(delta=1e-5)
    assert accountant.epsilon() == 0
    for _ in range(5):
        accountant.step(1.0, 0.25)
    projected = accountant.epsilon_after_step(1.0, 0.25)
    assert accountant.history == [(1.0, 0.25, 5)]
    assert projected == pytest.approx(epsilon_for(1.0, 0.25, 6, 1e-5)[0])
    assert accountant.epsilon() == pytest.approx(epsilon_for(1.0, 0.25, 5, 1e-5)[0])
    restored = RDPClientAccountant(delta=0.5)
    restored.load_state_dict(accountant.state_dict())
    assert restored.epsilon() == accountant.epsilon()
