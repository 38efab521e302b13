"""Matrix factorisations (banded, tree, BLT), participation schemas and correlated noise
(dpfl.privacy.matrix_factorization, dpfl.privacy.factorizations, dpfl.privacy.participation): against closed forms,
brute force and an independent accountant."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import solve_triangular

from dpfl.errors import UsageError
from dpfl.privacy.accountants import create_accountant
from dpfl.privacy.matrix_factorization import (
    BandedNoise,
    _loss_and_gradient,
    banded_sensitivity,
    inverse_coefficients,
    max_participations,
    optimal_banded_coefficients,
    prefix_workload,
    toeplitz_matrix,
    total_squared_error,
)
from dpfl.privacy.mechanism import ClientLevelMechanism, MechanismParams
from dpfl.privacy.participation import CorrelatedMechanism, ParticipationSchema
from dpfl.privacy.randomness import Randomness, RandomStream
from conftest import accounted_history


@pytest.mark.parametrize(("rounds", "band"), [(8, 1), (8, 3), (20, 5), (64, 8), (100, 10)])
def test_factorisation_reconstructs_the_workload(rounds, band):
    c = optimal_banded_coefficients(rounds, band)
    strategy = toeplitz_matrix(c, rounds)
    decoder = toeplitz_matrix(np.cumsum(inverse_coefficients(c, rounds)), rounds)  # B = A C⁻¹ from the series
    assert np.max(np.abs(decoder @ strategy - prefix_workload(rounds))) < 1e-10
    assert np.count_nonzero(np.tril(strategy, -band)) == 0  # b-banded
    assert math.isclose(np.linalg.norm(c), 1.0, rel_tol=1e-12)


def test_loss_is_the_frobenius_error_and_its_gradient_is_exact():
    rounds, c = 12, np.array([1.0, 0.4, -0.1, 0.2])
    strategy = toeplitz_matrix(c, rounds)
    direct = np.max(np.sum(strategy**2, axis=0)) * np.linalg.norm(prefix_workload(rounds) @ np.linalg.inv(strategy)) ** 2
    assert math.isclose(total_squared_error(c, rounds), direct, rel_tol=1e-12)
    loss, gradient = _loss_and_gradient(c[1:], rounds)
    step = 1e-6
    numeric = [(_loss_and_gradient(c[1:] + e * step, rounds)[0] - _loss_and_gradient(c[1:] - e * step, rounds)[0])
               / (2 * step) for e in np.eye(3)]  # fmt: skip
    assert np.allclose(gradient, numeric, rtol=1e-6)


def test_optimised_bands_beat_the_identity_and_wider_bands_do_no_worse():
    rounds = 64
    errors = [total_squared_error(optimal_banded_coefficients(rounds, band), rounds) for band in (1, 2, 4, 8, 16)]
    assert errors[0] == pytest.approx(rounds * (rounds + 1) / 2)
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 0.3 * errors[0]


def test_the_optimum_is_a_minimum():
    rounds, band = 40, 5
    c = np.array(optimal_banded_coefficients(rounds, band))
    best = total_squared_error(c, rounds)
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert total_squared_error(c + 1e-3 * rng.standard_normal(band), rounds) >= best * (1 - 1e-12)


def brute_force_sensitivity(strategy: np.ndarray, participations: int, min_separation: int) -> tuple[float, float]:
    """(lower, upper) on the sensitivity over every pattern of ≤ k participations ≥ b apart: the best
    ±1 scalar contributions (a lower bound) and Σ|(CᵀC)_ij| over the pattern (an upper bound)."""
    rounds = strategy.shape[1]
    gram = strategy.T @ strategy
    lower = upper = 0.0
    for size in range(1, participations + 1):
        for pattern in itertools.combinations(range(rounds), size):
            if any(b - a < min_separation for a, b in zip(pattern, pattern[1:])):
                continue
            block = gram[np.ix_(pattern, pattern)]
            upper = max(upper, float(np.abs(block).sum()))
            for signs in itertools.product((-1.0, 1.0), repeat=size):
                s = np.array(signs)
                lower = max(lower, float(s @ block @ s))
    return math.sqrt(lower), math.sqrt(upper)


@pytest.mark.parametrize(("rounds", "separation", "band"), [(6, 2, 2), (8, 3, 3), (9, 3, 2), (10, 4, 4), (7, 7, 7)])
def test_banded_sensitivity_matches_brute_force(rounds, separation, band):
    c = optimal_banded_coefficients(rounds, band)
    k = max_participations(rounds, separation)
    lower, upper = brute_force_sensitivity(toeplitz_matrix(c, rounds), k, separation)
    assert lower == pytest.approx(upper, rel=1e-12)  # orthogonal columns: every bound agrees
    assert banded_sensitivity(c, rounds, separation) == pytest.approx(upper, rel=1e-12)
    # what the accountant is told: √k, the bound, reached when b divides T
    assert banded_sensitivity(c, rounds, separation) <= math.sqrt(k) * (1 + 1e-12)
    if rounds % separation == 0:
        assert banded_sensitivity(c, rounds, separation) == pytest.approx(math.sqrt(k))


def test_a_band_wider_than_the_separation_is_refused_and_would_be_worse():
    c = optimal_banded_coefficients(8, 4)
    with pytest.raises(ValueError, match="at least that many rounds apart"):
        banded_sensitivity(c, 8, 2)
    _, upper = brute_force_sensitivity(toeplitz_matrix(c, 8), 4, 2)
    assert upper > math.sqrt(4) + 0.1


def test_banded_noise_is_the_inverse_of_the_strategy():
    rounds, band, d = 12, 4, 3
    c = optimal_banded_coefficients(rounds, band)
    z = np.random.default_rng(1).standard_normal((rounds, d))
    noise = BandedNoise(c)
    w = np.stack([noise.next(z[t]) for t in range(rounds)])
    assert np.allclose(w, solve_triangular(toeplitz_matrix(c, rounds), z, lower=True), atol=1e-12)


@pytest.mark.parametrize(("mechanism", "participation", "band"),
                         [("bandmf", "cyclic", 3), ("bandmf", "min-sep", 3), ("tree", "min-sep", 2), ("blt", "cyclic", 2)])
def test_released_noise_has_the_claimed_covariance(mechanism, participation, band):
    """Zero updates over T rounds: the mechanism's released noise (times qN) has covariance σ²C² A⁻¹BBᵀA⁻ᵀ per
    coordinate (the differences of the prefix noise B·z; (CᵀC)⁻¹ for a square C), from the factorisation's B alone."""
    rounds, d, sigma, clip = 6, 40_000, 1.5, 2.0
    schema = ParticipationSchema(participation, band, rounds, mechanism)
    params = MechanismParams(noise_multiplier=sigma, clip_norm=clip, sample_rate=1.0, num_clients=band, delta=1e-5,
                             schema=schema)  # fmt: skip
    mechanism = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness())
    like = {"w": torch.zeros(d)}
    released = []
    for server_round in range(1, rounds + 1):
        mechanism.sample(list(range(band)), server_round)
        released.append(mechanism.release([], like, server_round)["w"].double().numpy() * params.expected_clients)
    empirical = np.cov(np.stack(released))
    per_round = np.linalg.inv(prefix_workload(rounds)) @ schema.factorisation.decoder()
    claimed = (sigma * clip) ** 2 * per_round @ per_round.T
    # Each entry is a mean over d coordinates: its standard error is below √(2/d)·max diag ≈ 0.007 max diag.
    assert np.max(np.abs(empirical - claimed)) < 0.05 * np.max(np.diag(claimed))
    # and it is not the independent noise's covariance
    assert abs(claimed[1, 0]) > 0.2 * (sigma * clip) ** 2


