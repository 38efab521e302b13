"""The rdp, prv and pld accountants against exact and independent computations of ε."""

from __future__ import annotations

import json
import math
import os

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from opacus.accountants import PRVAccountant
from scipy.fft import irfft, next_fast_len, rfft
from scipy.optimize import brentq
from scipy.stats import norm

from dpfl.cli.main import main
from dpfl.errors import UsageError
from dpfl.privacy.accountants.pld import PLD_VALUE_DISCRETIZATION
from dpfl.privacy.accountants import ACCOUNTANTS, RDPClientAccountant, create_accountant
from dpfl.privacy.calibration import calibrate_noise_multiplier

# Opacus's PRV accountant reports estimate + eps_error (0.01) at δ - δ/1000.
PRV_SLACK = 0.011

# rich wraps table cells at 80 columns when not on a terminal.
WIDE = {**os.environ, "COLUMNS": "200"}

# (sigma, q, rounds, delta)
GRID = [
    (0.8, 0.25, 40, 1e-5),
    (1.0, 0.1, 200, 1e-5),
    (1.22, 0.25, 40, 1e-5),
    (2.0, 0.01, 1000, 1e-6),
    (5.0, 0.5, 10, 1e-3),
]


def spent(name: str, sigma: float, q: float, rounds: int, delta: float) -> float:
    return create_accountant(name, delta).spent([(sigma, q, rounds)])[0]


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε of a Gaussian mechanism with sensitivity/σ = μ (Balle & Wang 2018, Thm. 8)."""

    def excess(eps: float) -> float:
        return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu) - delta

    return brentq(excess, 0, 100, xtol=1e-12)


def epsilon_bracket(sigma: float, q: float, rounds: int, delta: float, spacing: float = 1e-3) -> tuple[float, float]:
    """ε of ``rounds`` Poisson-subsampled Gaussians between two direct numerical bounds.

    The privacy loss L(x) = log(1 - q + q·exp((2x - 1)/2σ²)) is monotone in x, so its
    distribution follows exactly from the normal CDF: under the mixture for removal,
    negated under N(0, σ²) for addition. Rounding each round's loss up (down) to a
    grid of ``spacing`` and composing by one FFT power bounds δ(ε) from above (below);
    the two ε differ by at most rounds·spacing. No accounting library is involved.
    """
    x_low, x_high = -9 * sigma - 1, 9 * sigma + 1

    def loss(x):
        return np.logaddexp(np.log1p(-q) if q < 1 else -np.inf, np.log(q) + (2 * x - 1) / (2 * sigma**2))

    def loss_inverse(value):
        # A loss below log(1 - q) is never reached: x = -inf.
        with np.errstate(divide="ignore"):
            return sigma**2 * np.log(np.maximum(np.exp(value) - (1 - q), 0) / q) + 0.5

    def removal_cdf(value):  # the loss under the subsampled mixture
        x = loss_inverse(value)
        return (1 - q) * norm.cdf(x / sigma) + q * norm.cdf((x - 1) / sigma)

    def addition_cdf(value):  # minus the loss under N(0, σ²)
        return norm.sf(loss_inverse(-value) / sigma)

    directions = [((loss(x_low), loss(x_high)), removal_cdf), ((-loss(x_high), -loss(x_low)), addition_cdf)]
    lower = upper = 0.0
    for (low, high), cdf in directions:
        grid = np.arange(math.floor(low / spacing), math.ceil(high / spacing) + 1)
        cumulative = cdf(grid * spacing)
        tail = 1 - cumulative[-1]
        rounded_up = np.diff(cumulative, prepend=0.0)  # the tail goes to +inf
        rounded_down = np.append(rounded_up[1:], tail)  # the tail goes to the top value
        size = rounds * (len(grid) - 1) + 1
        values = (rounds * grid[0] + np.arange(size)) * spacing

        def composed_epsilon(masses: np.ndarray, infinite: float) -> float:
            fft_size = next_fast_len(size)
            composed = np.clip(irfft(rfft(masses, fft_size) ** rounds, fft_size)[:size], 0, None)

            def excess(eps: float) -> float:
                above = values > eps
                return infinite + np.sum(composed[above] * -np.expm1(eps - values[above])) - delta

            return brentq(excess, 0, values[-1], xtol=1e-9) if excess(0) > 0 else 0.0

        upper = max(upper, composed_epsilon(rounded_up, 1 - (1 - tail) ** rounds))
        lower = max(lower, composed_epsilon(rounded_down, 0.0))
    return lower, upper


@pytest.mark.parametrize("sigma,rounds,delta", [(1.0, 1, 1e-5), (5.0, 50, 1e-5), (20.0, 200, 1e-6)])
def test_full_participation_against_the_exact_gaussian(sigma, rounds, delta):
    # With q = 1 the rounds compose to one Gaussian with μ = √rounds/σ, whose ε is exact.
    exact = gaussian_epsilon(math.sqrt(rounds) / sigma, delta)
    assert exact <= spent("pld", sigma, 1.0, rounds, delta) <= exact + 1e-3
    assert exact <= spent("prv", sigma, 1.0, rounds, delta) <= exact + PRV_SLACK
    assert spent("rdp", sigma, 1.0, rounds, delta) >= exact


@pytest.mark.parametrize("sigma,q,rounds,delta", [(0.8, 0.25, 40, 1e-5), (1.22, 0.25, 40, 1e-5), (5.0, 0.5, 10, 1e-3)])
def test_pld_and_prv_lie_in_a_direct_numerical_bracket(sigma, q, rounds, delta):
    lower, upper = epsilon_bracket(sigma, q, rounds, delta)
    assert upper - lower <= rounds * 1e-3 + 1e-6
    assert lower <= spent("pld", sigma, q, rounds, delta) <= upper
    assert lower <= spent("prv", sigma, q, rounds, delta) <= upper + PRV_SLACK


@pytest.mark.parametrize("sigma,q,rounds,delta", GRID)
def test_prv_and_pld_agree_and_are_tighter_than_rdp(sigma, q, rounds, delta):
    prv, pld, rdp = (spent(name, sigma, q, rounds, delta) for name in ("prv", "pld", "rdp"))
    # Both bound the same ε from above: PRV by its error bound, PLD by pessimistic
    # rounding, which costs it at most ~0.002 at this discretisation on the grid.
    assert pld - 2e-3 <= prv <= pld + 2 * PRV_SLACK
    assert max(prv, pld) < rdp


def test_each_accountant_equals_its_library_stepped_round_by_round():
    history = [(1.0, 0.1, 5), (1.5, 0.2, 3)]
    opacus = PRVAccountant()
    pld = PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
    for sigma, q, rounds in history:
        for _ in range(rounds):
            opacus.step(noise_multiplier=sigma, sample_rate=q)
            pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    assert create_accountant("prv", 1e-5).spent(history)[0] == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-9)
    assert create_accountant("pld", 1e-5).spent(history)[0] == pytest.approx(pld.get_epsilon(1e-5), rel=1e-6)


@pytest.mark.parametrize("name", ["prv", "pld"])
def test_a_tighter_accountant_calibrates_less_noise(name):
    assert calibrate_noise_multiplier(8.0, 1e-5, 0.25, 40, accountant=name) < calibrate_noise_multiplier(8.0, 1e-5, 0.25, 40)


# The ends of what a run or `dpfl privacy` may be given: noise from 0.5 to 1000, sampling
# from one client in a million to all, one round to a thousand (40.37, 0.25, 40: the σ that
# `dpfl privacy --target-epsilon 0.001` once calibrated, with ε = -11.56). Chosen so that
# PRV, whose grid grows with ε and rounds, stays within seconds.
EXTREMES = [
    (0.5, 1e-6, 1000), (0.5, 0.25, 1), (0.5, 1.0, 1), (1.0, 1e-6, 1), (40.37, 0.25, 1), (40.37, 0.25, 40),
    (40.37, 1.0, 1000), (1000.0, 1e-6, 1000), (1000.0, 0.25, 1), (1000.0, 0.25, 1000), (1000.0, 1.0, 1),
]


def optimistic_pld_epsilon(sigma: float, q: float, rounds: int, delta: float) -> float:
    """dp-accounting's PLD rounded optimistically: at or below the true ε, so below any sound bound."""
    from dp_accounting.pld import privacy_loss_distribution

    pld = privacy_loss_distribution.from_gaussian_mechanism(
        sigma, pessimistic_estimate=False, value_discretization_interval=1e-3, sampling_prob=q
    )
    return pld.self_compose(rounds).get_epsilon_for_delta(delta)


