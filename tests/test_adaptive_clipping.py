"""Adaptive clipping: σ_Δ against the accountant, convergence of C, the budget stop, hostile bits."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from numpy.polynomial.hermite_e import hermegauss
from opacus.accountants.analysis.rdp import compute_rdp

from dpfl.client import app as client_module
from dpfl.errors import UsageError
from dpfl.privacy.accountants import create_accountant
from dpfl.privacy.adaptive_clipping import (
    AdaptiveClipping, check_count_noise, count_noise_multiplier, default_count_noise_std, unclipped_bit,
)
from dpfl.privacy.mechanism import ClientLevelMechanism, MechanismParams, split_noise_multiplier
from dpfl.privacy.randomness import Randomness
from dpfl.server.app import app as server_app
from dpfl.engines.inprocess import run_in_process
from dpfl.server.public_records import PUBLIC_ROUND_KEYS
from dpfl.server.recorder import PRIVATE_DIAGNOSTICS_FILE
from dpfl.settings import RunSettings

def update_noise_multiplier(sigma: float, count_std: float) -> float:
    """σ_Δ as the mechanism computes it for adaptive clipping alone."""
    return split_noise_multiplier(sigma, count_noise_multiplier(count_std))


CASES = [(1.0, 5.0, 0.25), (0.7, 0.5, 0.1), (2.5, 1.5, 0.5), (1.1, 100.0, 0.02)]  # (σ, σ_b, q)


@pytest.mark.parametrize(("sigma", "count_std", "q"), CASES)
def test_update_and_count_compose_to_one_gaussian_of_sigma_in_dp_accounting(sigma, count_std, q):
    # dp-accounting composes the two Gaussians on the same Poisson sample itself.
    sigma_delta = update_noise_multiplier(sigma, count_std)
    assert sigma_delta > sigma
    both = dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(sigma_delta),
                                          dp_accounting.GaussianDpEvent(2 * count_std)])  # fmt: skip
    )
    one = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    epsilons = []
    for event in (both, one):
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(event, 30)
        epsilons.append(accountant.get_epsilon(1e-5))
    assert epsilons[0] == pytest.approx(epsilons[1], rel=1e-9)
    # ... and dpfl's accountant, told σ, gives the same ε (its own order search).
    assert create_accountant("rdp", 1e-5).spent([(sigma, q, 30)])[0] == pytest.approx(epsilons[1], rel=0.02)


@pytest.mark.parametrize(("sigma", "count_std", "q"), CASES[:3])
def test_the_two_dimensional_release_has_the_rdp_of_one_gaussian(sigma, count_std, q):
    # Independent of any accountant's shortcut: integrate E_P[(Q/P)^α] for the actual pair of
    # releases (the update along the client's direction, noise σ_Δ·C, sensitivity C; the centred
    # bit sum, noise σ_b, sensitivity ½), P = without the client, Q = with it w.p. q, by 2-D
    # Gauss–Hermite quadrature, and compare with Opacus's RDP of one Gaussian of multiplier σ.
    mu = np.array([1 / update_noise_multiplier(sigma, count_std), 0.5 / count_std])  # noise-normalised shift
    nodes, weights = hermegauss(120)
    x, y = np.meshgrid(nodes, nodes)
    w = np.outer(weights, weights) / (2 * np.pi)
    ratio = (1 - q) + q * np.exp(mu[0] * x + mu[1] * y - mu @ mu / 2)
    orders = [2, 3, 5, 8]
    rdp = [math.log(float(np.sum(w * ratio**alpha))) / (alpha - 1) for alpha in orders]
    assert rdp == pytest.approx(list(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)), rel=1e-6)


def test_with_min_replies_too_the_three_releases_cost_one_gaussian_of_sigma():
    sigma, count_std, reply_noise, q = 1.0, 5.0, 20.0, 0.25
    params = MechanismParams(noise_multiplier=sigma, clip_norm=0.2, sample_rate=q, num_clients=400, delta=1e-5,
                             adaptive_clipping=AdaptiveClipping(0.5, 0.2, count_std), min_replies=10,
                             reply_count_noise=reply_noise)  # fmt: skip
    releases = [params.update_noise_multiplier, 2 * count_std, reply_noise]
    assert sum(multiplier**-2 for multiplier in releases) == pytest.approx(sigma**-2, rel=1e-12)
    both = dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(m) for m in releases])
    )
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(both, 40)
    assert accountant.get_epsilon(1e-5) == pytest.approx(create_accountant("rdp", 1e-5).spent([(sigma, q, 40)])[0], rel=0.02)
    with pytest.raises(ValueError, match="leave no part of the total"):  # each alone is fine, together too costly
        MechanismParams(noise_multiplier=sigma, clip_norm=0.2, sample_rate=q, num_clients=400, delta=1e-5,
                        adaptive_clipping=AdaptiveClipping(0.5, 0.2, 0.6), min_replies=10, reply_count_noise=1.5)  # fmt: skip


def test_a_count_noise_that_would_cost_the_whole_budget_is_refused_in_one_line():
    with pytest.raises(UsageError, match=r"clip-count-noise 0.5 must be more than half the noise multiplier \(0.5\)"):
        check_count_noise(1.0, 0.5)
    with pytest.raises(UsageError, match="clip-count-noise 0.2"):
        RunSettings(clip_mode="adaptive", target_epsilon=0.0, noise_multiplier=1.0, clip_count_noise=0.2).validate()
    with pytest.raises(UsageError, match="adaptive clipping needs noise-placement server"):
        RunSettings(clip_mode="adaptive", noise_placement="client").validate()
    with pytest.raises(UsageError, match=r"target-quantile must be in \(0, 1\), got 1.0"):
        RunSettings(clip_mode="adaptive", target_quantile=1.0).validate()


@pytest.mark.parametrize("expected_clients", [4.0, 100.0, 2000.0])
def test_the_automatic_count_noise_is_the_papers_unless_that_costs_over_five_percent(expected_clients):
    sigma = 1.2
    count_std = default_count_noise_std(expected_clients, sigma)
    assert count_std >= expected_clients / 20
    assert update_noise_multiplier(sigma, count_std) <= 1.05 * sigma * (1 + 1e-12)
    if expected_clients == 2000.0:  # large cohorts: qN/20 itself, nearly free
        assert count_std == 100.0 and update_noise_multiplier(sigma, count_std) < 1.0001 * sigma
    if expected_clients == 4.0:  # small cohorts: raised to exactly the 5% bound
        assert update_noise_multiplier(sigma, count_std) == pytest.approx(1.05 * sigma, rel=1e-9)


@pytest.mark.parametrize(
    ("quantile", "learning_rate", "count_std", "message"),
    [
        (0.0, 0.2, 1.0, "target-quantile must be in (0, 1), got 0.0"),
        (1.0, 0.2, 1.0, "target-quantile must be in (0, 1), got 1.0"),
        (0.5, 0.0, 1.0, "clip-lr must be > 0, got 0.0"),
        (0.5, 0.2, 0.0, "clip-count-noise must be > 0, got 0.0"),
    ],
)
def test_adaptive_clipping_parameters_outside_their_range_are_refused_by_name(quantile, learning_rate, count_std, message):
    with pytest.raises(UsageError) as err:
        AdaptiveClipping(quantile, learning_rate, count_std)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("norm", "bit"), [(0.0, 1), (0.5, 1), (1.0, 1), (1.0 + 1e-12, 0), (7.0, 0), (math.nan, 0), (math.inf, 0)]
)
def test_the_unclipped_bit_is_one_exactly_when_the_norm_is_finite_and_at_most_c(norm, bit):
    assert unclipped_bit(norm, 1.0) == bit


def adaptive_mechanism(sigma: float, count_std: float, quantile: float, clip: float, n: int, q: float = 1.0):
    params = MechanismParams(noise_multiplier=sigma, clip_norm=clip, sample_rate=q, num_clients=n, delta=1e-5,
                             adaptive_clipping=AdaptiveClipping(quantile, 0.2, count_std))  # fmt: skip
    return ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness())


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("start", [1e-3, 1e2])
def test_with_little_count_noise_c_converges_to_the_target_quantile_of_the_norms(quantile, start):
    norms = np.random.default_rng(0).lognormal(mean=0.0, sigma=1.0, size=400)
    mech = adaptive_mechanism(sigma=2e-3, count_std=2e-3, quantile=quantile, clip=start, n=len(norms))
    like = {"v": torch.zeros(1)}
    for server_round in range(1, 301):
        bits = [float(norm <= mech.clip_norm) for norm in norms]
        mech.release([], like, server_round, unclipped=bits)  # only the bits matter here
    assert np.mean(norms <= mech.clip_norm) == pytest.approx(quantile, abs=0.01)
    assert mech.clip_norm == pytest.approx(np.quantile(norms, quantile), rel=0.05)


def test_released_count_noise_has_the_stated_std_and_hostile_bits_are_clamped():
    mech = adaptive_mechanism(sigma=1.0, count_std=3.0, quantile=0.5, clip=1.0, n=50, q=0.2)  # qN = 10
    like = {"v": torch.zeros(1)}
    fractions = []
    for server_round in range(1, 2001):
        mech.load_state_dict({"clip-norm": 1.0})
        mech.release([like] * 4, like, server_round, unclipped=[1.0, 0.0, 1e9, -1e9])  # clamped to 1, 0, 1, 0
        fractions.append(mech.last_adaptive_release[1])
    # (Σ(b − ½) + N(0, 3²)) / 10 + ½ with Σ(b − ½) = 0: mean ½, std 0.3.
    assert np.mean(fractions) == pytest.approx(0.5, abs=0.03)
    assert np.std(fractions) == pytest.approx(0.3, rel=0.05)
    # The update's noise is σ_Δ·C, not σ·C.
    assert mech.params.server_noise_std(4, 2.0) == pytest.approx(2.0 * update_noise_multiplier(1.0, 3.0))


def test_the_budget_stop_is_the_same_with_adaptive_clipping():
    fixed = MechanismParams(noise_multiplier=1.0, clip_norm=0.5, sample_rate=0.3, num_clients=20, delta=1e-5)
    stops = []
    for params in (fixed, dataclasses.replace(fixed, adaptive_clipping=AdaptiveClipping(0.5, 0.2, 2.0))):
        mech = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness())
        server_round = 1
        while mech.budget_refusal(server_round, 4.0) is None:
            mech.release([], {"v": torch.zeros(1)}, server_round)
            server_round += 1
        stops.append((server_round, mech.accountant.history))
    assert stops[0] == stops[1] and stops[0][1] == [(1.0, 0.3, stops[0][0] - 1)]


TINY = dict(model="cnn", model_width=2, num_clients=8, sample_rate=1.0, num_server_rounds=3, max_epsilon=0.0,
            target_epsilon=0.0, noise_multiplier=1.0, clip_mode="adaptive", clip_norm=0.01)  # fmt: skip


def run(tmp_path: Path, name: str, client_app: ClientApp = client_module.app, **overrides) -> Path:
    settings = RunSettings(**{**TINY, **overrides, "out_dir": str(tmp_path / name)})
    run_in_process(server_app, client_app, settings.to_run_config(), settings.num_clients)
    return tmp_path / name


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def with_bit(value):
    def tamper(msg: Message, reply: Message) -> Message:
        records = {"update": reply.content["update"]}
        if value is not None:
            records["metrics"] = MetricRecord({"unclipped": value})
        return Message(RecordDict(records), reply_to=msg)

    return tamper


def test_clients_report_their_bit_and_forged_bits_drop_the_reply(tmp_path):
    hostile = {0: with_bit(7), 1: with_bit(-1), 2: with_bit(0.5), 3: with_bit(None)}
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        reply = client_module.train(msg, context)
        assert reply.content["metrics"]["unclipped"] in (0, 1)  # the real client's report
        partition = int(context.node_config["partition-id"])
        return hostile[partition](msg, reply) if partition in hostile else reply

    # Count noise 0.1 on 4 centred bits over qN = 8: b̃ is 0.25 ± 0.0125, far below γ = 0.5.
    out = run(tmp_path, "hostile", app, noise_multiplier=0.1, clip_count_noise=0.1)
    diagnostics = rows(out / PRIVATE_DIAGNOSTICS_FILE)
    for facts in diagnostics:
        assert facts["accepted"] == 4 and facts["dropped"] == 4
        reasons = " | ".join(facts["drop-reasons"])
        for bad in ("got 7", "got -1", "got 0.5", "no readable 'unclipped' bit"):
            assert bad in reasons
        # At C = 0.01 (the updates' norms are larger) every accepted update is clipped.
        assert facts["clipped-fraction"] == 1.0
    public = rows(out / "metrics.jsonl")
    assert all(set(row) <= PUBLIC_ROUND_KEYS for row in public)
    trained = public[1:]
    assert trained[0]["clip-norm"] == 0.01
    # All clipped: b̃ < γ, so C grows every round, by exp(−0.2·(b̃ − γ)).
    assert all(later["clip-norm"] > earlier["clip-norm"] for earlier, later in zip(trained, trained[1:]))
    for row, after in zip(trained, trained[1:]):
        step = math.exp(-0.2 * ((1 - row["noisy-clipped-fraction"]) - 0.5))
        assert after["clip-norm"] == pytest.approx(row["clip-norm"] * step, rel=1e-9)


def test_adaptive_clipping_runs_through_the_cli_and_bad_values_are_one_line_errors(dpfl_quick, tmp_path):
    result = dpfl_quick("simulate", "--clip-mode", "adaptive", "--noise", "client", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "adaptive clipping needs noise-placement server" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = dpfl_quick("simulate", "--clip-mode", "sometimes", "--out", str(tmp_path / "y"))
    assert result.returncode == 2 and "unknown clip-mode 'sometimes'; choose one of fixed, adaptive" in result.stderr


@pytest.mark.parametrize(
    ("value", "accepted"),
    [(0, True), (1, True), (0.0, True), (1.0, True), (2, False), (-1, False), (0.5, False), (True, False), ("1", False)],
)
def test_only_a_zero_or_one_bit_passes_the_screen(value, accepted):
    reason = adaptive_mechanism(sigma=1.0, count_std=3.0, quantile=0.5, clip=1.0, n=10).screen_unclipped(value)
    assert (reason is None) == accepted
    if not accepted:
        assert reason == f"the reported 'unclipped' bit must be 0 or 1, got {value!r}"


def test_the_update_noise_follows_c_as_adaptive_clipping_moves_it():
    mech = adaptive_mechanism(sigma=1.0, count_std=3.0, quantile=0.5, clip=1.0, n=50, q=0.2)  # qN = 10
    mech.load_state_dict({"clip-norm": 2.5})  # where adaptive clipping has taken C
    like = {"v": torch.zeros(200_000)}
    released = mech.release([], like, server_round=1)["v"].double() * 10
    assert float(released.std()) == pytest.approx(2.5 * update_noise_multiplier(1.0, 3.0), rel=0.01)


def test_a_reproducible_clipped_count_is_drawn_afresh_each_round():
    params = MechanismParams(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.2, num_clients=50, delta=1e-5,
                             reproducible_noise=True, adaptive_clipping=AdaptiveClipping(0.5, 0.2, 3.0))  # fmt: skip
    mech = ClientLevelMechanism(params, create_accountant("rdp", 1e-5), Randomness(5))
    like = {"v": torch.zeros(1)}
    fractions = set()
    for server_round in (1, 2, 3):
        mech.release([like] * 2, like, server_round, unclipped=[1.0, 0.0])
        fractions.add(mech.last_adaptive_release[1])
    assert len(fractions) == 3
