"""Tree aggregation and buffered linear Toeplitz factorisations (dpfl.privacy.factorizations): the workload, the
normalisation the accountant relies on (against a brute force over every participation pattern), the noise
streams against the matrices, and the schemas they run under."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import solve_triangular

from dpfl.privacy.factorizations import (
    BltNoise,
    blt_coefficients,
    blt_loss,
    factorisation_for,
    optimal_blt_parameters,
    toeplitz_prefix_sensitivities,
    tree_nodes,
)
from dpfl.privacy.matrix_factorization import prefix_workload, toeplitz_matrix, total_squared_error
from dpfl.privacy.participation import ParticipationSchema, check_schema_supported
from conftest import accounted_history
from test_matrix_factorization import brute_force_sensitivity

SHAPES = [(8, 1), (8, 2), (9, 3), (12, 4), (16, 4), (13, 5)]


@pytest.mark.parametrize("mechanism", ["tree", "blt"])
@pytest.mark.parametrize(("rounds", "separation"), [*SHAPES, (64, 8)])
def test_factorisation_reconstructs_the_workload(mechanism, rounds, separation):
    factorisation = factorisation_for(mechanism, rounds, separation)
    decoder, strategy = factorisation.decoder(), factorisation.strategy_matrix()
    assert np.max(np.abs(decoder @ strategy - prefix_workload(rounds))) < 1e-10
    assert factorisation.total_squared_error() == pytest.approx(float(np.sum(decoder**2)), rel=1e-10)
    assert factorisation.released_rows(rounds) == strategy.shape[0]


@pytest.mark.parametrize("mechanism", ["tree", "blt"])
@pytest.mark.parametrize(("rounds", "separation"), SHAPES)
def test_every_prefix_is_within_what_the_accountant_composed(mechanism, rounds, separation):
    """The rows released by round r, over every pattern of participations ≥ b apart in rounds 1 … r, move C·x by at
    most √⌈r/b⌉ (⌈r/b⌉ accounted steps of σ); the bound is reached at some prefix (the normalisation is not loose)."""
    factorisation = factorisation_for(mechanism, rounds, separation)
    strategy = factorisation.strategy_matrix()
    ratios = []
    for r in range(1, rounds + 1):
        k = math.ceil(r / separation)
        lower, upper = brute_force_sensitivity(strategy[: factorisation.released_rows(r), :r], k, separation)
        assert lower == pytest.approx(upper, rel=1e-12)  # non-negative C: every pattern's columns add up
        assert upper <= math.sqrt(k) * (1 + 1e-12)
        ratios.append(upper / math.sqrt(k))
    if mechanism == "blt" or separation & (separation - 1) == 0:  # the tree's bound is exact for b a power of two
        assert max(ratios) == pytest.approx(1.0, rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    thetas=st.lists(st.floats(0.0, 0.99), min_size=1, max_size=3),
    weights=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    rounds=st.integers(2, 11),
    separation=st.integers(1, 4),
)
def test_the_earliest_pattern_is_the_worst_for_a_blt(thetas, weights, rounds, separation):
    """The theorem behind toeplitz_prefix_sensitivities: non-negative, non-increasing Toeplitz coefficients make
    1, 1 + b, 1 + 2b, … the worst pattern at every prefix (brute force over all patterns)."""
    omegas = np.array(weights[: len(thetas)]) / len(thetas)
    thetas = np.array(thetas)
    strategy = toeplitz_matrix(blt_coefficients(thetas, omegas, rounds), rounds)
    ours = toeplitz_prefix_sensitivities(thetas, omegas, rounds, separation)
    for r in range(1, rounds + 1):
        _, upper = brute_force_sensitivity(strategy[:r, :r], math.ceil(r / separation), separation)
        assert ours[r - 1] == pytest.approx(upper, rel=1e-9)


def test_blt_noise_is_the_inverse_of_the_strategy_and_its_loss_the_frobenius_error():
    rounds, separation, d = 15, 3, 4
    thetas, omegas = optimal_blt_parameters(rounds, separation)
    factorisation = factorisation_for("blt", rounds, separation)
    z = np.random.default_rng(2).standard_normal((rounds, d))
    stream = BltNoise(thetas, omegas, factorisation.scale)
    w = np.stack([stream.round_noise(t + 1, lambda *label: z[label[1] - 1]) for t in range(rounds)])
    assert np.allclose(w, solve_triangular(factorisation.strategy_matrix(), z, lower=True), atol=1e-10)
    strategy = factorisation.strategy_matrix()
    direct = np.linalg.norm(prefix_workload(rounds) @ np.linalg.inv(strategy)) ** 2
    assert blt_loss(np.array(thetas), np.array(omegas), rounds, separation) == pytest.approx(direct, rel=1e-10)


def test_tree_noise_differences_the_prefix_noise_of_the_dyadic_nodes():
    rounds, separation, d = 13, 2, 3
    factorisation = factorisation_for("tree", rounds, separation)
    row_of = {node: row for row, node in enumerate(tree_nodes(rounds))}
    z = np.random.default_rng(3).standard_normal((len(row_of), d))
    stream = factorisation.stream()
    assert not stream.keeps_state
    w = np.stack([stream.round_noise(t, lambda _, level, end: z[row_of[(level, end)]]) for t in range(1, rounds + 1)])
    prefix = factorisation.decoder() @ z
    assert np.allclose(np.cumsum(w, axis=0), prefix, atol=1e-12)


def test_the_optimised_blt_is_close_to_the_banded_optimum_and_beats_independent_noise():
    rounds, separation = 64, 8
    blt = factorisation_for("blt", rounds, separation).total_squared_error()
    banded = factorisation_for("bandmf", rounds, separation).total_squared_error()
    assert blt < 0.5 * rounds * (rounds + 1) / 2
    assert blt < 1.25 * banded
    thetas, omegas = optimal_blt_parameters(rounds, separation)
    assert all(0 <= theta < 1 for theta in thetas) and all(omega >= 0 for omega in omegas) and sum(omegas) <= 1
    assert blt <= blt_loss(np.array(thetas) * 0.9, np.array(omegas), rounds, separation)


def test_the_tree_is_the_identity_for_one_round():
    tree = factorisation_for("tree", 1, 1)
    assert tree.total_squared_error() == total_squared_error((1.0,), 1) == 1.0


@pytest.mark.parametrize("mechanism", ["tree", "blt"])
def test_tree_and_blt_are_never_amplified(mechanism):
    """Not banded: cyclic groups are accounted as min-sep (q = 1), one step per block of b rounds."""
    sigma, q, rounds, separation, delta = 1.2, 0.25, 10, 5, 1e-5
    schema = ParticipationSchema("cyclic", separation, rounds, mechanism)
    assert accounted_history(schema, sigma, q, delta) == [(sigma, 1.0, 2)]
    assert ParticipationSchema("cyclic", separation, rounds, "bandmf").accounting_rate(q) == q


@pytest.mark.parametrize("mechanism", ["tree", "blt"])
def test_tree_and_blt_refuse_what_they_cannot_run_with(mechanism):
    with pytest.raises(ValueError, match=f"mechanism {mechanism} needs a participation schema"):
        ParticipationSchema("poisson", 1, 5, mechanism)
    schema = ParticipationSchema("min-sep", 2, 5, mechanism)
    with pytest.raises(ValueError, match=f"mechanism {mechanism} adds its correlated noise on the server"):
        check_schema_supported(schema, "client", "flat", False, 0)
    with pytest.raises(ValueError, match=f"mechanism {mechanism} needs a fixed clip norm"):
        check_schema_supported(schema, "server", "flat", True, 0)
