"""The distributed Skellam mechanism: rotation, rounding, noise, modular sum, and its accounting
checked against independent computations (SciPy's Skellam distribution, Opacus's RDP)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from scipy.stats import chisquare
from scipy.stats import skellam as scipy_skellam

from dpfl.privacy.distributed_dp import (
    ORDERS,
    WRAP_PROBABILITY_LIMIT,
    DistributedDPParams,
    centred,
    decode,
    encode,
    epsilon,
    ledger_epsilon,
    minimum_bits,
    node_epsilon,
    poisson_subsampled_rdp,
    quantise,
    rotate,
    skellam,
    skellam_rdp,
    to_residues,
    unrotate,
)
from dpfl.privacy.randomness import RandomStream


def fresh_stream() -> RandomStream:
    return RandomStream(os.urandom(32))


vectors = st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=70).map(np.array)


@settings(max_examples=60, deadline=None)
@given(vectors, st.binary(min_size=32, max_size=32))
def test_rotation_is_orthonormal_and_inverted(vector, seed):
    rotated = rotate(vector, seed)
    assert rotated.size in (vector.size, vector.size + 1) and rotated.size % 2 == 0  # at most one zero of padding
    assert np.linalg.norm(rotated) == pytest.approx(np.linalg.norm(vector), rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(unrotate(rotated, seed, vector.size), vector, atol=1e-9 * (1 + np.abs(vector).max()))


def test_the_rotation_spreads_the_mass_as_the_wrap_bound_assumes():
    """Each rotated coordinate of a fixed x, over the public seed, has the sub-Gaussian tail
    P(|y_j| ≥ h) ≤ 2·exp(−h²(D/2)/(2‖x‖²)) that :func:`wrap_probability` uses, for a spike, a
    random vector and the flat vector that makes one coordinate a sum of signs (the tightest
    case); and for that one the tail with D in place of D/2 would be broken."""
    size, draws = 30, 20_000
    flat = np.concatenate((np.ones(size // 2), np.zeros(size // 2)))  # z_k = 1: y_0 = Σ ξ_k/√(D/2)
    for vector in (np.eye(size)[3], np.random.default_rng(3).normal(size=size), flat):
        rotated = np.array([rotate(vector, os.urandom(32)) for _ in range(draws)])
        for h in (1.0, 2.0, 3.0):
            bound = 2 * math.exp(-(h**2) / 2)
            observed = np.mean(np.abs(rotated) >= h * np.linalg.norm(vector) / math.sqrt(size / 2), axis=0)
            assert observed.max() <= min(1.0, bound) + 4 * math.sqrt(bound / draws)
    # 2·P(Binomial(15, ½) ≥ 12) = 0.035 > 2e^(−4.5) = 0.022: the halved spread is needed.
    assert np.mean(np.abs(rotated[:, 0]) >= 3 * np.linalg.norm(flat) / math.sqrt(size)) > 2 * math.exp(-4.5) + 0.005


@settings(max_examples=40, deadline=None)
@given(vectors, st.floats(0.05, 10), st.integers(1, 20))
def test_quantisation_error_within_its_bound(vector, clip_norm, threshold):
    """Every rounded vector keeps ‖ẑ‖ ≤ Δ₂, each coordinate moves by less than one step, so the
    decoded update is within γ√D of the clipped one (the rotation keeps norms)."""
    norm = np.linalg.norm(vector)
    clipped = vector * min(1.0, clip_norm / norm) if norm > 0 else vector
    params = DistributedDPParams(clip_norm=clip_norm, noise_multiplier=1.0, size=vector.size,
                                 threshold=threshold, max_inputs=threshold, bits=40)  # fmt: skip
    seed = os.urandom(32)
    rounded = quantise(clipped, params, seed, fresh_stream())
    assert np.linalg.norm(rounded) <= params.l2_sensitivity
    assert np.abs(rounded - rotate(clipped, seed) / params.granularity).max() < 1
    decoded = decode(to_residues(rounded, params.bits), params, seed)
    assert np.linalg.norm(decoded - clipped) <= params.granularity * math.sqrt(params.padded_size)
    # The rounding's extra sensitivity: at most 1 % (the granularity's rule) beyond C/γ.
    assert params.clip_norm / params.granularity <= params.l2_sensitivity <= 1.0101 * params.clip_norm / params.granularity


def test_the_sum_of_encoded_updates_decodes_to_the_noisy_sum():
    params = DistributedDPParams(clip_norm=1.0, noise_multiplier=0.5, size=300, threshold=4, max_inputs=6, bits=32)
    seed = os.urandom(32)
    updates = [u / max(1.0, np.linalg.norm(u)) for u in np.random.default_rng(0).normal(size=(6, 300)) * 0.1]
    total = np.zeros(params.padded_size, dtype=np.uint64)
    for update in updates:
        total = (total + encode(update, params, seed, fresh_stream())) & np.uint64((1 << params.bits) - 1)
    error = decode(total, params, seed) - np.sum(updates, axis=0)
    # Six shares of noise, std γ√(2·6μ) per coordinate (the inverse rotation keeps it), and six
    # roundings (smaller by far).
    expected = math.sqrt(params.size) * params.effective_noise_std
    assert 0.8 * expected < np.linalg.norm(error) < 1.2 * expected


def test_skellam_sampler_matches_scipy():
    mu = 3.0
    draws = skellam(200_000, mu, fresh_stream())
    values, counts = np.unique(np.clip(draws, -8, 8), return_counts=True)
    probabilities = scipy_skellam.pmf(values, mu, mu)
    probabilities[0] = scipy_skellam.cdf(-8, mu, mu)
    probabilities[-1] = scipy_skellam.sf(7, mu, mu)
    assert chisquare(counts, probabilities * counts.sum()).pvalue > 1e-6
    # At an update's μ (thousands) too: variance 2μ, mean 0, within 5 standard errors.
    mu = 12_000.0
    draws = skellam(100_000, mu, fresh_stream()).astype(float)
    assert abs(draws.mean()) < 5 * math.sqrt(2 * mu / draws.size)
    assert draws.var() == pytest.approx(2 * mu, rel=5 * math.sqrt(2 / draws.size))


def log_pmf(values: np.ndarray, mu: float) -> np.ndarray:
    return scipy_skellam.logpmf(values, mu, mu)


def renyi(log_p: np.ndarray, log_q: np.ndarray, order: float) -> float:
    assert np.all(np.isfinite(log_p)) and np.all(np.isfinite(log_q)), "the support reaches SciPy's underflow"
    return float(logsumexp(order * log_p + (1 - order) * log_q)) / (order - 1)


@pytest.mark.parametrize("mu", [2.0, 10.0, 60.0])
@pytest.mark.parametrize("shift", [1, 3])
def test_skellam_rdp_bounds_the_exact_divergence(mu, shift):
    """Agarwal et al.'s bound against the Rényi divergence of SciPy's Skellam and its shift (1-D: Δ₁ = Δ₂)."""
    support = np.arange(-int(40 * math.sqrt(mu)) - 60, int(40 * math.sqrt(mu)) + 60)
    for order in (2, 3, 5, 10, 20):
        exact = renyi(log_pmf(support - shift, mu), log_pmf(support, mu), order)
        bound = skellam_rdp(np.array([order]), shift, shift, mu)[0]
        assert exact <= bound * (1 + 1e-9)
        if mu >= 5 * shift**2 and order <= 10:  # where noise dominates, the bound is close (a loose one tests nothing)
            assert bound < 1.5 * exact + 0.05


@pytest.mark.parametrize("q", [0.01, 0.1, 0.25, 0.5])
def test_subsampling_bound_against_opacus_and_the_exact_mixture(q):
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = list(range(2, 33))
    sigma = 1.5
    # On the Gaussian's curve the formula is Opacus's exact sampled-Gaussian RDP (an independent code).
    ours = poisson_subsampled_rdp(np.array(orders, dtype=float) / (2 * sigma**2), orders, q)
    assert ours == pytest.approx(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders), rel=1e-9)
    # On Skellam noise, 1-D and 2-D (a shift vector with Δ₂ = √5, Δ₁ = 3), the bound holds for both
    # directions of the sampled mixture, computed exactly from SciPy's pmf.
    mu = 8.0
    support = np.arange(-120, 121)  # ±30 stds: SciPy's log-pmf underflows far beyond
    for shift in ((2,), (2, 1)):
        grids = np.meshgrid(*[support] * len(shift), indexing="ij")
        plain = sum(log_pmf(grid, mu) for grid in grids).ravel()
        moved = sum(log_pmf(grid - s, mu) for grid, s in zip(grids, shift)).ravel()
        l2, l1 = math.hypot(*shift), float(sum(shift))
        bound = poisson_subsampled_rdp(skellam_rdp(np.arange(2, 33), l2, l1, mu), orders, q)
        for order, order_bound in zip(orders, bound):
            adding, removing = _mixture_divergences(plain, moved, q, order)
            assert adding <= order_bound * (1 + 1e-9)
            assert removing <= order_bound * (1 + 1e-9)


def _log_moments_gap(log_r: np.ndarray, q: float, order: float) -> np.ndarray:
    """log of the ratio of the two sides of the sampling lemma's pointwise inequality k(r) ≥ 0 at r = e^log_r
    (docs/privacy.md): u^α + r^(1−α)v^α against r^α v^(1−α) + u^(1−α), u = 1−q+qr, v = (1−q)r+q."""
    log_u, log_v = np.logaddexp(math.log1p(-q), math.log(q) + log_r), np.logaddexp(math.log1p(-q) + log_r, math.log(q))
    larger = np.logaddexp(order * log_u, (1 - order) * log_r + order * log_v)
    smaller = np.logaddexp(order * log_r + (1 - order) * log_v, (1 - order) * log_u)
    return larger - smaller


@settings(max_examples=300, deadline=None)
@given(st.floats(-30, 30), st.floats(1e-4, 1 - 1e-4), st.floats(1.001, 512))
def test_the_sampling_lemma_holds_pointwise(log_r, q, order):
    """k(r) ≥ 0 for every r > 0, q and α > 1: what the removal direction's bound rests on."""
    assert _log_moments_gap(np.array([log_r]), q, order)[0] >= -1e-12