@settings(max_examples=60, deadline=None)
@given(
    participation=st.sampled_from(["cyclic", "min-sep"]),
    separation=st.integers(1, 6),
    num_clients=st.integers(6, 30),
    extra_rounds=st.integers(0, 20),
    sample_rate=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31),
)
def test_the_sampler_never_violates_the_schema(participation, separation, num_clients, extra_rounds, sample_rate, seed):
    rounds = separation + extra_rounds
    schema = ParticipationSchema(participation, separation, rounds, "gaussian")
    schema.check_federation(num_clients)
    sampler = CorrelatedMechanism(schema, bytes(32))
    nodes = [1000 + 7 * i for i in range(num_clients)]
    randomness = Randomness(seed)
    rounds_of: dict[int, list[int]] = {node: [] for node in nodes}
    for server_round in range(1, rounds + 1):
        for node in sampler.sample(nodes, server_round, sample_rate, randomness.stream("sampling", server_round)):
            rounds_of[node].append(server_round)
    for taken in rounds_of.values():
        assert all(later - earlier >= separation for earlier, later in zip(taken, taken[1:]))
        assert len(taken) <= schema.max_participations
        # at most one participation in each block of b rounds: what the accountant's one step per block covers
        assert len({(t - 1) // separation for t in taken}) == len(taken)


def test_the_sampler_refuses_other_nodes():
    sampler = CorrelatedMechanism(ParticipationSchema("min-sep", 2, 4), bytes(32))
    sampler.sample([1, 2, 3], 1, 1.0, RandomStream(bytes(32)))
    with pytest.raises(UsageError, match="nodes changed"):
        sampler.sample([1, 2, 4], 2, 1.0, RandomStream(bytes(32)))


def test_unsatisfiable_schemas_are_refused():
    with pytest.raises(ValueError, match="between 1 and the 5 rounds"):
        ParticipationSchema("min-sep", 6, 5, "bandmf")
    with pytest.raises(ValueError, match="needs a participation schema"):
        ParticipationSchema("poisson", 1, 5, "bandmf")
    with pytest.raises(ValueError, match="at least that many clients"):
        ParticipationSchema("cyclic", 4, 10).check_federation(3)


def test_min_sep_accounting_is_one_gaussian_of_the_banded_sensitivity():
    """k unamplified steps at σ = one Gaussian of sensitivity √k (banded_sensitivity) at noise σ, checked
    with dp-accounting's PLD directly."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    rounds, separation, sigma, delta = 30, 4, 3.0, 1e-5
    schema = ParticipationSchema("min-sep", separation, rounds, "bandmf")
    k = schema.accounted_steps(rounds)
    assert k == max_participations(rounds, separation) == 8
    ours = create_accountant("pld", delta).spent([(sigma, schema.accounting_rate(0.3), k)])[0]
    sensitivity = math.sqrt(k)  # banded_sensitivity's bound (reached when b divides T)
    assert banded_sensitivity(optimal_banded_coefficients(rounds, separation), rounds, separation) <= sensitivity
    single = PLDAccountant(value_discretization_interval=1e-3)
    single.compose(dp_accounting.GaussianDpEvent(sigma / sensitivity))
    assert ours == pytest.approx(single.get_epsilon(delta), rel=2e-3)


def test_cyclic_accounting_is_poisson_dp_sgd_over_the_blocks():
    """Amplified BandMF: ⌈T/b⌉ Poisson-sampled Gaussian steps at (σ, q); with b = 1 exactly today's history."""
    sigma, q, delta = 1.2, 0.25, 1e-5
    for rounds, separation in [(20, 5), (21, 5), (10, 1)]:
        schema = ParticipationSchema("cyclic", separation, rounds, "bandmf" if separation > 1 else "gaussian")
        assert accounted_history(schema, sigma, q, delta) == [(sigma, q, math.ceil(rounds / separation))]


@pytest.mark.parametrize("mechanism", ["bandmf", "tree", "blt"])
def test_restore_continues_the_same_stream(mechanism):
    rounds, like = 8, {"w": torch.zeros(50)}
    schema = ParticipationSchema("min-sep", 3, rounds, mechanism)
    params = MechanismParams(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.5, num_clients=6, delta=1e-5,
                             schema=schema)  # fmt: skip

    def run(mechanism, first, last):
        states, out = [], []
        mechanism.private_journal = states.append
        for server_round in range(first, last + 1):
            mechanism.sample(list(range(6)), server_round)
            out.append(mechanism.release([], like, server_round)["w"])
        return out, states

    whole, _ = run(ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness()), 1, rounds)
    # Secure randomness: a second mechanism draws other noise unless restored from the first one's state.
    first = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness())
    before, states = run(first, 1, 5)
    second = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness())
    with pytest.raises(ValueError, match="drawn after the last checkpoint"):
        second.restore_private_state(states[-1], 4)
    second.restore_private_state(states[-1], 5)
    after, _ = run(second, 6, rounds)
    third = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness())
    third.restore_private_state(states[-1], 5)
    expected, _ = run(first, 6, rounds)
    for got, want in zip(after, expected):
        assert torch.equal(got, want)
    assert not torch.equal(whole[0], before[0])  # fresh keys: independent runs differ
