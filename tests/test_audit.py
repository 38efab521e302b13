"""The empirical privacy audit: its statistics against mechanisms of known ε, and through the real code path,
sound and able to fail."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from broken_mechanism import scaled_noise
from dpfl.analysis import audit as analysis_audit
from dpfl.analysis.audit import AuditOptions, InputCanaries, OrthogonalDirections, run_audit
from dpfl.cli import audit as cli_audit
from dpfl.errors import UsageError
from dpfl.privacy.accountants.last_iterate import last_iterate_epsilon
from dpfl.privacy.audit import (
    STATISTICS,
    audit_scores,
    fdp_epsilon_lower_bound,
    fdp_rejects,
    gaussian_incorrect_floor,
    gaussian_mu,
    gdp_epsilon,
    guess_choices,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    one_shot_estimate,
)
from dpfl.privacy.randomness import Randomness, RandomStream
from dpfl.settings import RunSettings

DELTA = 1e-5


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# --- the statistics, against mechanisms whose ε is known exactly ---------------------------


def randomised_response_scores(epsilon: float, canaries: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An exactly ε-DP release of each canary's inclusion bit, and the bits."""
    included = rng.random(canaries) < 0.5
    truthful = rng.random(canaries) < 1 / (1 + math.exp(-epsilon))
    released = np.where(truthful, included, ~included)
    # Ties broken at random: the score is the released bit plus a small uniform.
    return released + 0.5 * rng.random(canaries), included


