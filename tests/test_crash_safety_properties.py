"""Laws of the mechanism and its persistence that hold for all inputs (hypothesis), and min-replies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from opacus.accountants.analysis import rdp as opacus_rdp

from dpfl.privacy.accountants import create_accountant
from dpfl.privacy.accountants.rdp import epsilon_for
from dpfl.privacy.clipping import flat_clip, global_l2_norm
from dpfl.privacy.mechanism import ClientLevelMechanism, MechanismParams, split_noise_multiplier
from dpfl.privacy.randomness import Randomness
from dpfl.server.checkpoint import RunCheckpoint, load_run_checkpoint, save_run_checkpoint
from dpfl.task.files import write_atomically

finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=32)
tensors = arrays(np.float32, st.integers(1, 40), elements=finite_or_not)


@given(st.lists(tensors, min_size=1, max_size=4), st.floats(1e-3, 1e3))
def test_a_clipped_update_never_exceeds_the_clip_norm(parts, clip):
    update = {f"t{i}": torch.from_numpy(part) for i, part in enumerate(parts)}
    clipped, _ = flat_clip(update, clip)
    assert global_l2_norm(clipped) <= clip * (1 + 1e-6)
    assert all(torch.isfinite(t).all() for t in clipped.values())


sigmas = st.floats(0.6, 5.0)
rates = st.floats(0.01, 1.0)
round_counts = st.integers(1, 60)
# The refined RDP order is found numerically (to 1e-4 in the order): monotonicity holds to that precision.
SLACK = 1e-7


@settings(max_examples=30, deadline=None)
@given(sigmas, rates, round_counts, st.integers(1, 20))
def test_epsilon_does_not_decrease_with_more_rounds(sigma, q, rounds, more):
    assert epsilon_for(sigma, q, rounds + more, 1e-5)[0] >= epsilon_for(sigma, q, rounds, 1e-5)[0] * (1 - SLACK)


@settings(max_examples=30, deadline=None)
@given(sigmas, rates, rates, round_counts)
def test_epsilon_does_not_decrease_with_the_sample_rate(sigma, q1, q2, rounds):
    low, high = sorted((q1, q2))
    assert epsilon_for(sigma, high, rounds, 1e-5)[0] >= epsilon_for(sigma, low, rounds, 1e-5)[0] * (1 - SLACK)


@settings(max_examples=30, deadline=None)
@given(sigmas, sigmas, rates, round_counts)
def test_epsilon_does_not_increase_with_the_noise(s1, s2, q, rounds):
    low, high = sorted((s1, s2))
    assert epsilon_for(high, q, rounds, 1e-5)[0] <= epsilon_for(low, q, rounds, 1e-5)[0] * (1 + SLACK)


histories = st.lists(st.tuples(st.floats(0.3, 20.0), st.floats(1e-4, 1.0), st.integers(1, 500)), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None)
@given(histories, st.sampled_from(["rdp", "prv", "pld"]))
def test_the_accountant_round_trips_through_a_checkpoint_exactly(tmp_path_factory, history, kind):
    accountant = create_accountant(kind, 1e-5)
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(sigma, q)
    folder = tmp_path_factory.mktemp("run")
    checkpoint = RunCheckpoint(
        round=len(history), weights={"w": torch.ones(2)}, strategy_state={"round": 1, "accountant": accountant.state_dict(), "strategy": {}},
        run_config={"k": 1}, noise_multiplier=history[-1][0], epsilon_valid=True, rounds=[], pretraining_seconds=0.0,
    )  # fmt: skip
    save_run_checkpoint(folder, checkpoint)
    restored = create_accountant(kind, 1e-5)
    restored.load_state_dict(load_run_checkpoint(folder).ledger)
    assert restored.history == accountant.history
    if kind == "rdp":  # PRV and PLD are slow; their ε is a function of the history alone
        assert restored.privacy_spent() == accountant.privacy_spent()


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")

    def half_written(tmp):
        tmp.write_text("new, but cut short")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomically(path, half_written)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


# --- min-replies: a noisy reply count that shares the round's noise ------------------------------


@given(st.floats(0.1, 10.0), st.floats(1.01, 100.0))
def test_the_split_noise_multiplier_composes_to_the_total(sigma, ratio):
    other = sigma * ratio
    split = split_noise_multiplier(sigma, other)
    assert split > sigma
    assert split**-2 + other**-2 == pytest.approx(sigma**-2, rel=1e-12)


def test_the_update_and_the_count_cost_one_gaussian_of_the_accountants_multiplier():
    # Without subsampling, Gaussian RDP composes additively: check the split against Opacus's RDP.
    sigma, count_noise = 1.2, 20.0
    orders = [2.0, 8.0, 32.0]
    split = split_noise_multiplier(sigma, count_noise)
    combined = opacus_rdp.compute_rdp(q=1.0, noise_multiplier=split, steps=1, orders=orders) + opacus_rdp.compute_rdp(
        q=1.0, noise_multiplier=count_noise, steps=1, orders=orders
    )
    np.testing.assert_allclose(combined, opacus_rdp.compute_rdp(q=1.0, noise_multiplier=sigma, steps=1, orders=orders), rtol=1e-12)


def mechanism(min_replies: int, sigma: float, count_noise: float, journal=None) -> ClientLevelMechanism:
    params = MechanismParams(noise_multiplier=sigma, clip_norm=1.0, sample_rate=0.5, num_clients=20, delta=1e-5,
                             min_replies=min_replies, reply_count_noise=count_noise)  # fmt: skip
    return ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness(None), journal=journal)


def test_too_few_replies_skip_the_update_but_the_round_is_accounted_and_journaled_first():
    journaled = []
    mech = mechanism(min_replies=5, sigma=0.01, count_noise=0.02, journal=journaled.append)
    like = {"v": torch.zeros(3)}
    assert mech.release([{"v": torch.ones(3) * 0.1}] * 3, like, server_round=1) is None
    assert mech.accountant.history == [(0.01, 0.5, 1)] and journaled == [mech.accountant.state_dict()]
    assert mech.release([{"v": torch.ones(3) * 0.1}] * 6, like, server_round=2) is not None
    assert mech.accountant.history == [(0.01, 0.5, 2)] and len(journaled) == 2


def test_without_privacy_the_count_is_exact_and_min_replies_is_enough():
    params = MechanismParams(noise_multiplier=0.0, clip_norm=0.0, sample_rate=0.5, num_clients=20, delta=1e-5,
                             private=False, min_replies=3)  # fmt: skip
    mech = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness(None))
    assert [mech.too_few_replies(count, server_round=1) for count in (0, 2, 3, 4)] == [True, True, False, False]


def test_the_noisy_count_has_the_stated_noise():
    mech = mechanism(min_replies=10, sigma=1.0, count_noise=4.0)
    # P[10 + N(0, 4²) < 10] = ½ and P[14 + N(0, 4²) < 10] = Φ(−1) ≈ 0.159.
    at_threshold = np.mean([mech.too_few_replies(10, r) for r in range(4000)])
    one_std_above = np.mean([mech.too_few_replies(14, r) for r in range(4000)])
    assert at_threshold == pytest.approx(0.5, abs=0.03) and one_std_above == pytest.approx(0.1587, abs=0.02)


def test_a_reproducible_reply_count_is_fresh_in_each_rounds_release():
    params = MechanismParams(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.5, num_clients=20, delta=1e-5,
                             min_replies=10, reply_count_noise=4.0, reproducible_noise=True)  # fmt: skip
    mech = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness(5))
    like = {"v": torch.zeros(1)}
    # 10 contributions against min-replies 10: P[skip] = ½ each round, through the round's release.
    outcomes = {mech.release([like] * 10, like, server_round=r) is None for r in range(1, 41)}
    assert outcomes == {True, False}


def test_with_min_replies_the_update_noise_is_the_split_multiplier():
    sigma, count_noise = 1.0, 3.0
    mech = mechanism(min_replies=1, sigma=sigma, count_noise=count_noise)
    like = {"v": torch.zeros(200_000)}
    released = mech.release([{"v": torch.zeros(200_000)}] * 10, like, server_round=1)["v"].double() * 10
    assert float(released.std()) == pytest.approx(split_noise_multiplier(sigma, count_noise), rel=0.01)


def test_count_noise_not_above_sigma_is_refused():
    with pytest.raises(ValueError, match="reply-count-noise must exceed"):
        mechanism(min_replies=1, sigma=2.0, count_noise=2.0)
    with pytest.raises(ValueError) as err:
        split_noise_multiplier(1.0, 2.0, 1.5, 1.2)
    assert str(err.value) == "the other releases' noise multipliers (2, 1.5, 1.2) leave no part of the total 1"
    assert mechanism(min_replies=1, sigma=1.0, count_noise=3.0).last_adaptive_release is None  # nothing released yet
    assert math.isfinite(mechanism(min_replies=0, sigma=2.0, count_noise=2.0).params.update_noise_multiplier)


def test_a_skipped_round_keeps_the_model_and_the_strategy_state_and_says_so():
    from dpfl.strategies.base import UPDATE_SKIPPED
    from dpfl.strategies.dp_fedpgn import DPFedPGN

    strategy = DPFedPGN(noise_multiplier=0.01, clip_norm=1.0, sample_rate=1.0, num_clients=3, local_steps=3, lr=0.1,
                        lr_decay=1.0, delta=1e-5, min_replies=3, reply_count_noise=0.02)  # fmt: skip
    x = {"w": torch.ones(4)}
    direction = {"w": torch.full((4,), 0.5)}
    strategy.global_direction = dict(direction)
    new_x = strategy.aggregate_updates(1, x, [{"w": torch.ones(4) * 0.1}], contributions=1)
    assert torch.equal(new_x["w"], x["w"]) and torch.equal(strategy.global_direction["w"], direction["w"])
    assert strategy.last_metrics[UPDATE_SKIPPED] == 1.0 and strategy.accountant.history == [(0.01, 1.0, 1)]
    moved = strategy.aggregate_updates(2, x, [{"w": torch.ones(4) * 0.1}] * 5, contributions=5)
    assert not torch.equal(moved["w"], x["w"]) and strategy.last_metrics[UPDATE_SKIPPED] == 0.0