def _mixture_divergences(log_p: np.ndarray, log_q: np.ndarray, q: float, order: float) -> tuple[float, float]:
    """(D_α(mixture‖P), D_α(P‖mixture)) for the Poisson(q)-sampled pair (P, Q) on a finite support."""
    mixture = np.logaddexp(math.log1p(-q) + log_p, math.log(q) + log_q)
    return renyi(mixture, log_p, order), renyi(log_p, mixture, order)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=12), st.integers(1, 12), st.floats(0.001, 0.999),
       st.sampled_from([2, 3, 5, 10, 32, 128]))  # fmt: skip
def test_removing_a_client_costs_no_more_than_adding_one_for_symmetric_noise(half, shift, q, order):
    """Any noise symmetric about 0 (here an arbitrary one on a finite support) added to 0 and to a
    shift: D_α(P‖(1−q)P+qQ) ≤ D_α((1−q)P+qQ‖P), so the binomial formula bounds both directions."""
    weights = np.array(half[:0:-1] + half)  # f(−i) = f(i) on −(m−1)..m−1
    width = len(half) - 1
    support = np.arange(-width - shift, width + shift + 1)
    noise = np.full(support.size, 1e-300)  # full support, so both divergences are finite
    noise[shift : shift + weights.size] += weights
    noise /= noise.sum()
    log_p = np.log(noise)
    log_q = np.log(np.roll(noise, shift))  # the same noise shifted by `shift` (inside the padded support)
    adding, removing = _mixture_divergences(log_p, log_q, q, order)
    assert removing <= adding * (1 + 1e-9) + 1e-12