def gaussian_scores(mu: float, canaries: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One Gaussian mechanism per canary, N(μ·bit, 1): exactly μ-GDP, ε = gdp_epsilon(μ, δ) at every δ."""
    included = rng.random(canaries) < 0.5
    return mu * included + rng.standard_normal(canaries), included


def most_exceedances(trials: int, error: float = 0.05) -> int:
    """More than this many bounds above ε in ``trials`` has probability < 0.1% for a sound 95% bound."""
    return int(binom.ppf(0.999, trials, error))


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_threshold_on_randomised_response_is_sound_and_close(epsilon):
    rng = np.random.default_rng(0)
    bounds = np.array([audit_scores(*randomised_response_scores(epsilon, 1000, rng), delta=0.0, confidence=0.95,
                                    statistic="threshold").epsilon_lower for _ in range(40)])  # fmt: skip
    assert np.sum(bounds > epsilon) <= most_exceedances(40)
    assert np.median(bounds) >= 0.5 * epsilon  # 1000 canaries: a fairly tight audit


@pytest.mark.parametrize(("statistic", "trials", "tightness"), [("threshold", 20, 0.25), ("fdp", 20, 0.35),
                                                                  ("gaussian", 200, 0.8)])  # fmt: skip
def test_each_statistic_on_a_single_gaussian_mechanism_is_sound_and_as_tight_as_it_can_be(statistic, trials, tightness):
    # μ = 2: ε = 10.0 at δ = 1e-5. The rank statistics cannot prove more than about log(m);
    # the Gaussian pair uses every canary.
    rng = np.random.default_rng(1)
    epsilon = gdp_epsilon(2.0, DELTA)
    bounds = np.array([audit_scores(*gaussian_scores(2.0, 1000, rng), DELTA, 0.95, statistic).epsilon_lower
                       for _ in range(trials)])  # fmt: skip
    assert np.sum(bounds > epsilon) <= most_exceedances(trials)
    assert np.median(bounds) >= tightness * epsilon


def test_the_gaussian_statistic_is_calibrated_at_its_confidence():
    # 95%: about 5% of bounds land above the truth (not far fewer: the margin is not wasted).
    rng = np.random.default_rng(2)
    mus = np.array([audit_scores(*gaussian_scores(1.0, 1000, rng), DELTA, 0.95, "gaussian").mu_lower for _ in range(400)])
    assert 0.02 <= np.mean(mus > 1.0) <= 0.09


def test_the_one_shot_estimate_recovers_mu_and_epsilon():
    estimate = one_shot_estimate(*gaussian_scores(1.5, 20_000, np.random.default_rng(3)), DELTA)
    assert estimate.mu == pytest.approx(1.5, abs=0.05)
    assert estimate.epsilon == pytest.approx(gdp_epsilon(1.5, DELTA), rel=0.05)


def test_gdp_conversion_round_trips_through_dp_accounting():
    for epsilon in (0.5, 3.0, 8.0):
        assert gdp_epsilon(gaussian_mu(epsilon, DELTA), DELTA) == pytest.approx(epsilon, rel=1e-6)
    assert gdp_epsilon(0.0, DELTA) == 0.0 and gdp_epsilon(-1.0, DELTA) == 0.0


@pytest.mark.parametrize(("guesses", "correct"), [(10, 10), (38, 38), (200, 150)])
def test_with_delta_zero_the_threshold_bound_is_the_binomial_tail_of_randomised_response(guesses, correct):
    level = 0.01
    bound = one_run_epsilon_lower_bound(1000, guesses, correct, 0.0, level)
    if correct == guesses:  # P[Bin(r, p) ≥ r] = p^r = level
        assert bound == pytest.approx(logit(level ** (1 / guesses)), rel=1e-5)
    # The bound sits where the tail crosses the level: just below it rejects, just above it does not.
    assert one_run_p_value(1000, guesses, correct, bound * 0.999, 0.0) <= level
    assert one_run_p_value(1000, guesses, correct, bound * 1.001, 0.0) > level


def test_fdp_is_monotone_in_the_claim_and_needs_delta():
    floor = lambda mu: (lambda right: gaussian_incorrect_floor(right, mu))  # noqa: E731
    # 95 of 100 right guesses among 1000 canaries: rejects a near-perfectly private claim, not a leaky one.
    assert fdp_rejects(1000, 100, 95, 0.05, floor(0.1)) and not fdp_rejects(1000, 100, 95, 0.05, floor(5.0))
    assert not fdp_rejects(1000, 100, 50, 0.05, floor(0.01))  # chance rejects nothing
    bound = fdp_epsilon_lower_bound(1000, 100, 95, DELTA, 0.05)
    assert 0 < bound < fdp_epsilon_lower_bound(1000, 100, 100, DELTA, 0.05)
    assert fdp_epsilon_lower_bound(1000, 100, 95, DELTA, 0.05) > one_run_epsilon_lower_bound(1000, 100, 95, DELTA, 0.05)
    with pytest.raises(ValueError, match="needs delta > 0"):
        fdp_epsilon_lower_bound(1000, 100, 95, 0.0, 0.05)


def test_guess_choices_and_bad_inputs():
    assert guess_choices(128)[:2] == [(6, 0), (13, 0)] and (64, 64) in guess_choices(128)
    assert guess_choices(4) == [(1, 0), (2, 0), (1, 1), (2, 2)]
    with pytest.raises(ValueError, match="one score and one inclusion flag per canary"):
        audit_scores([1.0, 2.0], [True], DELTA, 0.95)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        audit_scores([1.0], [True], DELTA, 1.0)
    with pytest.raises(ValueError, match="every canary score must be finite"):
        audit_scores([1.0, math.nan], [True, False], DELTA, 0.95)
    with pytest.raises(ValueError, match="unknown statistic 'bayes'; known: threshold, gaussian, fdp"):
        audit_scores([1.0, 2.0], [True, False], DELTA, 0.95, "bayes")


def test_a_draw_with_one_canary_on_a_side_gives_the_trivial_gaussian_bound_and_no_estimate():
    # The fair coins can leave 1 of 8 canaries excluded (CI drew exactly that): the
    # threshold bound still counts guesses, the Gaussian one has no spread to fit.
    scores = [1.9, 2.7, 3.0, 3.4, 2.2, -0.7, -0.4, -0.2]
    included = [True, True, True, True, True, False, True, True]
    for flags in (included, [not flag for flag in included]):
        bound = audit_scores(scores, flags, DELTA, 0.95, "gaussian")
        assert bound.epsilon_lower == 0.0 and bound.mu_lower is None and "fewer than 2" in bound.describe()
        estimate = one_shot_estimate(scores, flags, DELTA)
        assert math.isnan(estimate.epsilon) and math.isnan(estimate.mu)
        assert audit_scores(scores, flags, DELTA, 0.95, "threshold").epsilon_lower >= 0.0
    assert audit_scores(scores[:4] + scores[5:], [True, True, False, False, True, True, True], DELTA, 0.95,
                        "gaussian").mu_lower is not None  # fmt: skip


def test_a_perfect_separation_is_scored_on_both_ends_and_its_reverse_gives_nothing():
    included = np.arange(200) % 2 == 0
    scores = np.where(included, 1.0, -1.0) + np.linspace(0, 0.1, 200)  # every included canary scores higher
    best = audit_scores(scores, included, delta=0.0, confidence=0.95)
    assert best.negative_guesses > 0  # "excluded" guesses on the lowest scores count too
    assert best.correct == best.positive_guesses + best.negative_guesses
    assert best.epsilon_lower == pytest.approx(
        one_run_epsilon_lower_bound(200, best.correct, best.correct, 0.0, 0.05 / best.choices_tried), rel=1e-9)
    for statistic in STATISTICS:
        assert audit_scores(-scores, included, delta=DELTA, confidence=0.95, statistic=statistic).epsilon_lower == 0.0


# --- canaries -----------------------------------------------------------------------------


def test_gradient_canary_directions_are_orthonormal_and_projections_read_them_back():
    like = {"w": torch.zeros(7, 11), "b": torch.zeros(11), "steps": torch.zeros(1, dtype=torch.long)}
    directions = OrthogonalDirections(like, 40, seed=5)
    rows = torch.stack([torch.cat([d["w"].reshape(-1), d["b"]]) for d in map(directions.direction, range(40))])
    assert torch.allclose(rows @ rows.T, torch.eye(40, dtype=torch.float64))
    assert "steps" not in directions.direction(0)  # integer buffers carry no canary
    change = {name: 3.0 * t for name, t in directions.direction(7).items()}
    assert directions.project(change) == pytest.approx(np.eye(40)[7] * 3.0)
    with pytest.raises(UsageError, match="89 gradient canaries need as many model parameters, the model has 88"):
        OrthogonalDirections(like, 89, seed=5)


def test_input_canary_scores_are_centred_within_each_label(tmp_path):
    settings = RunSettings(model="cnn", model_width=4)
    canaries = InputCanaries(settings, 30, tmp_path)
    assert len(list(tmp_path.glob("canary-*.pt"))) == 30
    model = canaries.spec.build().state_dict()
    moved = {name: t + 0.05 * torch.randn_like(t) if t.is_floating_point() else t for name, t in model.items()}
    scores, labels = canaries.scores(model, moved), canaries.labels.numpy()
    for label in np.unique(labels):
        assert scores[labels == label].mean() == pytest.approx(0.0, abs=1e-9)


def test_the_default_number_of_canaries_follows_the_threat_and_fits_the_model():
    assert AuditOptions().canaries_for(77_858) == 2000 and AuditOptions().canaries_for(158) == 158
    assert AuditOptions(threat="final-model").canaries_for(158) == 500
    assert AuditOptions(canaries=300).canaries_for(158) == 300  # asked for: refused later if it does not fit


def test_audit_options_refuse_bad_values_in_one_line():
    for options, message in [(AuditOptions(canaries=3), "canaries must be >= 4"),
                             (AuditOptions(confidence=1.0), r"confidence must be in \(0, 1\)"),
                             (AuditOptions(threat="grey-box"), "unknown threat model 'grey-box'; known: white-box, final-model"),
                             (AuditOptions(statistic="bayes"), "unknown statistic 'bayes'")]:  # fmt: skip
        with pytest.raises(UsageError, match=message):
            options.validate()


def test_the_command_line_offers_what_the_library_knows():
    assert cli_audit.THREATS == analysis_audit.THREATS and cli_audit.STATISTICS == STATISTICS
    defaults = AuditOptions()
    assert (cli_audit.DEFAULT_CANARIES, cli_audit.DEFAULT_CONFIDENCE, cli_audit.DEFAULT_THREAT,
            cli_audit.DEFAULT_STATISTIC) == (defaults.canaries, defaults.confidence, defaults.threat, defaults.statistic)  # fmt: skip


def test_bad_audit_input_is_one_line_and_exit_code_2(dpfl_quick, tmp_path):
    result = dpfl_quick("audit", "--threat", "grey-box")
    assert result.returncode == 2 and "invalid choice: 'grey-box' (choose from 'white-box', 'final-model')" in result.stderr
    result = dpfl_quick("audit", "--model", "cnn", "--width", "2", "--clients", "4", "--canaries", "5000",
                        "--out", str(tmp_path / "too-many"))  # fmt: skip
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "5000 gradient canaries need as many model parameters, the model has 158" in result.stderr


def test_the_broken_mechanism_scales_every_gaussian_sampler_of_the_secure_streams():
    # Every sampler, found by name, so that one added later (as gaussian_segments was) cannot
    # leave the broken mechanism's noise whole and the audit tests below void.
    samplers = {"gaussian": ((3, 5),), "gaussian_segments": ([4, 7, 1],)}
    assert {name for name in dir(RandomStream) if "gaussian" in name} == set(samplers)
    for name, args in samplers.items():
        whole = getattr(Randomness(31).stream("n"), name)(*args, 1.0)
        with scaled_noise(0.5):
            halved = getattr(Randomness(31).stream("n"), name)(*args, 2.0)
        assert torch.equal(whole, halved), name


# --- through the real ServerApp, strategy, mechanism and ClientApp -------------------------
# A CNN of width 16 (5,226 parameters), 20 clients, 4 rounds at q = 0.5: the 2000 orthogonal canaries fit.
AUDITED = dict(model="cnn", model_width=16, num_clients=20, sample_rate=0.5, num_server_rounds=4, max_epsilon=0.0)


@pytest.mark.slow
def test_the_white_box_audit_of_the_real_mechanism_stays_below_its_epsilon_through_the_cli(dpfl_quick, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "audit"
    result = dpfl_quick("audit", "--strategy", "dp-fedpgn", "--clip-mode", "adaptive", "--model", "cnn", "--width", "16",
                        "--clients", "20", "--sample-rate", "0.5", "--rounds", "4", "--target-epsilon", "8",
                        "--max-epsilon", "0", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "audit.json").read_text())
    ledger = json.loads((out / "run" / "privacy_ledger.json").read_text())
    assert report["threat"] == "white-box" and report["statistic"] == "gaussian" and len(report["scores"]) == 2000
    assert report["accountant_epsilon"] == pytest.approx(8.0, rel=1e-3)
    assert report["last_iterate_epsilon"] == pytest.approx(last_iterate_epsilon(ledger["history"], 1e-5))
    # Sound: below the accountant's ε (how close it comes is benchmarks/audit.py's to measure).
    assert 0 < report["bound"]["epsilon_lower"] <= report["accountant_epsilon"]
    assert not report["flagged"] and set(report["bounds"]) == set(STATISTICS)
    assert f"{report['bound']['epsilon_lower']:.3f}" in result.stdout and (out / "audit.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("scale", [0.5, 0.0])
def test_the_audit_flags_a_mechanism_that_adds_less_noise_than_it_accounts_for(tmp_path, scale):
    with scaled_noise(scale):  # tests/broken_mechanism.py: σ·scale added, σ accounted
        report = run_audit(RunSettings(**AUDITED, strategy="dp-fedavg", target_epsilon=8.0), AuditOptions(), tmp_path)
    assert report.accountant_epsilon == pytest.approx(8.0, rel=1e-3)
    assert report.flagged and report.bound.epsilon_lower > report.accountant_epsilon


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["bandmf", "tree", "blt"])
def test_each_correlated_mechanism_audits_below_its_epsilon_and_a_broken_one_is_flagged(tmp_path, mechanism):
    """Every --mechanism under its schema (min-sep, b = 2: two accounted steps at q = 1) through the real ServerApp:
    the white-box bound stays below the accountant's ε, and with its noise removed it is flagged."""
    settings = RunSettings(**AUDITED, strategy="dp-fedavg", target_epsilon=8.0, mechanism=mechanism,
                           participation="min-sep", min_separation=2)  # fmt: skip
    report = run_audit(settings, AuditOptions(), tmp_path / "real")
    assert report.accountant_epsilon == pytest.approx(8.0, rel=1e-3)
    assert 0 < report.bound.epsilon_lower <= report.accountant_epsilon and not report.flagged
    assert math.isnan(report.last_iterate_epsilon)  # not defined for correlated noise under a schema
    with scaled_noise(0.0):  # the correlated noise is drawn from the secure streams too
        broken = run_audit(settings, AuditOptions(), tmp_path / "broken")
    assert broken.flagged and broken.bound.epsilon_lower > broken.accountant_epsilon


@pytest.mark.slow
def test_the_audit_runs_a_correlated_mechanism_from_the_command_line(dpfl_quick, tmp_path):
    out = tmp_path / "audit"
    result = dpfl_quick("audit", "--strategy", "dp-fedavg", "--mechanism", "blt", "--participation", "cyclic",
                        "--min-separation", "2", "--model", "cnn", "--width", "16", "--clients", "20", "--sample-rate",
                        "0.5", "--rounds", "4", "--target-epsilon", "8", "--max-epsilon", "0", "--canaries", "500",
                        "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "audit.json").read_text())
    ledger = json.loads((out / "run" / "privacy_ledger.json").read_text())
    assert [step[1:] for step in ledger["history"]] == [[1.0, 2]]  # blt is not amplified under cyclic
    assert 0 < report["bound"]["epsilon_lower"] <= report["accountant_epsilon"] and not report["flagged"]


@pytest.mark.slow
def test_the_final_model_audit_trains_input_canaries_through_the_real_client(dpfl_quick, tmp_path):
    out = tmp_path / "final"
    result = dpfl_quick("audit", "--threat", "final-model", "--statistic", "threshold", "--strategy", "dp-fedavg",
                        "--model", "cnn", "--width", "8", "--clients", "10", "--sample-rate", "0.5", "--rounds", "2",
                        "--target-epsilon", "8", "--max-epsilon", "0", "--canaries", "40", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "audit.json").read_text())
    diagnostics = [json.loads(line) for line in (out / "run" / "server_private_diagnostics.jsonl").read_text().splitlines()]
    # The canaries were sampled as clients and their replies accepted like any other.
    assert sum(row["accepted"] for row in diagnostics) > sum(row["sampled"] for row in diagnostics) / 2 > 0
    assert sum(row["failed"] for row in diagnostics) == 0
    assert report["threat"] == "final-model" and report["bound"]["statistic"] == "threshold"
    assert report["bound"]["epsilon_lower"] <= report["accountant_epsilon"]


@pytest.mark.slow
def test_simulate_with_audit_appends_the_check_to_a_run(dpfl_quick, tmp_path):
    out = tmp_path / "run"
    result = dpfl_quick("simulate", "--engine", "in-process", "--strategy", "dp-fedavg", "--model", "cnn", "--width", "16",
                        "--clients", "10", "--sample-rate", "0.5", "--rounds", "2", "--target-epsilon", "2",
                        "--max-epsilon", "0", "--audit", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "audit" / "audit.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert report["accountant_epsilon"] == pytest.approx(summary["epsilon"])
    assert summary["last-iterate-epsilon"] == pytest.approx(last_iterate_epsilon([(summary["noise-multiplier"], 0.5, 2)], 1e-5))
    assert 0 <= report["bound"]["epsilon_lower"] <= report["accountant_epsilon"]
    assert len(report["scores"]) == 2000
