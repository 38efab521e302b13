"""Every public file of a run, in every mode and on both engines, holds only what the inventory
(:mod:`dpfl.server.public_records`) declares: no realised count, no per-client line, no timing."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from dpfl.analysis.audit import AuditOptions, run_audit
from dpfl.engines.simulation import FLOWER_LOG, run_simulation
from dpfl.server.checkpoint import PRIVATE_STATE_FILE
from dpfl.server.curves import plot_curves
from dpfl.server.public_records import (
    AUDIT_FOLDER,
    CHECKPOINT_KEYS,
    CONFIG_EXTRA_KEYS,
    FINAL_MODEL_EXTRA_KEYS,
    NODE_PRIVATE_FOLDERS,
    PUBLIC_FILES,
    PUBLIC_ROUND_KEYS,
    PUBLIC_SUMMARY_KEYS,
    SERVER_PRIVATE_FILES,
    STRATEGY_STATE_KEYS,
)
from dpfl.server.recorder import PRIVATE_DIAGNOSTICS_FILE
from dpfl.settings import RunSettings
from dpfl.task.checkpoint import load_checkpoint
from dpfl.task.files import load_tagged

SMALL = dict(model="cnn", model_width=2, num_clients=6, sample_rate=0.5, num_server_rounds=2, target_epsilon=0.0,
             noise_multiplier=1.0, max_epsilon=0.0)  # fmt: skip
MODES = {
    "local-dp": dict(local_dp=True, local_epochs=1),
    "adaptive-clipping": dict(clip_mode="adaptive", clip_count_noise=5.0, noise_multiplier=3.0),
    "min-replies-client-noise": dict(min_replies=1, reply_count_noise=5.0, noise_placement="client"),
    "deployment-round": dict(deploy=True, deploy_sweep_tiles="64", deploy_ratio=0.8),
    "bandmf-min-sep": dict(mechanism="bandmf", participation="min-sep", min_separation=2),
    "bandmf-cyclic": dict(mechanism="bandmf", participation="cyclic", min_separation=2),
    "tree-min-sep": dict(mechanism="tree", participation="min-sep", min_separation=2),
    "blt-cyclic": dict(mechanism="blt", participation="cyclic", min_separation=2),
    "secure-aggregation": dict(aggregation="secagg"),
}
# Anything that looks like a clock time or a date: a public log must not time the rounds.
TIMESTAMP = re.compile(r"\d{1,2}:\d{2}:\d{2}|\d{4}-\d{2}-\d{2}")
PER_CLIENT_MARKS = ("dpfl client", "sample-level", "ClientAppActor", "partition-")


def run(settings: RunSettings, engine: str = "in-process", node_configs=()) -> Path:
    Path(settings.out_dir).mkdir(parents=True)
    failure = run_simulation(settings, engine, 1, wait, node_configs)
    assert failure is None, failure
    return Path(settings.out_dir)


def wait(running) -> None:
    while running():
        time.sleep(0.2)


def check_public_files(out: Path, log_file: Path | None = None) -> None:
    """Every file of the run folder is declared, and every public one holds only what its entry allows."""
    declared = set(PUBLIC_FILES) | set(SERVER_PRIVATE_FILES) | set(NODE_PRIVATE_FOLDERS) | {AUDIT_FOLDER}
    assert {path.name for path in out.iterdir()} <= declared
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(set(row) <= PUBLIC_ROUND_KEYS for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) <= PUBLIC_SUMMARY_KEYS
    config = json.loads((out / "config.json").read_text())
    assert set(config) <= set(RunSettings().to_run_config()) | CONFIG_EXTRA_KEYS
    checkpoint = load_tagged(out / "checkpoint.pt", "dpfl-run-checkpoint-v1", "run checkpoint")
    assert set(checkpoint) <= CHECKPOINT_KEYS
    assert set(checkpoint["strategy_state"]) <= STRATEGY_STATE_KEYS
    assert checkpoint["rounds"] == rows  # the records inside are metrics.jsonl's
    assert set(checkpoint["strategy_state"]["mechanism"]) == {"clip-norm"}
    final = load_checkpoint(out / "final_model.pt")
    assert set(final.extra) <= FINAL_MODEL_EXTRA_KEYS and final.extra["summary"] == summary
    if (out / "privacy_ledger.json").exists():
        assert set(json.loads((out / "privacy_ledger.json").read_text())) <= {"accountant", "delta", "history", "refine"}
    log = (log_file or out / FLOWER_LOG).read_text()
    check_secret_noise_state(out)
    assert not TIMESTAMP.search(log), TIMESTAMP.search(log)
    assert not any(mark in log for mark in PER_CLIENT_MARKS)
    # Their times too: all that of config.json (the span between them grew with the realised sample).
    times = {(out / name).stat().st_mtime for name in PUBLIC_FILES if (out / name).exists()}
    assert times == {(out / "config.json").stat().st_mtime}
    # The plot's only data are the public records: drawn again from them, it is the same image.
    plot_curves(rows, out.parent / "again.png", f"{config['strategy']}, {config['model']} on {config['dataset']}: "
                f"{summary['outcome']}")  # fmt: skip
    assert (out.parent / "again.png").read_bytes() == (out / "curves.png").read_bytes()


def check_secret_noise_state(out: Path) -> None:
    """Correlated noise's secret state: server-private (0600), and its key in no public file, raw or hex."""
    path = out / PRIVATE_STATE_FILE
    if not path.exists():
        return
    assert path.stat().st_mode & 0o777 == 0o600
    key = json.loads(path.read_text())["master-key"]
    for name in PUBLIC_FILES:
        if (out / name).exists():
            content = (out / name).read_bytes()
            assert key.encode() not in content and bytes.fromhex(key) not in content, name


