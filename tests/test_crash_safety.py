"""Crash safety: checkpoints, resume after SIGKILL, init-from, client failures, signals, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from dpfl.privacy.accountants.rdp import epsilon_for
from dpfl.server.checkpoint import CHECKPOINT_FILE, LEDGER_FILE, load_initial_state, load_run_checkpoint
from dpfl.engines.local_federation import kill_processes, local_superlink, private_flower_environment, write_app
from dpfl.server.recorder import PRIVATE_DIAGNOSTICS_FILE
from dpfl.settings import RunSettings
from dpfl.task.checkpoint import load_checkpoint
from conftest import DPFL

# Rounds slow enough (~1 s in process) that a kill lands between two of them.
KILLABLE = ["--model", "cnn", "--width", "4", "--clients", "12", "--sample-rate", "0.5", "--local-epochs", "12",
            "--noise-multiplier", "1.0", "--max-epsilon", "0", "--rounds", "4"]  # fmt: skip
FAST = ["--model", "cnn", "--width", "4", "--clients", "10", "--sample-rate", "0.5", "--noise-multiplier", "1.0",
        "--max-epsilon", "0", "--engine", "in-process"]  # fmt: skip


def read_rounds(out: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started, whatever session each is in."""
    parent = psutil.Process(process.pid)
    kill_processes([parent, *parent.children(recursive=True)])