@pytest.mark.parametrize("sigma,q,rounds", EXTREMES)
@pytest.mark.parametrize("name", list(ACCOUNTANTS))
def test_every_accountant_bounds_epsilon_soundly_at_the_extremes(name, sigma, q, rounds):
    epsilon = spent(name, sigma, q, rounds, 1e-5)
    assert math.isfinite(epsilon) and epsilon >= 0
    assert epsilon >= optimistic_pld_epsilon(sigma, q, rounds, 1e-5)


def test_prv_refuses_in_one_line_a_history_whose_grid_would_not_fit():
    # ε ≈ 2,300 (PLD): the PRV grid would need 49M points and minutes, then gave ε = inf.
    with pytest.raises(UsageError, match=r"the prv accountant would need .* grid points .*; use rdp or pld"):
        spent("prv", 0.5, 1.0, 1000, 1e-5)


@pytest.mark.parametrize("name", list(ACCOUNTANTS))
def test_rounds_with_infinite_noise_cost_nothing(name):
    assert spent(name, math.inf, 0.25, 40, 1e-5) == 0.0
    accountant = create_accountant(name, 1e-5)
    assert accountant.spent([(math.inf, 0.25, 5), (1.0, 0.25, 3)]) == accountant.spent([(1.0, 0.25, 3)])
    with pytest.raises(UsageError, match="not a number"):
        accountant.spent([(math.nan, 0.25, 3)])


