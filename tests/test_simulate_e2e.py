"""End to end through the real CLI and real Flower processes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dpfl.server.local_federation import local_superlink, private_flower_environment
from dpfl.task.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "cnn", "--width", "4", "--clients", "10", "--sample-rate", "0.5"]


def read_rounds(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_simulate_trains_writes_metrics_and_accounts_every_round(dpfl, tmp_path):
    out = tmp_path / "run"
    result = dpfl("simulate", *SMALL, "--rounds", "3", "--noise-multiplier", "1.0", "--max-epsilon", "0", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    rounds = read_rounds(out)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    epsilons = [r["epsilon"] for r in rounds]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:]))
    assert {"accuracy", "loss", "sampled", "update-norm-mean", "round-time"} <= rounds[-1].keys()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["rounds-completed"] == 3
    assert "epsilon 1." in result.stdout or "epsilon" in result.stdout
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
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "data directory '/nonexistent/cifar' does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(dpfl, tmp_path, args, message):
    result = dpfl("simulate", *args, "--out", str(tmp_path / "never"))
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("command", ["simulate", "compare", "strategies", "privacy", "compress", "deploy"])
def test_every_subcommand_has_help(dpfl, command):
    result = dpfl(command, "--help")
    assert result.returncode == 0 and "usage: dpfl" in result.stdout
