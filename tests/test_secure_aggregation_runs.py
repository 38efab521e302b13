"""Runs with ``aggregation=secagg``: the four exchanges inside every round, on both engines.

What the server learns is the sum (the protocol's own tests show one masked input is
uniform and the server's view depends on the inputs only through their sum:
tests/test_secagg.py); here, through the real ServerApp and ClientApp: a round releases
the decoded sum of every surviving node, nodes that drop out at any exchange are
survived while at least t remain, a round with fewer releases nothing and is still
accounted, each node logs its own ε privately, and ε is the Skellam accountant's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from flwr.app import Context, Message

from dpfl.client.app import app as client_app
from dpfl.engines.simulation import run_in_process_following, run_simulation
from dpfl.privacy.distributed_dp import DistributedDPParams, epsilon
from dpfl.server.recorder import PRIVATE_DIAGNOSTICS_FILE
from dpfl.settings import RunSettings
from dpfl.strategies.secure_aggregation import SECAGG_KEY

# 6 nodes, t = 4 (the default ceil(2n/3)), complete graph; 3 rounds of a small CNN.
SMALL = dict(model="cnn", model_width=2, num_clients=6, sample_rate=0.5, num_server_rounds=3, target_epsilon=0.0,
             noise_multiplier=1.5, max_epsilon=0.0, aggregation="secagg", pretraining="none")  # fmt: skip


def wait(running) -> None:
    while running():
        time.sleep(0.1)


def rows(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines() if line.strip()]


class DroppingClientApp:
    """dpfl's ClientApp, except that the nodes in ``drop[message type]`` fail that message (a
    SuperNode that dies at that exchange) in the rounds listed in ``rounds``."""

    def __init__(self, drop: dict[str, set[int]], rounds: set[int]) -> None:
        self.drop, self.rounds = drop, rounds

    def __call__(self, message: Message, context: Context) -> Message:
        kind = message.metadata.message_type
        server_round = int(message.content.config_records[SECAGG_KEY]["round"])
        if server_round in self.rounds and context.node_id in self.drop.get(kind, set()):
            raise ConnectionError(f"node {context.node_id} is gone")
        return client_app(message, context)


def run_dropping(tmp_path: Path, drop: dict[str, set[int]], rounds: set[int]) -> Path:
    settings = RunSettings(**SMALL, out_dir=str(tmp_path / "run"))
    failure = run_in_process_following(settings, wait, client=DroppingClientApp(drop, rounds))
    assert failure is None, failure
    return Path(settings.out_dir)


def test_a_secure_run_releases_every_nodes_sum_and_spends_the_skellam_accountants_epsilon(tmp_path):
    settings = RunSettings(**SMALL, out_dir=str(tmp_path / "run"))
    assert run_simulation(settings, "in-process", 1, wait) is None
    out = Path(settings.out_dir)
    diagnostics = rows(out, PRIVATE_DIAGNOSTICS_FILE)
    # Every node (sampled or not) sent a masked input and all six were summed.
    assert [row["secagg-survivors"] for row in diagnostics] == [6, 6, 6]
    assert all(row["secagg-failed-stage"] is None for row in diagnostics)
    metrics = rows(out, "metrics.jsonl")
    assert [row["update-skipped"] for row in metrics[1:]] == [0.0, 0.0, 0.0]
    summary = json.loads((out / "summary.json").read_text())
    # ε is the distributed Skellam mechanism's at sigma = 1.5, q = 0.5, 3 rounds, for the model's d values.
    params = DistributedDPParams(clip_norm=settings.clip_norm, noise_multiplier=1.5, size=update_size_of(out),
                                 threshold=4, max_inputs=6)  # fmt: skip
    assert metrics[-1]["epsilon"] == pytest.approx(epsilon(params, [(0.5, 3)], settings.delta)[0], rel=1e-9)
    assert summary["outcome"] == "completed"
    assert json.loads((out / "config.json").read_text())["aggregation"] == "secagg"
    # Each node's own epsilon, from its own contributions without amplification: in its private log only.
    logs = [rows(path.parent, path.name) for path in (out / "nodes").glob("*/node_private_log.jsonl")]
    assert len(logs) == 6 and all("epsilon-own-contributions" in log[-1] for log in logs)


def test_local_dp_inside_each_node_composes_with_secure_aggregation(tmp_path):
    """local-dp (DP-SGD within each node) beside secure aggregation: the client-level ε is still the
    Skellam mechanism's (DP-SGD only changes what each node clips), every node's input is summed,
    and each round reports the sample-level ε of a nominal node, growing as it trains."""
    settings = RunSettings(**SMALL, local_dp=True, out_dir=str(tmp_path / "run"))
    assert run_simulation(settings, "in-process", 1, wait) is None
    out = Path(settings.out_dir)
    assert [row["secagg-survivors"] for row in rows(out, PRIVATE_DIAGNOSTICS_FILE)] == [6, 6, 6]
    metrics = rows(out, "metrics.jsonl")
    params = DistributedDPParams(clip_norm=settings.clip_norm, noise_multiplier=1.5, size=update_size_of(out),
                                 threshold=4, max_inputs=6)  # fmt: skip
    assert metrics[-1]["epsilon"] == pytest.approx(epsilon(params, [(0.5, 3)], settings.delta)[0], rel=1e-9)
    local = [row["local-epsilon-nominal"] for row in metrics]
    assert local[0] == 0 < local[1] < local[2] < local[3]


def update_size_of(out: Path) -> int:
    from dpfl.task.checkpoint import load_checkpoint

    return sum(tensor.numel() for tensor in load_checkpoint(out / "final_model.pt").state_dict.values())


@pytest.mark.parametrize("stage", ["query.secagg_advertise", "query.secagg_share", "train", "query.secagg_unmask"])
def test_a_node_that_drops_out_at_any_exchange_is_survived(tmp_path, stage):
    out = run_dropping(tmp_path, {stage: {2, 3}}, rounds={2})  # nodes 2 and 3 die in round 2: 4 = t are left
    diagnostics = rows(out, PRIVATE_DIAGNOSTICS_FILE)
    # Dropping before the masked input leaves 4 inputs; after it, 6 inputs are still unmasked.
    assert diagnostics[1]["secagg-survivors"] == (6 if stage == "query.secagg_unmask" else 4)
    assert diagnostics[1]["secagg-failed-stage"] is None
    assert rows(out, "metrics.jsonl")[2]["update-skipped"] == 0.0


def test_a_round_with_fewer_than_t_inputs_releases_nothing_and_is_still_accounted(tmp_path):
    out = run_dropping(tmp_path, {"train": {2, 3, 4}}, rounds={2})  # 3 masked inputs, t = 4
    diagnostics = rows(out, PRIVATE_DIAGNOSTICS_FILE)
    assert diagnostics[1]["secagg-survivors"] == 0 and diagnostics[1]["secagg-failed-stage"] == "masked input"
    metrics = rows(out, "metrics.jsonl")
    assert [row["update-skipped"] for row in metrics[1:]] == [0.0, 1.0, 0.0]
    assert metrics[1]["epsilon"] < metrics[2]["epsilon"] < metrics[3]["epsilon"]  # round 2 spent all the same
    # The skipped round kept the model: its weights are round 1's (the accuracy is unchanged).
    assert metrics[2]["accuracy"] == metrics[1]["accuracy"]


@pytest.mark.slow
def test_flowers_engine_runs_secure_aggregation(tmp_path):
    settings = RunSettings(**{**SMALL, "num_server_rounds": 2}, out_dir=str(tmp_path / "run"))
    Path(settings.out_dir).mkdir(parents=True)
    assert run_simulation(settings, "flower", 1, wait) is None
    out = Path(settings.out_dir)
    assert [row["secagg-survivors"] for row in rows(out, PRIVATE_DIAGNOSTICS_FILE)] == [6, 6]
    assert json.loads((out / "summary.json").read_text())["outcome"] == "completed"
