"""Correlated noise and participation schemas in a run: bad input, accounting, the secret state and resume."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from dpfl.privacy.accountants.rdp import epsilon_for
from dpfl.server.checkpoint import CHECKPOINT_FILE, PRIVATE_STATE_FILE
from dpfl.task.checkpoint import load_checkpoint
from conftest import DPFL
from test_crash_safety import FAST, KILLABLE, final_state, killed_and_resumed, read_rounds

MIN_SEP = ["--participation", "min-sep", "--min-separation", "2"]
BANDMF = ["--mechanism", "bandmf", *MIN_SEP]

BAD = [
    (["--mechanism", "bandmf"], "mechanism bandmf needs a participation schema"),
    (["--mechanism", "bandmf", "--participation", "min-sep", "--min-separation", "5", "--rounds", "3"],
     "min-separation must be between 1 and the 3 rounds of the run, got 5"),
    (["--participation", "cyclic", "--min-separation", "4", "--clients", "3", "--rounds", "6"],
     "participation cyclic with min-separation 4 needs at least that many clients (one group each), got 3"),
    ([*BANDMF, "--noise", "client"], "mechanism bandmf adds its correlated noise on the server"),
    ([*MIN_SEP, "--clipping", "paper"], "participation min-sep needs clipping flat"),
    ([*BANDMF, "--clip-mode", "adaptive"], "mechanism bandmf needs a fixed clip norm and no min-replies"),
    (["--mechanism", "laplace"], "unknown mechanism 'laplace'; choose one of gaussian, bandmf, tree, blt"),
    (["--mechanism", "blt"], "mechanism blt needs a participation schema"),
    (["--mechanism", "tree", *MIN_SEP, "--noise", "client"], "mechanism tree adds its correlated noise on the server"),
    (["--mechanism", "blt", *MIN_SEP, "--clip-mode", "adaptive"], "mechanism blt needs a fixed clip norm and no min-replies"),
    (["--participation", "shuffle"], "unknown participation 'shuffle'; choose one of poisson, cyclic, min-sep"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_input_is_one_line_and_exit_2(dpfl_quick, tmp_path, args, message):
    result = dpfl_quick("simulate", *FAST, "--rounds", "2", *args, "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mechanism", ["bandmf", "tree", "blt"])
def test_correlated_noise_accounts_one_step_per_block_and_keeps_its_state_private(dpfl_quick, tmp_path, mechanism):
    out = tmp_path / "run"
    result = dpfl_quick("simulate", *FAST, "--rounds", "3", "--mechanism", mechanism, *MIN_SEP, "--out", str(out))
    assert result.returncode == 0, result.stderr
    # Rounds 1-2 and 3 are two blocks of b = 2; min-sep is not amplified: q = 1 per step.
    ledger = load_checkpoint(out / "final_model.pt").extra["privacy-ledger"]
    assert ledger["history"] == [[1.0, 1.0, 2]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] == pytest.approx(epsilon_for(1.0, 1.0, 2, 1e-5)[0], rel=1e-12)
    state = json.loads((out / PRIVATE_STATE_FILE).read_text())
    assert state["round"] == 3 and (out / PRIVATE_STATE_FILE).stat().st_mode & 0o777 == 0o600
    assert state["master-key"].encode() not in (out / CHECKPOINT_FILE).read_bytes()


def test_target_epsilon_calibrates_over_the_blocks(dpfl_quick, tmp_path):
    args = [a for a in FAST if a not in ("--noise-multiplier", "1.0", "--max-epsilon", "0")]
    out = tmp_path / "run"
    result = dpfl_quick("simulate", *args, "--rounds", "4", "--mechanism", "bandmf", "--participation", "cyclic",
                        "--min-separation", "2", "--target-epsilon", "4", "--max-epsilon", "4", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["rounds-completed"] == 4
    assert summary["epsilon"] == pytest.approx(4.0, rel=1e-3) and summary["epsilon"] <= 4.0 * (1 + 1e-6)
    # cyclic is amplified: two Poisson-sampled steps at q = 0.5
    sigma = summary["noise-multiplier"]
    assert load_checkpoint(out / "final_model.pt").extra["privacy-ledger"]["history"] == [[sigma, 0.5, 2]]


def test_a_resume_continues_the_schema_and_a_lost_or_ahead_state_is_refused(dpfl_quick, tmp_path):
    out = tmp_path / "run"
    assert dpfl_quick("simulate", *FAST, "--rounds", "2", *MIN_SEP, "--out", str(out)).returncode == 0
    state = (out / PRIVATE_STATE_FILE).read_text()
    ahead = json.loads(state)
    ahead["round"] = 3  # a crash after round 3's noise was drawn, before its checkpoint
    (out / PRIVATE_STATE_FILE).write_text(json.dumps(ahead))
    refused = dpfl_quick("simulate", "--resume", str(out), "--rounds", "3", "--engine", "in-process")
    assert refused.returncode == 2 and "round 3's correlated noise was drawn after the last checkpoint" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    (out / PRIVATE_STATE_FILE).unlink()
    lost = dpfl_quick("simulate", "--resume", str(out), "--rounds", "3", "--engine", "in-process")
    assert lost.returncode == 2 and "server_private_noise_state.json is lost" in lost.stderr
    assert "--init-from" in lost.stderr and len(lost.stderr.strip().splitlines()) == 1
    (out / PRIVATE_STATE_FILE).write_text(state)
    resumed = dpfl_quick("simulate", "--resume", str(out), "--rounds", "3", "--engine", "in-process")
    assert resumed.returncode == 0, resumed.stderr
    assert read_rounds(out) == [0, 1, 2, 3]
    assert load_checkpoint(out / "final_model.pt").extra["privacy-ledger"]["history"] == [[1.0, 1.0, 2]]


@pytest.mark.parametrize("mechanism", ["bandmf", "blt"])
def test_correlated_noise_refuses_a_resume_with_other_rounds(dpfl_quick, tmp_path, mechanism):
    out = tmp_path / "run"
    args = ["--mechanism", mechanism, *MIN_SEP]
    assert dpfl_quick("simulate", *FAST, "--rounds", "2", *args, "--out", str(out)).returncode == 0
    refused = dpfl_quick("simulate", "--resume", str(out), "--rounds", "3", "--engine", "in-process")
    assert refused.returncode == 2 and "num-server-rounds cannot change from 2" in refused.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["bandmf", "blt"])
def test_a_killed_correlated_run_resumes_to_the_same_models_epsilon_and_ledger(tmp_path, mechanism):
    """SIGKILL after round 2 of 4, --resume: with --reproducible-noise the final weights of an uninterrupted
    run (the same correlated stream: bandmf's past noise, blt's buffers, replayed from the key); with secure noise
    the same ε and ledger."""
    for name, extra in (("reproducible", ["--reproducible-noise"]), ("secure", [])):
        args = [*KILLABLE, "--mechanism", mechanism, *MIN_SEP, *extra]
        resumed = killed_and_resumed(tmp_path / f"{name}-killed", *args, engine="in-process")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        whole = subprocess.run([DPFL, "simulate", *args, "--engine", "in-process", "--out", str(tmp_path / f"{name}-whole")],
                               capture_output=True, text=True, timeout=900)  # fmt: skip
        assert whole.returncode == 0, whole.stderr
        assert read_rounds(tmp_path / f"{name}-killed") == [0, 1, 2, 3, 4]
        (killed_summary, killed_weights), (whole_summary, whole_weights) = (
            final_state(tmp_path / f"{name}-{run}") for run in ("killed", "whole"))  # fmt: skip
        if extra:
            for tensor_name, tensor in whole_weights.items():
                torch.testing.assert_close(killed_weights[tensor_name], tensor, rtol=1e-5, atol=1e-6)
        else:
            assert killed_summary["epsilon"] == whole_summary["epsilon"]
            ledgers = [load_checkpoint(tmp_path / f"{name}-{run}" / "final_model.pt").extra["privacy-ledger"]
                       for run in ("killed", "whole")]  # fmt: skip
            assert ledgers[0] == ledgers[1] and ledgers[0]["history"] == [[1.0, 1.0, 2]]


def test_privacy_cli_prints_each_mechanism_side_by_side(capsys):
    from dpfl.cli.main import main

    args = ["privacy", "--noise-multiplier", "2", "--sample-rate", "0.5", "--rounds", "20", "--accountant", "rdp",
            "--mechanism", "all", "--min-separation", "5", "--json"]  # fmt: skip
    assert main([*args, "--participation", "min-sep"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["mechanism"], row["participation"]) for row in rows] == [
        ("gaussian", "poisson"), ("gaussian", "min-sep"), ("bandmf", "min-sep"), ("tree", "min-sep"),
        ("blt", "min-sep")]  # fmt: skip
    baseline, gaussian, bandmf, tree, blt = rows
    assert baseline["epsilon"] == pytest.approx(epsilon_for(2.0, 0.5, 20, 1e-5)[0], rel=1e-12)
    # min-sep: 4 blocks of 5 rounds, unamplified, whatever the noise's correlation
    unamplified = epsilon_for(2.0, 1.0, 4, 1e-5)[0]
    for row in (gaussian, bandmf, tree, blt):
        assert row["epsilon"] == pytest.approx(unamplified, rel=1e-12)
        assert row["accounted-steps"] == 4 and row["last-iterate-epsilon"] is None
    assert bandmf["model-noise"] < 0.7 * gaussian["model-noise"]  # 0.62 at T = 20, b = 5
    assert blt["model-noise"] < 0.75 * gaussian["model-noise"]
    # cyclic: amplified for the banded C only
    assert main([*args, "--participation", "cyclic"]) == 0
    rates = {row["mechanism"]: row["accounted-sample-rate"] for row in json.loads(capsys.readouterr().out)[1:]}
    assert rates == {"gaussian": 0.5, "bandmf": 0.5, "tree": 1.0, "blt": 1.0}