@pytest.mark.parametrize("name", list(ACCOUNTANTS))
@pytest.mark.parametrize("target", [1e-9, 1e-3])
def test_an_unreachable_target_is_refused_with_the_smallest_reachable_epsilon(name, target):
    with pytest.raises(UsageError) as err:
        calibrate_noise_multiplier(target, 1e-5, 0.25, 40, accountant=name)
    smallest = spent(name, 1000.0, 0.25, 40, 1e-5)
    assert str(err.value) == (
        f"target epsilon {target:g} cannot be reached in 40 rounds at sample rate 0.25: the smallest epsilon "
        f"({name}, delta 1e-05) with a noise multiplier up to 1000 is {smallest:.4g}"
    )


class ScaledRDPAccountant(RDPClientAccountant):
    """RDP's ε as if every σ were ``factor`` times larger: an accountant tighter (> 1) or looser (< 1) than RDP."""

    mechanism = "scaled-rdp"
    factor = 1.0

    def _privacy_spent(self, history):
        return super()._privacy_spent(tuple((sigma * self.factor, q, n) for sigma, q, n in history))


@pytest.mark.parametrize("factor", [4.0, 1 / 1.05])
def test_calibration_brackets_sigma_for_accountants_far_tighter_or_looser_than_rdp(monkeypatch, factor):
    # The search for non-RDP accountants starts from RDP's σ and widens its bracket from
    # there: down (halving) when the accountant is much tighter, up when it is looser.
    monkeypatch.setattr(ScaledRDPAccountant, "factor", factor)
    monkeypatch.setitem(ACCOUNTANTS, "scaled-rdp", ScaledRDPAccountant)
    target, q, rounds = 8.0, 0.25, 40
    sigma = calibrate_noise_multiplier(target, 1e-5, q, rounds, accountant="scaled-rdp")
    assert sigma == pytest.approx(calibrate_noise_multiplier(target, 1e-5, q, rounds) / factor, rel=1e-3)
    assert create_accountant("scaled-rdp", 1e-5).spent([(sigma, q, rounds)])[0] <= target


