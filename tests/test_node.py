"""What belongs to a node alone: its own config (never the run config's), its private folder, its memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from dpfl.client.node import (
    SIMULATED_NODE_CONFIGS_ENV,
    SIMULATED_NODE_KEY,
    NodeMemory,
    node_dir,
    own_node_config,
    parse_node_config,
    simulated_node_configs_env,
    weights_digest,
)
from dpfl.errors import UsageError
from dpfl.privacy.node_policy import Participation
from dpfl.settings import RunSettings


def test_a_node_config_is_read_as_flower_reads_it_with_its_policy_checked():
    assert parse_node_config('policy-max-epsilon=8 share-accuracy=true node-dir="/n"') == {
        "policy-max-epsilon": 8, "share-accuracy": True, "node-dir": "/n"}
    for text, message in (("share-accuracy", "is not key=value pairs"),
                          ("policy-max-epsilon=true", "policy-max-epsilon=True must be a positive number"),
                          ("policy-max-eps=8", "unknown node config key 'policy-max-eps'")):  # fmt: skip
        with pytest.raises(UsageError, match=message) as err:
            parse_node_config(text)
        assert "\n" not in str(err.value)


def test_simulated_owners_configs_come_from_the_nodes_environment_round_robin(monkeypatch):
    monkeypatch.setenv(SIMULATED_NODE_CONFIGS_ENV, simulated_node_configs_env([{"share-nf": True}, {"node-dir": "/b"}]))
    assert own_node_config({"partition-id": 3, "num-partitions": 4}) == {
        "node-dir": "/b", SIMULATED_NODE_KEY: True, "partition-id": 3, "num-partitions": 4}
    # A real SuperNode (no partition) and the node's own keys are never overridden by them.
    assert own_node_config({"data-file": "/d"}) == {"data-file": "/d"}
    assert own_node_config({"partition-id": 0, "share-nf": False})["share-nf"] is False


def test_the_nodes_private_folder_is_its_own_and_the_run_config_cannot_move_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    context = Context(run_id=7, node_id=2, node_config={"partition-id": 2}, state=RecordDict(), run_config={})
    settings = RunSettings(out_dir=str(tmp_path / "runs" / "r1"))
    assert node_dir({"node-dir": "/reports"}, settings, context) == Path("/reports/r1")
    # The attack: an out-dir named ".." or "." sent the node's files out of its folder.
    for hostile in ("runs/..", ".", "/tmp/..", "x/.hidden/.."):
        assert node_dir({"node-dir": "/reports"}, RunSettings(out_dir=hostile), context) == Path("/reports/run-7")
    # A node with no folder of its own writes in its owner's home, never where the run config says.
    assert node_dir({}, settings, context) == tmp_path / "home" / ".dpfl" / "nodes" / "partition-2" / "r1"
    # A node dpfl's engine simulates belongs to the simulation's user: the run's folder.
    assert node_dir({SIMULATED_NODE_KEY: True}, settings, context) == tmp_path / "runs" / "r1" / "nodes" / "partition-2"


def test_the_weights_digest_sees_every_byte_name_and_shape():
    weights = {"a": torch.zeros(3), "b": torch.tensor(1.0)}
    digest = weights_digest(weights)
    assert digest == weights_digest({"b": torch.tensor(1.0), "a": torch.zeros(3)})
    assert digest != weights_digest({"a": torch.zeros(3), "b": torch.tensor(1.0 + 1e-7)})
    assert digest != weights_digest({"a": torch.zeros(1, 3), "b": torch.tensor(1.0)})
    assert digest != weights_digest({"c": torch.zeros(3), "b": torch.tensor(1.0)})


def test_the_nodes_memory_survives_in_its_state_and_nowhere_else():
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    memory = NodeMemory(context)
    assert memory.participation == Participation() and memory.last_weights == ""
    memory.participation, memory.last_weights = Participation(5, 2), "abc"
    memory.save()
    again = NodeMemory(context)
    assert (again.participation, again.last_weights) == (Participation(5, 2), "abc")
    assert json.dumps(dict(context.state["dpfl-node"]))  # plain values only
