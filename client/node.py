"""What belongs to a node alone: its own config, its private folder and log, and what it
remembers of a run (how often it contributed, the weights it was last sent).

A node's config is the SuperNode's ``--node-config``. A simulated node has none of its
own beyond its partition, so the engine that simulates it hands it the simulated data
owner's keys (``dpfl simulate --node-config``, in the syntax of ``flower-supernode
--node-config``): the in-process engine puts them in the node's ``Context``, Flower's
simulation (whose nodes get only their partition) through the
``DPFL_SIMULATED_NODE_CONFIGS`` variable (JSON) of the node processes' environment,
which belongs to whoever runs the nodes, never to the run config.

The node's private folder holds what no other party may see: its log of per-client
facts (its own ε, its participation count, its sample-level ε under local DP) and its
deployment reports. It is the node's ``node-dir`` (in docker, a volume of the node's
own), a subfolder per run named safely (the run folder's name when it is a plain name,
else the run id: a run config cannot send the node's files elsewhere); a node without
one uses ``~/.dpfl/nodes/<node>/<run>``, and a node that dpfl's engines simulate, whose
owner is the simulation's user, ``<out-dir>/nodes/<node>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import torch
from flwr.app import ConfigRecord, Context
from flwr.common.config import parse_config_args

from dpfl.errors import UsageError
from dpfl.privacy.node_policy import NodePrivacyPolicy, Participation
from dpfl.settings import RunSettings

SIMULATED_NODE_CONFIGS_ENV = "DPFL_SIMULATED_NODE_CONFIGS"
NODE_DIR_KEY = "node-dir"
# Set by dpfl's engines on the nodes they simulate (never by a run config).
SIMULATED_NODE_KEY = "dpfl-simulated-node"
SAFE_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NODE_LOG_FILE = "node_private_log.jsonl"
# The node's memory of the run, in its persistent state (never sent anywhere).
STATE_KEY = "dpfl-node"


def parse_node_config(text: str) -> dict[str, Any]:
    """A node config as ``flower-supernode --node-config`` reads it (``key=1 key=true key="text"``),
    its privacy policy checked; a one-line UsageError otherwise."""
    try:
        config = parse_config_args([text])
    except click.ClickException:
        config = {}
    if text.strip() and not config:  # Flower reads a lone word as nothing at all
        raise UsageError(f"node config {text!r} is not key=value pairs (numbers, true/false, or \"text\" in "
                         "double quotes)")  # fmt: skip
    NodePrivacyPolicy.from_node_config(config)
    return config


def simulated_node_configs_env(node_configs: list[Mapping[str, Any]]) -> str:
    """How Flower's simulation hands the simulated data owners' configs to the node processes."""
    return json.dumps([dict(config) for config in node_configs])


def own_node_config(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The node's config: a simulated node's data-owner keys (round robin by partition) under its own."""
    if SIMULATED_NODE_CONFIGS_ENV not in os.environ or "partition-id" not in node_config:
        return dict(node_config)
    simulated = json.loads(os.environ[SIMULATED_NODE_CONFIGS_ENV] or "[]")
    base = simulated[int(node_config["partition-id"]) % len(simulated)] if simulated else {}
    return {**base, SIMULATED_NODE_KEY: True, **node_config}


def node_label(context: Context) -> str:
    config = context.node_config
    return f"partition-{config['partition-id']}" if "partition-id" in config else f"node-{context.node_id}"


def node_dir(node_config: Mapping[str, Any], settings: RunSettings, context: Context) -> Path:
    """The node's private folder for this run."""
    label = node_label(context)
    if node_config.get(SIMULATED_NODE_KEY) and not node_config.get(NODE_DIR_KEY):
        return Path(settings.out_dir) / "nodes" / label
    name = Path(settings.out_dir).name
    run = name if SAFE_RUN_NAME.fullmatch(name) and name.strip(".") else f"run-{context.run_id}"
    if node_config.get(NODE_DIR_KEY):
        return Path(str(node_config[NODE_DIR_KEY])) / run
    return Path.home() / ".dpfl" / "nodes" / label / run


def log_privately(folder: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line to the node's private log (never Flower's log, which the server publishes)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / NODE_LOG_FILE).open("a") as log:
        log.write(json.dumps(dict(record)) + "\n")


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes), to recognise weights sent again."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class NodeMemory:
    """The node's own record of a run in its persistent ``context.state``."""

    def __init__(self, context: Context) -> None:
        self._state = context.state
        saved = dict(self._state[STATE_KEY]) if STATE_KEY in self._state else {}
        self.participation = Participation(int(saved.get("rounds", 0)), int(saved.get("contributions", 0)),
                                           int(saved.get("repeats", 0)))  # fmt: skip
        # The weights of the last train message, which a deployment query must match.
        self.last_weights = str(saved.get("last-weights", ""))
        # Whether the node has answered a deployment query in this run (it answers one).
        self.deployed = bool(saved.get("deployed", False))

    def save(self) -> None:
        self._state[STATE_KEY] = ConfigRecord({
            "rounds": self.participation.rounds, "contributions": self.participation.contributions,
            "repeats": self.participation.repeats, "last-weights": self.last_weights, "deployed": self.deployed,
        })  # fmt: skip
