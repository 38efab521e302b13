"""The server's side of the deployment round: whom to ask, what to accept back, and
the table over devices (``deployment.json`` and its printed form).

Flower-free: the ServerApp sends the messages and hands the replies' summaries here.
A reply holding anything but the allowed summary keys (:data:`SUMMARY_KEYS`) is refused
and shown as failed, so no client statistic beyond what nodes may share is recorded.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpfl.cim.names import MAPPINGS
from dpfl.deployment.node import CORRECTED, DEVICE_NAME_KEY, FAILED, REASON_KEY, STATUS_KEY, SUMMARY_KEYS
from dpfl.task.files import write_atomically

DEPLOYMENT_FILE = "deployment.json"
NODE_KEY = "node"
# Shown in the table when a node shares them; device parameters live in deployment.json.
TABLE_COLUMNS = (
    ("node", NODE_KEY), ("device", DEVICE_NAME_KEY), ("tile", "device-tile-size"), ("weight bits", "device-weight-bits"),
    ("bits/cell", "device-bits-per-cell"), ("R_on", "device-r-on"), ("R_off", "device-r-off"),
    ("r_wire", "device-r-wordline"), ("mapping", "device-mapping"), *((f"NF {mapping}", f"nf-{mapping}") for mapping in MAPPINGS),
    ("acc. analog / bias corr.", None), ("status", STATUS_KEY),
)  # fmt: skip
# Characters the table needs to show every column unabridged.
TABLE_WIDTH = 220
NOT_COVERED = (
    "deployment summaries are what each node chose to share, outside the training's epsilon: its device and "
    "compression settings always; NF and local accuracies, statistics of its own data, only from nodes that "
    "opted in (share-nf, share-accuracy)"
)


def choose_nodes(node_ids: Sequence[int], count: int, seed: int) -> list[int]:
    """Every node (``count`` 0) or ``count`` of them at random."""
    nodes = sorted(node_ids)
    if count == 0 or count >= len(nodes):
        return nodes
    return sorted(random.Random(seed).sample(nodes, count))


def screen_summary(node_id: int, summary: dict[str, Any]) -> dict[str, Any]:
    """A node's row, or a failed row if the reply holds keys a node may not share."""
    extra = sorted(set(summary) - SUMMARY_KEYS)
    if extra:
        return {NODE_KEY: node_id, STATUS_KEY: FAILED, REASON_KEY: f"reply refused: it holds keys not allowed ({', '.join(extra)})"}
    return {NODE_KEY: node_id, **summary}


def error_row(node_id: int, reason: str) -> dict[str, Any]:
    lines = str(reason).strip().splitlines()
    return {NODE_KEY: node_id, STATUS_KEY: FAILED, REASON_KEY: lines[-1] if lines else "failed"}


def write_deployment(out_dir: Path, rows: list[dict[str, Any]], seconds: float) -> Path:
    path = Path(out_dir) / DEPLOYMENT_FILE
    payload = {"wall-time": seconds, "note": NOT_COVERED, "nodes": sorted(rows, key=lambda row: row[NODE_KEY])}
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))
    return path


def _cell(row: dict[str, Any], key: str | None) -> str:
    if key is None:  # the deployed mapping's analog accuracy without and with weight bias correction, if shared
        prefix = f"accuracy-analog-{row.get('device-mapping', '')}"
        values = row.get(prefix), row.get(prefix + CORRECTED)
        return "not shared" if None in values else " / ".join(f"{value:.2%}" for value in values)
    value = row.get(key)
    if key == STATUS_KEY and value == FAILED:
        return f"failed: {row.get(REASON_KEY, '')}"
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if key.startswith("nf") else f"{value:g}"
    return str(value)


def deployment_table(payload: dict[str, Any]):
    """A rich Table over the nodes of a ``deployment.json`` payload."""
    from rich.table import Table

    table = Table(title=f"Deployment round: {len(payload['nodes'])} node(s), {payload['wall-time']:.1f} s")
    for label, _ in TABLE_COLUMNS:
        table.add_column(label, justify="left" if label in ("device", "mapping", "status") else "right")
    for row in payload["nodes"]:
        table.add_row(*(_cell(row, key) for _, key in TABLE_COLUMNS))
    return table