def wait_for_checkpoint(out: Path, process: subprocess.Popen, at_least: int, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        try:
            completed = load_run_checkpoint(out).round
        except Exception:  # noqa: BLE001 - not written yet
            completed = -1
        if completed >= at_least:
            return completed
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of round {at_least} in {timeout} s")


def start_simulate(*args: str) -> subprocess.Popen:
    return subprocess.Popen([DPFL, "simulate", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def killed_and_resumed(out: Path, *args: str, engine: str) -> subprocess.CompletedProcess:
    """Run, SIGKILL the whole process tree after round 2 of 4, resume to the end."""
    process = start_simulate(*args, "--engine", engine, "--out", str(out))
    completed = wait_for_checkpoint(out, process, at_least=2)
    kill_tree(process)
    assert completed < 4, "the run finished before the kill"
    assert not (out / "summary.json").exists()
    return subprocess.run([DPFL, "simulate", "--resume", str(out), "--engine", engine], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def final_state(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((out / "summary.json").read_text()), load_checkpoint(out / "final_model.pt").state_dict


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["in-process", "flower"])
def test_a_killed_run_resumes_to_the_epsilon_and_ledger_of_an_uninterrupted_one(tmp_path, engine):
    resumed = killed_and_resumed(tmp_path / "killed", *KILLABLE, engine=engine)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary, _ = final_state(tmp_path / "killed")
    assert summary["rounds-completed"] == 4 and summary["outcome"] == "completed"
    assert read_rounds(tmp_path / "killed") == [0, 1, 2, 3, 4]  # each round once
    # The uninterrupted run's ε and ledger: the same four accounted rounds, whatever the engine.
    uninterrupted = subprocess.run([DPFL, "simulate", *KILLABLE, "--engine", "in-process", "--out", str(tmp_path / "whole")],
                                   capture_output=True, text=True, timeout=900)  # fmt: skip
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    whole, _ = final_state(tmp_path / "whole")
    assert summary["epsilon"] == whole["epsilon"] == pytest.approx(epsilon_for(1.0, 0.5, 4, 1e-5)[0], rel=1e-12)
    ledgers = [load_checkpoint(tmp_path / run / "final_model.pt").extra["privacy-ledger"] for run in ("killed", "whole")]
    assert ledgers[0] == ledgers[1] and ledgers[0]["history"] == [[1.0, 0.5, 4]]


@pytest.mark.slow
def test_with_reproducible_noise_a_resumed_run_ends_at_the_same_weights(tmp_path):
    args = [*KILLABLE, "--reproducible-noise"]
    resumed = killed_and_resumed(tmp_path / "killed", *args, engine="in-process")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    whole = subprocess.run([DPFL, "simulate", *args, "--engine", "in-process", "--out", str(tmp_path / "whole")],
                           capture_output=True, text=True, timeout=900)  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    (_, killed_weights), (_, whole_weights) = final_state(tmp_path / "killed"), final_state(tmp_path / "whole")
    for name, tensor in whole_weights.items():
        torch.testing.assert_close(killed_weights[name], tensor, rtol=1e-5, atol=1e-6)
    assert read_rounds(tmp_path / "killed") == [0, 1, 2, 3, 4]


def test_init_from_carries_the_privacy_ledger(dpfl_quick, tmp_path):
    first = dpfl_quick("simulate", *FAST, "--rounds", "3", "--out", str(tmp_path / "first"))
    assert first.returncode == 0, first.stderr
    more = dpfl_quick("simulate", *FAST, "--rounds", "2", "--init-from", str(tmp_path / "first" / "final_model.pt"),
                      "--out", str(tmp_path / "more"))  # fmt: skip
    assert more.returncode == 0, more.stderr
    carried = json.loads((tmp_path / "more" / "summary.json").read_text())["epsilon"]
    assert carried == pytest.approx(epsilon_for(1.0, 0.5, 5, 1e-5)[0], rel=1e-12)
    # The new run starts from the first one's final weights: its round 0 is the first's last round.
    first_rows, more_rows = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                             for run in ("first", "more"))  # fmt: skip
    assert more_rows[0]["accuracy"] == first_rows[-1]["accuracy"] and more_rows[0]["loss"] == first_rows[-1]["loss"]


def test_init_from_a_checkpoint_without_a_ledger_needs_new_data(dpfl_quick, tmp_path):
    reference = dpfl_quick("simulate", *FAST, "--rounds", "1", "--reproducible-noise", "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    refused = dpfl_quick("simulate", *FAST, "--rounds", "1", "--init-from", str(tmp_path / "ref"), "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "carries no privacy ledger" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    allowed = dpfl_quick("simulate", *FAST, "--rounds", "1", "--init-from", str(tmp_path / "ref"), "--init-new-data",
                         "--out", str(tmp_path / "y"))  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads((tmp_path / "y" / "summary.json").read_text())["epsilon"] == pytest.approx(epsilon_for(1.0, 0.5, 1, 1e-5)[0])


def test_resume_adds_rounds_and_a_crash_after_accounting_over_counts(dpfl_quick, tmp_path):
    out = tmp_path / "run"
    assert dpfl_quick("simulate", *FAST, "--rounds", "2", "--out", str(out)).returncode == 0
    # A crash after round 3 was accounted (journaled) but before its checkpoint.
    ledger = json.loads((out / LEDGER_FILE).read_text())
    ledger["history"] = [[1.0, 0.5, 3]]
    (out / LEDGER_FILE).write_text(json.dumps(ledger))
    resumed = dpfl_quick("simulate", "--resume", str(out), "--rounds", "4", "--engine", "in-process")
    assert resumed.returncode == 0, resumed.stderr
    assert read_rounds(out) == [0, 1, 2, 3, 4]
    history = load_checkpoint(out / "final_model.pt").extra["privacy-ledger"]["history"]
    assert history == [[1.0, 0.5, 5]]  # the journaled round is counted: over, never under


def test_init_from_after_a_crash_takes_the_journal_as_resume_does(dpfl_quick, tmp_path):
    out = tmp_path / "run"
    assert dpfl_quick("simulate", *FAST, "--rounds", "2", "--out", str(out)).returncode == 0
    # A crash after round 3 was accounted (journaled) but before its checkpoint: 3 rounds were released.
    ledger = json.loads((out / LEDGER_FILE).read_text())
    ledger["history"] = [[1.0, 0.5, 3]]
    (out / LEDGER_FILE).write_text(json.dumps(ledger))
    for source in (out, out / CHECKPOINT_FILE):
        assert load_initial_state(source, new_data=False).history == [(1.0, 0.5, 3)]
    more = dpfl_quick("simulate", *FAST, "--rounds", "1", "--init-from", str(out), "--out", str(tmp_path / "more"))
    assert more.returncode == 0, more.stderr
    assert json.loads((tmp_path / "more" / "summary.json").read_text())["epsilon"] == pytest.approx(
        epsilon_for(1.0, 0.5, 4, 1e-5)[0], rel=1e-12)


def test_init_from_with_a_target_calibrates_sigma_over_the_carried_rounds_too(dpfl_quick, tmp_path):
    # Calibrating the new rounds alone to the target would end the two runs together above it.
    first = dpfl_quick("simulate", *FAST, "--rounds", "3", "--out", str(tmp_path / "first"))
    assert first.returncode == 0, first.stderr
    target = 2 * epsilon_for(1.0, 0.5, 3, 1e-5)[0]
    more = dpfl_quick("simulate", *[a for a in FAST if a not in ("--noise-multiplier", "1.0")], "--rounds", "3",
                      "--target-epsilon", f"{target}", "--init-from", str(tmp_path / "first"),
                      "--out", str(tmp_path / "more"))  # fmt: skip
    assert more.returncode == 0, more.stderr
    summary = json.loads((tmp_path / "more" / "summary.json").read_text())
    assert summary["epsilon"] == pytest.approx(target, rel=1e-3) and summary["epsilon"] <= target * (1 + 1e-6)


def test_a_resume_that_lifts_or_raises_the_budget_says_so(dpfl_quick, tmp_path):
    out = tmp_path / "run"
    budgeted = [a for a in FAST if a not in ("--max-epsilon", "0")]
    assert dpfl_quick("simulate", *budgeted, "--max-epsilon", "50", "--rounds", "1", "--out", str(out)).returncode == 0
    raised = dpfl_quick("simulate", "--resume", str(out), "--rounds", "2", "--max-epsilon", "60", "--engine", "in-process")
    assert raised.returncode == 0, raised.stderr
    assert "this resume raises the run's epsilon budget from 50 to 60" in " ".join(raised.stdout.split())
    lifted = dpfl_quick("simulate", "--resume", str(out), "--rounds", "3", "--max-epsilon", "0", "--engine", "in-process")
    assert lifted.returncode == 0, lifted.stderr
    assert "this resume lifts the run's epsilon budget of 60" in " ".join(lifted.stdout.split())


BAD_RESUMES = [
    ("empty", "holds no checkpoint.pt"),
    ("truncated", "is not a dpfl run checkpoint"),
    ("changed", "with a changed run config (lr 0.3 -> 0.5)"),
    ("fewer-rounds", "is below the 2 rounds"),
]


@pytest.mark.parametrize("case, message", BAD_RESUMES)
def test_a_bad_resume_is_one_line_exit_2_and_overwrites_nothing(dpfl_quick, tmp_path, case, message):
    out = tmp_path / "run"
    assert dpfl_quick("simulate", *FAST, "--rounds", "2", "--out", str(out)).returncode == 0
    extra: list[str] = []
    if case == "empty":
        out = tmp_path / "empty"
        out.mkdir()
    elif case == "truncated":
        data = (out / CHECKPOINT_FILE).read_bytes()
        (out / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    elif case == "changed":
        extra = ["--lr", "0.5"]
    else:
        extra = ["--rounds", "1"]
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    result = dpfl_quick("simulate", "--resume", str(out), *extra, "--engine", "in-process")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


@pytest.mark.slow
def test_sigterm_stops_cleanly_says_how_to_resume_and_leaves_no_flower_process(tmp_path):
    out = tmp_path / "run"
    process = start_simulate(*KILLABLE, "--engine", "flower", "--out", str(out))
    wait_for_checkpoint(out, process, at_least=1)
    tree = psutil.Process(process.pid).children(recursive=True)
    assert any("flower-superlink" in " ".join(child.cmdline()) for child in tree)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "interrupted" in output and f"dpfl simulate --resume {out}" in output.replace("\n", "")
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    resumed = subprocess.run([DPFL, "simulate", "--resume", str(out), "--engine", "in-process"], capture_output=True,
                             text=True, timeout=900)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert read_rounds(out) == [0, 1, 2, 3, 4]


# --- a real deployment on loopback: one SuperNode dies mid-run -----------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("ab") as sink:
        return subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


@pytest.mark.slow
def test_a_supernode_dying_mid_round_does_not_stop_the_federation(tmp_path):
    out = tmp_path / "run"
    rounds, sigma, q = 4, 1.0, 1.0
    settings = RunSettings(
        model="cnn", model_width=4, num_clients=3, sample_rate=q, num_server_rounds=rounds, noise_multiplier=sigma,
        target_epsilon=0.0, max_epsilon=0.0, local_epochs=3, round_timeout=60.0, delta=1e-3, out_dir=str(out),
    )  # fmt: skip
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, settings)
    env = private_flower_environment(tmp_path / "flwr")
    # Flower 1.41's SuperLink serves its Fleet, Control and Runtime APIs on one HTTP port.
    port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    Path(env["FLWR_HOME"]).mkdir()
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    log = tmp_path / "flower.log"
    processes: list[subprocess.Popen] = []
    with local_superlink(env, log, simulation=False):
        try:
            for partition in range(3):
                processes.append(start(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                                        "--node-config", f"partition-id={partition} num-partitions=3",
                                        "--port", str(free_port())], env, log))  # fmt: skip
            run = subprocess.Popen(["flwr", "run", str(app_dir), "--stream"], env=env, cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
            deadline = time.monotonic() + 300
            while not (out / "metrics.jsonl").exists() or len(read_rounds(out)) < 2:  # round 1 done: round 2 runs
                assert time.monotonic() < deadline and run.poll() is None, log.read_text()[-3000:]
                time.sleep(0.05)
            stop(processes.pop())  # the third SuperNode and its ClientApp, mid-round
            output, _ = run.communicate(timeout=600)
        finally:
            for process in processes:
                stop(process)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["rounds-completed"] == rounds, output[-3000:]
    assert summary["epsilon"] == pytest.approx(epsilon_for(sigma, q, rounds, 1e-3)[0], rel=1e-12)
    diagnostics = [json.loads(line) for line in (out / PRIVATE_DIAGNOSTICS_FILE).read_text().splitlines()]
    # Round 2's message to the dead node fails (Flower's "Node Unavailable") or times out; once
    # the SuperLink has marked the node offline, later rounds no longer ask it.
    assert sum(d["failed"] + d["no-reply"] for d in diagnostics[1:]) >= 1, diagnostics
    assert all(d["accepted"] >= 1 for d in diagnostics)
    # The failure count is server-private: the public records do not hold it.
    public = (out / "metrics.jsonl").read_text() + (out / "summary.json").read_text()
    assert "failed" not in public and "no-reply" not in public
    assert not math.isnan(summary["epsilon"])


@pytest.mark.slow
def test_a_secure_aggregation_run_killed_mid_round_resumes_and_counts_that_round(tmp_path):
    """Under aggregation=secagg the round is accounted before its sum is unmasked: a run killed
    during round 2 or 3 resumes to the end with each round released once, and its ledger holds at
    least the four rounds (a fifth when the kill fell between accounting and the checkpoint).
    The round's secrets were in the killed processes' memory only: nothing to clean up, none
    in the checkpoint."""
    resumed = killed_and_resumed(tmp_path / "killed", *KILLABLE, "--aggregation", "secagg", engine="in-process")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary, _ = final_state(tmp_path / "killed")
    assert summary["rounds-completed"] == 4 and summary["outcome"] == "completed"
    assert read_rounds(tmp_path / "killed") == [0, 1, 2, 3, 4]
    ledger = load_checkpoint(tmp_path / "killed" / "final_model.pt").extra["privacy-ledger"]
    steps = sum(entry[2] for entry in ledger["history"])
    assert {tuple(entry[:2]) for entry in ledger["history"]} == {(1.0, 0.5)} and steps in (4, 5), ledger
    state = load_run_checkpoint(tmp_path / "killed").strategy_state
    assert "secagg" not in json.dumps(state, default=str).lower()
