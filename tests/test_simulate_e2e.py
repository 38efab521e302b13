"""End to end through the real CLI and real Flower processes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dpfl.engines.local_federation import local_superlink, private_flower_environment
from dpfl.task.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "cnn", "--width", "4", "--clients", "10", "--sample-rate", "0.5"]


def read_rounds(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_simulate_trains_writes_metrics_and_accounts_every_round(dpfl, tmp_path):
    out = tmp_path / "run"
    result = dpfl("simulate", *SMALL, "--rounds", "3", "--noise-multiplier", "1.0", "--max-epsilon", "0",
                  "--engine", "flower", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rounds = read_rounds(out)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    epsilons = [r["epsilon"] for r in rounds]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:]))
    assert {"accuracy", "loss", "epsilon", "noise-multiplier", "expected-clients"} <= rounds[-1].keys()
    assert not {"sampled", "update-norm-mean", "update-norm-max", "clipped-fraction", "train-loss", "round-time",
                "wall-time"} & rounds[-1].keys()  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["rounds-completed"] == 3
    assert f"epsilon {epsilons[-1]:.3f}" in result.stdout and "clients" not in result.stdout.split("records:")[1]
    assert (out / "curves.png").stat().st_size > 10_000
    model = load_checkpoint(out / "final_model.pt").build_model()
    assert sum(p.numel() for p in model.parameters()) > 0
    # The same folder is never overwritten.
    again = dpfl("simulate", *SMALL, "--rounds", "1", "--out", str(out))
    assert again.returncode == 2 and "already holds a run" in again.stderr


@pytest.mark.slow
def test_budget_stops_the_run_before_it_is_exceeded(dpfl, tmp_path):
    out = tmp_path / "budget"
    # sigma 1, q 0.5: epsilon is 3.89 after one round and 5.38 after two (delta 1e-5).
    result = dpfl("simulate", *SMALL, "--rounds", "5", "--noise-multiplier", "1.0", "--max-epsilon", "5", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds-completed"] == 1
    assert summary["outcome"].startswith("stopped before the budget was exceeded")
    assert max(r["epsilon"] for r in read_rounds(out)) <= 5
    assert "stopped before the budget" in result.stdout


@pytest.mark.slow
def test_flwr_run_of_the_repository_completes(tmp_path):
    env = private_flower_environment(tmp_path / "flwr-home")
    out = tmp_path / "flwr-run"
    run_config = f"num-server-rounds=2 num-clients=4 model='cnn' model-width=4 sample-rate=1.0 out-dir='{out}'"
    with local_superlink(env, tmp_path / "superlink.log"):
        result = subprocess.run(
            ["flwr", "run", str(ROOT), "--stream", "--run-config", run_config, "--federation-config", "num-supernodes=4"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["rounds-completed"] == 2


def test_a_non_private_federation_learns(dpfl_quick, tmp_path):
    # A floor that a broken training or aggregation path cannot reach (chance is 10%).
    out = tmp_path / "fedavg"
    result = dpfl_quick("simulate", "--strategy", "fedavg", "--engine", "in-process", "--model", "cnn", "--width", "8",
                  "--clients", "10", "--sample-rate", "1.0", "--rounds", "10", "--local-epochs", "2", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / "summary.json").read_text())["final-accuracy"] >= 0.6


@pytest.mark.parametrize(
    "flag,label",
    [("--clipping=paper", "paper clipping"), ("--reproducible-noise", "reproducible noise")],
)
def test_a_run_whose_epsilon_is_not_valid_says_so_everywhere(dpfl_quick, tmp_path, flag, label):
    out = tmp_path / "not-valid"
    result = dpfl_quick("simulate", *SMALL, "--rounds", "1", "--noise-multiplier", "1.0", "--engine", "in-process",
                  flag, "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" in result.stdout and "NOT valid" in result.stdout.replace("NO formal", "NOT valid")
    assert all(row["epsilon"] is None for row in read_rounds(out))
    assert json.loads((out / "summary.json").read_text())["epsilon-valid"] is False
    assert "epsilon not valid" in result.stdout
    flower_log = (out / "flower.log").read_text()
    assert ("reproducible-noise" in flower_log) == (label == "reproducible noise")


@pytest.mark.slow
def test_compare_runs_the_zoo_at_equal_epsilon(dpfl, tmp_path):
    out = tmp_path / "compare"
    zoo = ["dp-fedpgn", "dp-fedavg", "dp-fedsam", "dp-fedavg-ls", "dp-fedpgn-ls", "fedavg", "fedcm"]
    result = dpfl("compare", "--strategies", *zoo, "--seeds", "1", "--rounds", "2", "--model", "cnn", "--width", "4",
                  "--clients", "10", "--sample-rate", "0.5", "--target-epsilon", "4", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["strategy"]: row for row in json.loads((out / "comparison.json").read_text())["rows"]}
    private = [rows[name]["epsilon"] for name in zoo if name not in ("fedavg", "fedcm")]
    assert all(e == pytest.approx(private[0], rel=1e-9) and 4 * (1 - 1e-3) <= e <= 4 for e in private)
    assert rows["fedavg"]["epsilon"] is None and rows["fedavg"]["epsilon-label"] == "not private"
    assert (out / "comparison.png").stat().st_size > 10_000 and "not private" in result.stdout


def test_the_console_script_reports_bad_input_in_one_line(dpfl, tmp_path):
    # One real subprocess: the installed entry point, its exit code and stderr.
    result = dpfl("simulate", "--rounds", "0", "--out", str(tmp_path / "never"))
    assert result.returncode == 2 and "--rounds: must be >= 1, got 0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--strategy", "fedfoo"], "unknown strategy 'fedfoo'"),
        (["--model", "alexnet"], "unknown model 'alexnet'"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--noise-multiplier", "0"], "--noise-multiplier: must be > 0, got 0"),
        (["--clip", "-1"], "--clip: must be > 0, got -1"),
        (["--sample-rate", "0"], "--sample-rate: must be in (0, 1], got 0"),
        (["--delta", "1"], "--delta: must be in (0, 1), got 1"),
        (["--rounds", "0"], "--rounds: must be >= 1, got 0"),
        (["--clients", "5000"], "5000 clients is more than the 1437 training samples"),
        (["--client-size", "-3"], "--client-size: must be >= 0, got -3"),
        (["--workers", "0"], "--workers: must be >= 1, got 0"),
        (["--engine", "flower", "--workers", "2"], "--workers 2 is for --engine in-process"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "data directory '/nonexistent/cifar' does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(dpfl_quick, tmp_path, args, message):
    result = dpfl_quick("simulate", *args, "--out", str(tmp_path / "never"))
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("command", ["simulate", "compare", "strategies", "privacy", "compress", "deploy"])
def test_every_subcommand_has_help(dpfl_quick, command):
    result = dpfl_quick(command, "--help")
    assert result.returncode == 0 and "usage: dpfl" in result.stdout