@pytest.mark.parametrize("name", list(ACCOUNTANTS))
def test_projection_does_not_record_and_matches_the_next_round(name):
    accountant = create_accountant(name, 1e-5)
    assert accountant.privacy_spent()[0] == 0
    for _ in range(3):
        accountant.step(1.0, 0.25)
    accountant.step(1.2, 0.25)
    projected = accountant.epsilon_after_step(1.2, 0.25)
    assert accountant.history == [(1.0, 0.25, 3), (1.2, 0.25, 1)]
    assert accountant.epsilon() < projected
    accountant.step(1.2, 0.25)
    assert accountant.history == [(1.0, 0.25, 3), (1.2, 0.25, 2)]
    assert accountant.epsilon() == projected


@pytest.mark.parametrize("name", list(ACCOUNTANTS))
def test_state_dict_round_trips_through_json(name):
    accountant = create_accountant(name, 1e-5)
    for sigma in (1.0, 1.0, 1.5):
        accountant.step(sigma, 0.1)
    restored = create_accountant(name, 0.5)
    restored.load_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored.history == accountant.history
    assert restored.privacy_spent() == accountant.privacy_spent()
    other = create_accountant("pld" if name == "rdp" else "rdp", 1e-5)
    with pytest.raises(UsageError, match=f"accounted with '{name}'"):
        other.load_state_dict(accountant.state_dict())


def test_a_state_saved_before_accountants_were_selectable_loads_as_rdp():
    accountant = create_accountant("rdp", 1e-5)
    accountant.load_state_dict({"delta": 1e-5, "refine": True, "history": [[1.0, 0.25, 5]]})
    assert accountant.history == [(1.0, 0.25, 5)]


def test_unknown_accountant_names_the_known_ones():
    with pytest.raises(UsageError, match="unknown accountant 'gdp'; known accountants: rdp, prv, pld"):
        create_accountant("gdp", 1e-5)
    with pytest.raises(UsageError, match="unknown accountant 'gdp'"):
        calibrate_noise_multiplier(8.0, 1e-5, 0.25, 40, accountant="gdp")


def _epsilon_column(stdout: str) -> dict[str, float]:
    rows = [line.strip("│ ").split("│") for line in stdout.splitlines() if line.startswith("│")]
    return {cells[0].strip(): float(cells[5]) for cells in rows}


def test_cli_prints_every_accountant_side_by_side(dpfl):
    result = dpfl("privacy", "--noise-multiplier", "1.22", "--sample-rate", "0.25", "--rounds", "40", env=WIDE)
    assert result.returncode == 0, result.stderr
    shown = _epsilon_column(result.stdout)
    assert list(shown) == ["rdp", "prv", "pld"]
    for name, epsilon in shown.items():
        assert epsilon == pytest.approx(spent(name, 1.22, 0.25, 40, 1e-5), abs=1e-4)


def test_cli_calibrates_sigma_for_the_chosen_accountant(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    args = ["privacy", "--target-epsilon", "8", "--sample-rate", "0.25", "--rounds", "40", "--accountant", "pld"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert list(_epsilon_column(stdout)) == ["pld"]
    assert f"{calibrate_noise_multiplier(8.0, 1e-5, 0.25, 40, accountant='pld'):.4f}" in stdout


def test_cli_rejects_an_unknown_accountant_in_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["privacy", "--noise-multiplier", "1", "--sample-rate", "0.1", "--rounds", "5", "--accountant", "gdp"])
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert "invalid choice: 'gdp' (choose from 'rdp', 'prv', 'pld', 'all')" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_cli_prints_json_for_scripts(capsys):
    args = ["privacy", "--noise-multiplier", "1.22", "--sample-rate", "0.25", "--rounds", "40", "--accountant", "rdp", "--json"]
    assert main(args) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["accountant"] == "rdp" and row["noise-multiplier"] == 1.22 and row["rounds"] == 40
    epsilon, order = create_accountant("rdp", 1e-5).spent([(1.22, 0.25, 40)])
    assert row["epsilon"] == pytest.approx(epsilon, rel=1e-12) and row["best-rdp-order"] == pytest.approx(order)
