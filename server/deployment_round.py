"""The ServerApp's deployment round: the final model to the chosen nodes, first in a
train message that asks for no update (a node deploys only the weights of its last train
message, which its policy checked), then in a Flower query message; their summaries are
screened and tabulated by :mod:`dpfl.deployment.federation`."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from dpfl.deployment.federation import choose_nodes, error_row, screen_summary, write_deployment
from dpfl.deployment.node import DEPLOYMENT_KEY
from dpfl.settings import RunSettings
from dpfl.strategies.base import ARRAYS_KEY, ClientLevelDPStrategy

# Compression and CIM simulation on a node take minutes for large models.
DEPLOY_TIMEOUT_S = 3600.0


def _row(node_id: int, reply: Message) -> dict:
    if reply.has_error():
        return error_row(node_id, reply.error.reason)
    content = reply.content
    if list(content.keys()) != [DEPLOYMENT_KEY] or DEPLOYMENT_KEY not in content.config_records:
        return error_row(node_id, f"reply refused: it holds records {sorted(content.keys())}, not only {DEPLOYMENT_KEY!r}")
    return screen_summary(node_id, dict(content.config_records[DEPLOYMENT_KEY]))


def run_deployment_round(
    grid: Grid, settings: RunSettings, strategy: ClientLevelDPStrategy, arrays: ArrayRecord, out_dir: Path
) -> Path:
    """Ask the nodes to deploy ``arrays``; write ``deployment.json`` into ``out_dir``."""
    started = time.perf_counter()
    nodes = choose_nodes(list(grid.get_node_ids()), settings.deploy_clients, settings.seed)
    log(INFO, "dpfl: deployment round on %d node(s)", len(nodes))
    # Their replies (a noise share under client placement, else zeros) are not used.
    grid.send_and_receive(strategy.final_model_messages(arrays, nodes), timeout=settings.round_timeout)
    messages = [
        Message(RecordDict({ARRAYS_KEY: arrays}), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes
    ]
    rows = {}
    for reply in grid.send_and_receive(messages, timeout=DEPLOY_TIMEOUT_S):
        node = reply.metadata.src_node_id
        rows[node] = _row(node, reply)
    for node in nodes:
        rows.setdefault(node, error_row(node, f"no reply in {DEPLOY_TIMEOUT_S:g} s"))
    path = write_deployment(out_dir, list(rows.values()), time.perf_counter() - started)
    # The table holds what nodes shared with the server: not for Flower's public log.
    log(INFO, "dpfl: wrote %s", path)
    return path
