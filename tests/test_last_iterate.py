"""The last-iterate heuristic ε: against dp-accounting, its limits, and where it is reported."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant

from dpfl.cli.main import main
from dpfl.privacy.accountants.last_iterate import last_iterate_epsilon, participation_distribution
from dpfl.privacy.accountants.pld import pld_epsilon


def test_a_client_sampled_every_round_is_one_gaussian_of_the_summed_noise():
    # q = 1: the sum moves by T·C under noise sqrt(T)·σC, the Gaussian mechanism with σ/sqrt(T).
    assert last_iterate_epsilon([(1.0, 1.0, 5)], 1e-5) == pytest.approx(
        dp_accounting.get_epsilon_gaussian(1 / math.sqrt(5), 1e-5), rel=1e-7)


def test_one_round_is_the_poisson_subsampled_gaussian_itself():
    # With one round the last iterate is the whole release: dp-accounting's PLD of that event.
    accountant = PLDAccountant(value_discretization_interval=1e-3)  # pessimistic: slightly above
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(0.9)))
    assert last_iterate_epsilon([(0.9, 0.3, 1)], 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=5e-3)


def test_it_matches_dp_accountings_pld_of_the_mixture_of_gaussians():
    # dp-accounting 0.6.0, PLDAccountant(value_discretization_interval=1e-4) composing
    # MixtureOfGaussiansDpEvent(sqrt(3), [0, 1, 2, 3], Bin(3, 0.3)), get_epsilon(1e-5): 86 s, so precomputed.
    assert last_iterate_epsilon([(1.0, 0.3, 3)], 1e-5) == pytest.approx(4.181092890073943, rel=1e-7)


@pytest.mark.parametrize(("sigma", "q", "rounds"), [(1.318, 0.25, 40), (0.95, 0.5, 4), (4.0, 0.1, 200)])
def test_the_final_model_reveals_less_than_every_model(sigma, q, rounds):
    # Every released model (the PLD accountant's ε) can only say more than their sum.
    heuristic = last_iterate_epsilon([(sigma, q, rounds)], 1e-5)
    assert 0 < heuristic < pld_epsilon(((sigma, q, rounds),), 1e-5)
    assert last_iterate_epsilon([(sigma * 1.5, q, rounds)], 1e-5) < heuristic  # more noise, less leak


def test_histories_compose_and_edge_cases():
    mixed = participation_distribution([(1.0, 0.2, 2), (1.0, 0.5, 1)])
    assert mixed == pytest.approx([0.8**2 * 0.5, 2 * 0.2 * 0.8 * 0.5 + 0.8**2 * 0.5, 0.2**2 * 0.5 + 2 * 0.2 * 0.8 * 0.5,
                                   0.2**2 * 0.5])  # fmt: skip
    assert last_iterate_epsilon([(1.0, 0.25, 20)], 1e-5) == last_iterate_epsilon([(1.0, 0.25, 8), (1.0, 0.25, 12)], 1e-5)
    assert last_iterate_epsilon([], 1e-5) == 0.0
    assert last_iterate_epsilon([(0.0, 0.5, 3)], 1e-5) == math.inf


def test_dpfl_privacy_reports_it_beside_every_accountant(capsys):
    args = ["privacy", "--noise-multiplier", "1.22", "--sample-rate", "0.25", "--rounds", "40", "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = last_iterate_epsilon([(1.22, 0.25, 40)], 1e-5)
    assert [row["last-iterate-epsilon"] for row in rows] == pytest.approx([expected] * 3)
    assert all(row["last-iterate-epsilon"] < row["epsilon"] for row in rows)
    assert main(args[:-1]) == 0
    assert "heuristic" in capsys.readouterr().out
