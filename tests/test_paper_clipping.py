"""`--clipping paper`: the DP-FedPGN authors' code's per-tensor median clipping and fixed-size sampling.

It has no formal guarantee (ε is reported as not valid), but it exists to reproduce
the paper's numbers, so what it computes is checked against its closed forms.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from scipy import stats

from dpfl.privacy.clipping import global_l2_norm, per_tensor_median_clip
from dpfl.privacy.mechanism import ClientInstructions, ClientLevelMechanism, MechanismParams, privatise_update
from dpfl.privacy.randomness import Randomness
from dpfl.privacy.sampling import fixed_size_sample
from dpfl.privacy.accountants import create_accountant


def tensor_of_norm(norm: float, size: int, seed: int) -> torch.Tensor:
    t = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return t * (norm / float(t.double().norm()))


def test_each_tensor_is_clipped_to_the_median_of_the_per_tensor_norms():
    tensors = {"a": tensor_of_norm(1.0, 50, 0), "b": tensor_of_norm(2.0, 30, 1), "c": tensor_of_norm(4.0, 20, 2)}
    clipped, median, norm = per_tensor_median_clip(tensors)
    assert median == pytest.approx(2.0, rel=1e-6)
    assert norm == pytest.approx(math.sqrt(1 + 4 + 16), rel=1e-6)  # the global norm before clipping
    assert torch.equal(clipped["a"], tensors["a"])  # below the median: untouched
    assert torch.allclose(clipped["c"], tensors["c"] / 2)  # above: scaled down to the median
    assert [float(clipped[k].double().norm()) for k in "abc"] == pytest.approx([1.0, 2.0, 2.0], rel=1e-6)
    small = {name: t / 20 for name, t in tensors.items()}  # norms 0.05, 0.1, 0.2: the median is below 1 too
    clipped, median, _ = per_tensor_median_clip(small)
    assert [float(clipped[k].double().norm()) for k in "abc"] == pytest.approx([0.05, 0.1, 0.1], rel=1e-6)


def test_median_clipping_keeps_a_zero_tensor_and_takes_the_middle_of_an_even_count():
    tensors = {"zero": torch.zeros(5), "a": tensor_of_norm(1.0, 5, 3), "b": tensor_of_norm(3.0, 5, 4),
               "c": tensor_of_norm(9.0, 5, 5)}
    clipped, median, _ = per_tensor_median_clip(tensors)
    assert median == pytest.approx(2.0, rel=1e-6)  # numpy's median of (0, 1, 3, 9)
    assert torch.equal(clipped["zero"], torch.zeros(5))
    assert global_l2_norm(clipped) == pytest.approx(math.sqrt(0 + 1 + 4 + 4), rel=1e-6)


def paper_instructions(sigma: float, sample_size: int) -> ClientInstructions:
    return ClientInstructions(contribute_update=True, clipping="paper", clip_norm=1.0, client_noise_std=0.0,
                              noise_multiplier=sigma, sample_size=sample_size, reproducible_noise=False)


def test_paper_mode_noise_is_sigma_times_the_median_over_the_root_of_the_sample_size():
    size = 100_000
    private = {"a": tensor_of_norm(1.0, size, 6), "b": tensor_of_norm(2.0, size, 7), "c": tensor_of_norm(4.0, size, 8)}
    released, norm = privatise_update(private, paper_instructions(sigma=3.0, sample_size=4), Randomness().stream("t"))
    clipped, _, _ = per_tensor_median_clip(private)
    noise = torch.cat([(released[k] - clipped[k]).double() for k in private])
    assert norm == pytest.approx(math.sqrt(21), rel=1e-6)
    assert float(noise.std()) == pytest.approx(3.0 * 2.0 / math.sqrt(4), rel=0.01)
    assert abs(float(noise.mean())) < 5 * 3.0 / math.sqrt(3 * size)


def test_fixed_size_sample_draws_every_subset_of_that_size_equally_often():
    stream = Randomness().stream("fixed-size")
    population = [10, 20, 30, 40]
    draws = 6000
    counts = Counter(tuple(fixed_size_sample(population, 2, stream)) for _ in range(draws))
    subsets = list(itertools.combinations(population, 2))  # sorted, as the sample is returned
    assert set(counts) == set(subsets)
    observed = [counts[s] for s in subsets]
    assert stats.chisquare(observed).pvalue > 1e-4


def test_fixed_size_sample_never_exceeds_the_population():
    stream = Randomness().stream("fixed-size")
    assert fixed_size_sample([3, 1, 2], 5, stream) == [3, 1, 2]  # all of them, in the population's order
    assert fixed_size_sample([3, 1, 2], 0, stream) == []


def test_the_paper_mode_samples_round_qN_clients_every_round():
    params = MechanismParams(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.3, num_clients=10, delta=1e-5,
                             noise_placement="client", clipping="paper")
    mechanism = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness())
    nodes = list(range(100, 110))
    samples = [mechanism.sample(nodes, r) for r in range(1, 201)]
    assert all(len(s) == 3 and len(set(s)) == 3 and set(s) <= set(nodes) for s in samples)
    assert len({tuple(s) for s in samples}) > 50  # a new sample each round (120 subsets exist)
    assert not params.epsilon_valid


def test_the_paper_mode_mean_divides_by_the_fixed_sample_size():
    # q = 0.25 of N = 10: the sample size is round(2.5) = 2, where flat clipping divides by qN = 2.5.
    params = MechanismParams(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.25, num_clients=10, delta=1e-5,
                             noise_placement="client", clipping="paper")
    mechanism = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness())
    like = {"v": torch.zeros(3)}
    updates = [{"v": torch.tensor([1.0, 2.0, 3.0])}, {"v": torch.tensor([3.0, 2.0, 1.0])}]
    assert torch.equal(mechanism.release(updates, like, server_round=1)["v"], torch.tensor([2.0, 2.0, 2.0]))
