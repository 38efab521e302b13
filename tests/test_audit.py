"""The empirical privacy audit: its statistics, and through the real code path, sound and able to fail."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dpfl.privacy.audit import audit_scores, guess_choices, one_run_epsilon_lower_bound, one_run_p_value
from dpfl.privacy.randomness import Randomness
from dpfl.analysis.audit import run_audit
from dpfl.settings import RunSettings

from broken_mechanism import scaled_noise


def logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize(("guesses", "correct"), [(10, 10), (38, 38), (200, 150)])
def test_with_delta_zero_the_bound_is_the_binomial_tail_of_randomised_response(guesses, correct):
    level = 0.01
    bound = one_run_epsilon_lower_bound(1000, guesses, correct, 0.0, level)
    if correct == guesses:  # P[Bin(r, p) ≥ r] = p^r = level
        assert bound == pytest.approx(logit(level ** (1 / guesses)), rel=1e-5)
    # The bound sits where the tail crosses the level: just below it rejects, just above it does not.
    assert one_run_p_value(1000, guesses, correct, bound * 0.999, 0.0) <= level
    assert one_run_p_value(1000, guesses, correct, bound * 1.001, 0.0) > level


def test_delta_only_loosens_the_bound_and_chance_gives_nothing():
    assert one_run_epsilon_lower_bound(500, 100, 90, 1e-3, 0.05) < one_run_epsilon_lower_bound(500, 100, 90, 0.0, 0.05)
    assert one_run_epsilon_lower_bound(500, 100, 55, 1e-5, 0.05) == 0.0  # 55 of 100 is chance
    with pytest.raises(ValueError, match="correct <= guesses <= canaries"):
        one_run_p_value(10, 20, 5, 1.0, 0.0)
    with pytest.raises(ValueError, match="correct <= guesses <= canaries"):
        one_run_p_value(10, 5, -1, 1.0, 0.0)
    assert one_run_p_value(10, 5, 0, 3.0, 1e-5) == 1.0  # no correct guess: P[W ≥ 0] = 1


def randomised_response_scores(epsilon: float, canaries: int, stream) -> tuple[np.ndarray, np.ndarray]:
    """An exactly ε-DP release of each canary's inclusion bit, and the bits."""
    included = stream.bernoulli(canaries, 0.5)
    truthful = stream.bernoulli(canaries, 1 / (1 + math.exp(-epsilon)))
    released = np.where(truthful, included, ~included)
    # Ties broken at random: the score is the released bit plus a small uniform.
    return released + 0.5 * stream.uniform(canaries), included


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_on_an_exactly_epsilon_dp_release_the_bound_is_sound_and_close(epsilon):
    stream = Randomness().stream("test-audit")
    bounds = np.array([
        audit_scores(*randomised_response_scores(epsilon, 1000, stream), delta=0.0, confidence=0.95).epsilon_lower
        for _ in range(100)
    ])  # fmt: skip
    # Each bound exceeds ε with probability at most 5% (measured: about 3%); more than 10 of 100
    # has probability about 1% at 5% and 1e-4 at 3%, while an unsound bound exceeds ε far more often.
    assert np.sum(bounds > epsilon) <= 10
    assert np.median(bounds) >= 0.5 * epsilon  # 1000 canaries: a fairly tight audit


def test_guess_choices_and_bad_inputs():
    assert guess_choices(128)[:2] == [(6, 0), (13, 0)] and (64, 64) in guess_choices(128)
    with pytest.raises(ValueError, match="one score and one inclusion flag per canary"):
        audit_scores([1.0, 2.0], [True], 1e-5, 0.95)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        audit_scores([1.0], [True], 1e-5, 1.0)
    # Few canaries: at least one guess per choice, and never more guesses than canaries.
    assert guess_choices(4) == [(1, 0), (2, 0), (1, 1), (2, 2)]
    assert guess_choices(3) == [(1, 0), (2, 0), (1, 1)]


def test_a_perfect_separation_is_scored_on_both_ends_and_its_reverse_gives_nothing():
    included = np.arange(200) % 2 == 0
    scores = np.where(included, 1.0, -1.0) + np.linspace(0, 0.1, 200)  # every included canary scores higher
    best = audit_scores(scores, included, delta=0.0, confidence=0.95)
    assert best.negative_guesses > 0  # "excluded" guesses on the lowest scores count too
    assert best.correct == best.positive_guesses + best.negative_guesses
    assert best.epsilon_lower == pytest.approx(
        one_run_epsilon_lower_bound(200, best.correct, best.correct, 0.0, 0.05 / best.choices_tried), rel=1e-9)
    assert audit_scores(-scores, included, delta=0.0, confidence=0.95).epsilon_lower == 0.0


# --- through the real ServerApp, strategy, mechanism and ClientApp -------------------------
# A CNN of width 16 (5,226 parameters): the canaries' random directions are nearly orthogonal.
# At ε = 1 over 4 rounds at q = 0.5, σ ≈ 4.5: a run the audit can refute with 128 canaries if broken.
AUDITED = dict(model="cnn", model_width=16, num_clients=20, sample_rate=0.5, num_server_rounds=4, target_epsilon=1.0,
               max_epsilon=0.0)  # fmt: skip


@pytest.mark.slow
def test_the_audit_of_the_real_mechanism_stays_below_its_epsilon_through_the_cli(dpfl_quick, tmp_path):
    out = tmp_path / "audit"
    result = dpfl_quick("audit", "--strategy", "dp-fedpgn", "--clip-mode", "adaptive", "--model", "cnn", "--width", "16",
                        "--clients", "20", "--sample-rate", "0.5", "--rounds", "4", "--target-epsilon", "1",
                        "--max-epsilon", "0", "--canaries", "128", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "audit.json").read_text())
    assert report["accountant_epsilon"] == pytest.approx(1.0, rel=1e-3)
    assert report["bound"]["epsilon_lower"] <= report["accountant_epsilon"]
    assert f"{report['bound']['epsilon_lower']:.3f}" in result.stdout and (out / "audit.png").stat().st_size > 10_000
    assert len(report["scores"]) == 128 and report["bound"]["included"] == sum(report["included"])


@pytest.mark.slow
@pytest.mark.parametrize("scale", [0.01, 0.0])
def test_the_audit_catches_a_mechanism_whose_noise_is_below_what_the_accountant_is_told(tmp_path, scale):
    settings = RunSettings(**AUDITED, strategy="dp-fedavg")
    with scaled_noise(scale):  # tests/broken_mechanism.py: noise at scale·σ, accounted at σ
        report = run_audit(settings, canaries=128, confidence=0.95, out=tmp_path / f"scale-{scale}")
    assert report.accountant_epsilon == pytest.approx(1.0, rel=1e-3)
    assert report.bound.epsilon_lower > report.accountant_epsilon


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
    assert 0 <= report["bound"]["epsilon_lower"] <= report["accountant_epsilon"]
    assert len(report["scores"]) == 128