def normalised_log(out: Path) -> list[str]:
    """flower.log with every number replaced: what is left may not depend on the sample."""
    lines = (out / FLOWER_LOG).read_text().splitlines()
    return [re.sub(r"[-+]?\d[\d.e+-]*", "#", line.replace(str(out), "OUT")) for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_public_file_of_every_mode_holds_only_what_the_inventory_declares(tmp_path, mode):
    outs = [run(RunSettings(**{**SMALL, **MODES[mode]}, out_dir=str(tmp_path / f"run-{i}"))) for i in range(2)]
    for out in outs:
        check_public_files(out)
    # Two runs with independent secure samples write the same log, up to its numbers: no line
    # per sampled client or per reply, whatever the sample.
    sampled = [[row["sampled"] for row in map(json.loads, (out / PRIVATE_DIAGNOSTICS_FILE).read_text().splitlines())]
               for out in outs]  # fmt: skip
    assert normalised_log(outs[0]) == normalised_log(outs[1]), sampled
    if mode.split("-")[0] in ("bandmf", "tree", "blt"):
        assert all((out / PRIVATE_STATE_FILE).exists() for out in outs)
    if mode == "local-dp":  # the clients' own sample-level ε: in their private logs only
        node_logs = list((outs[0] / "nodes").glob("*/node_private_log.jsonl"))
        assert node_logs and any("sample-level-epsilon" in path.read_text() for path in node_logs)


@pytest.mark.slow
def test_the_flower_engine_publishes_no_per_client_line_and_no_timestamp(tmp_path):
    settings = RunSettings(**{**SMALL, **MODES["local-dp"], "noise_placement": "client"}, out_dir=str(tmp_path / "run"))
    # Half the simulated owners refuse to contribute (their own ε after one contribution is above 3):
    # their refusals, which state their participation, must not reach the public log.
    out = run(settings, engine="flower", node_configs=[{"policy-max-epsilon": 3.0}, {}])
    check_public_files(out)
    # What Ray forwarded from the simulated nodes went to their log, the rest of Flower's to the server's.
    assert "refuses" in (out / "server_private_flower.log").read_text()
    assert "refuses" not in (out / FLOWER_LOG).read_text() and "sample-level" not in (out / FLOWER_LOG).read_text()


@pytest.mark.slow
def test_an_audit_writes_only_declared_files(tmp_path):
    settings = RunSettings(**SMALL)
    run_audit(settings, AuditOptions(canaries=8), out=tmp_path / "audit")
    check_public_files(tmp_path / "audit" / "run", log_file=tmp_path / "audit" / FLOWER_LOG)


def test_the_inventory_declares_no_timing_and_no_count():
    forbidden = {"round-time", "wall-time", "sampled", "replied", "accepted", "dropped", "clients", "failed"}
    assert not (PUBLIC_ROUND_KEYS | PUBLIC_SUMMARY_KEYS | CONFIG_EXTRA_KEYS) & forbidden
    assert not set(PUBLIC_FILES) & set(SERVER_PRIVATE_FILES)