def test_removing_can_cost_more_than_adding_without_symmetry():
    """The symmetry is needed: for an asymmetric pair the removal direction is the larger one,
    so the binomial formula alone would be no bound (Zhu and Wang's factor 3 covers it)."""
    log_p, log_q = np.log([0.5, 0.5]), np.log([0.999, 0.001])
    adding, removing = _mixture_divergences(log_p, log_q, 0.9, 10)
    assert removing > 2 * adding


def test_unsampled_epsilon_approaches_the_gaussian_one():
    """At a fine grid the Skellam correction vanishes: ε is Opacus's Gaussian ε at σ (q = 1)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    params = DistributedDPParams(clip_norm=1.0, noise_multiplier=2.0, size=10_000, threshold=10, max_inputs=10)
    ours = node_epsilon(params, 20, 1e-5)
    gaussian = get_privacy_spent(orders=list(ORDERS), rdp=compute_rdp(q=1.0, noise_multiplier=2.0, steps=20,
                                                                       orders=list(ORDERS)), delta=1e-5)[0]  # fmt: skip
    assert gaussian <= ours <= 1.01 * gaussian
    assert epsilon(params, [(0.1, 20)], 1e-5)[0] < ours  # amplification by sampling helps
    assert epsilon(params, [(0.1, 10), (0.1, 10)], 1e-5)[0] == pytest.approx(epsilon(params, [(0.1, 20)], 1e-5)[0])


def test_each_share_is_sized_for_the_threshold():
    params = DistributedDPParams(clip_norm=1.0, noise_multiplier=1.3, size=500, threshold=7, max_inputs=20)
    # t shares give the variance σ²Δ₂² the accountant is told; all n give more, never less.
    assert 2 * params.threshold * params.mu_per_input == pytest.approx((1.3 * params.l2_sensitivity) ** 2)
    assert params.released_mu == pytest.approx(params.threshold * params.mu_per_input)


def test_wrap_around_is_rare_at_the_chosen_bits():
    params = DistributedDPParams(clip_norm=1.0, noise_multiplier=1.0, size=1000, threshold=10, max_inputs=10, bits=20)
    assert params.wrap_probability <= WRAP_PROBABILITY_LIMIT
    seed = os.urandom(32)
    rng = np.random.default_rng(1)
    total = np.zeros(params.padded_size, dtype=np.int64)
    for _ in range(10):  # the true (unwrapped) sum stays inside the field
        update = rng.normal(size=1000)
        total += centred(encode(update / np.linalg.norm(update), params, seed, fresh_stream()), params.bits)
    assert np.abs(total).max() < 2 ** (params.bits - 1) / 4


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"threshold": 11}, "secagg-threshold 11 must be between 1 and the number of clients 10"),
        ({"bits": 8}, "secagg-bits 8 is too small for the sum of 10 inputs"),
        ({"noise_multiplier": 0.0}, "needs a noise multiplier > 0"),
        ({"bits": 70}, "secagg-bits 70 must be between 2 and 62"),
    ],
)
def test_bad_settings_are_one_line_errors(values, message):
    arguments = {"clip_norm": 1.0, "noise_multiplier": 1.0, "size": 1000, "threshold": 5, "max_inputs": 10, "bits": 32}
    with pytest.raises(ValueError, match=message) as raised:
        DistributedDPParams(**{**arguments, **values})
    assert "\n" not in str(raised.value)


def test_minimum_bits_is_the_first_that_fits():
    params = DistributedDPParams(clip_norm=1.0, noise_multiplier=1.0, size=1000, threshold=5, max_inputs=10, bits=32)
    bits = minimum_bits(params)
    assert DistributedDPParams(clip_norm=1.0, noise_multiplier=1.0, size=1000, threshold=5, max_inputs=10, bits=bits)
    with pytest.raises(ValueError, match=f"use at least {bits} bits"):
        DistributedDPParams(clip_norm=1.0, noise_multiplier=1.0, size=1000, threshold=5, max_inputs=10, bits=bits - 1)


def test_a_hostile_client_can_move_the_sum_only_within_the_field():
    params = DistributedDPParams(clip_norm=1.0, noise_multiplier=1.0, size=1000, threshold=5, max_inputs=10, bits=24)
    per_coordinate, l2 = params.hostile_shift_bound
    seed = os.urandom(32)
    worst = to_residues(np.full(params.padded_size, -(2 ** (params.bits - 1))), params.bits)
    decoded = decode(worst, params, seed)
    assert np.linalg.norm(decoded) <= l2 * (1 + 1e-9)
    assert per_coordinate == params.granularity * 2 ** (params.bits - 1)


def test_a_node_checks_its_own_epsilon_under_secure_aggregation():
    """From the threshold, its share and its own contributions; amplification only if it trusts the sampling."""
    from dpfl.privacy.node_policy import NodePrivacyPolicy, Participation

    params = DistributedDPParams(clip_norm=1.0, noise_multiplier=1.0, size=1000, threshold=5, max_inputs=10)
    own = node_epsilon(params, 4, 1e-5)
    policy = NodePrivacyPolicy(max_epsilon=own * 1.01)
    assert policy.secure_aggregation_violation(params, Participation(40, 4), 40, 0.1, 1e-5) is None
    refusal = NodePrivacyPolicy(max_epsilon=own * 0.99).secure_aggregation_violation(
        params, Participation(40, 4), 40, 0.1, 1e-5)  # fmt: skip
    assert f"epsilon {own:.3g}" in refusal and "threshold 5" in refusal and "without amplification" in refusal
    trusting = NodePrivacyPolicy(max_epsilon=own * 0.99, trust_server_sampling=True)
    amplified = epsilon(params, [(0.1, 40)], 1e-5)[0]
    assert (trusting.secure_aggregation_violation(params, Participation(40, 4), 40, 0.1, 1e-5) is None) == (
        amplified <= own * 0.99)
    assert "below this node's minimum 2" in NodePrivacyPolicy(min_noise_multiplier=2.0).secure_aggregation_violation(
        params, Participation(1, 1), 1, 0.1, 1e-5)  # fmt: skip


def test_bounding_the_sum_leaves_honest_rounds_and_caps_a_hostile_client():
    from dpfl.privacy.distributed_dp import bounded_sum, honest_sum_norm_bound

    params = DistributedDPParams(clip_norm=1.0, noise_multiplier=1.0, size=2000, threshold=4, max_inputs=6, bits=32)
    seed = os.urandom(32)
    rng = np.random.default_rng(2)
    modulus = np.uint64((1 << params.bits) - 1)
    honest = np.zeros(params.padded_size, dtype=np.uint64)
    for _ in range(5):
        update = rng.normal(size=2000)
        honest = (honest + encode(update / np.linalg.norm(update), params, seed, fresh_stream())) & modulus
    decoded = decode(honest, params, seed)
    np.testing.assert_array_equal(bounded_sum(decoded, params, 6), decoded)
    # A sixth, hostile input: any residue. Alone it moves the sum by far more than C.
    hostile = to_residues(rng.integers(-(2**31), 2**31, size=params.padded_size), params.bits)
    attacked = decode((honest + hostile) & modulus, params, seed)
    bound = honest_sum_norm_bound(params, 6)
    assert np.linalg.norm(attacked) > 100 * bound
    assert np.linalg.norm(bounded_sum(attacked, params, 6)) == pytest.approx(bound)


def test_the_skellam_accountant_tells_the_mechanisms_epsilon():
    from dpfl.privacy.accountants.skellam import DistributedSkellamAccountant

    params = DistributedDPParams(clip_norm=1.0, noise_multiplier=1.2, size=1000, threshold=5, max_inputs=10)
    accountant = DistributedSkellamAccountant(1e-5, params)
    for _ in range(30):
        accountant.step(1.2, 0.2)
    assert accountant.epsilon() == pytest.approx(epsilon(params, [(0.2, 30)], 1e-5)[0])
    assert accountant.epsilon_after_step(1.2, 0.2) == pytest.approx(epsilon(params, [(0.2, 31)], 1e-5)[0])
    resumed = DistributedSkellamAccountant(1e-5, params)
    resumed.load_state_dict(accountant.state_dict())
    assert resumed.epsilon() == accountant.epsilon()
    # Another sigma (what calibration searches over) is the same mechanism with other noise.
    other = DistributedDPParams(clip_norm=1.0, noise_multiplier=0.8, size=1000, threshold=5, max_inputs=10)
    accountant.step(0.8, 0.2)
    exact = ledger_epsilon(params, [(1.2, 0.2, 30), (0.8, 0.2, 1)], 1e-5)[0]
    assert accountant.epsilon() == pytest.approx(exact)
    assert epsilon(params, [(0.2, 31)], 1e-5)[0] < exact < epsilon(other, [(0.2, 32)], 1e-5)[0]
