"""An in-process simulation engine for the same ServerApp and ClientApp objects.

Flower's simulation runs the ClientApp in Ray actors behind a SuperLink, at a
fixed cost per round and per message; for sweeps (benchmarks, many seeds) that
cost dominates small models. ``InProcessGrid`` implements Flower's ``Grid`` by
handing each message straight to the ClientApp in this process, one node
``Context`` per simulated node (with its own persistent ``state``), so the
unchanged apps run on either engine.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1
RUN_ID = 1
# Error code of a ClientApp that raised, as Flower's own runtime reports it.
CLIENT_APP_RAISED_EXCEPTION = 0


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, node_contexts: Mapping[int, Context]) -> None:
        self.client_app = client_app
        self.node_contexts = dict(node_contexts)
        self._run = Run.create_empty(RUN_ID)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = str(uuid4())
            metadata = message.metadata
            metadata.__dict__.update(_message_id=message_id, _run_id=self._run.run_id, _src_node_id=SERVER_NODE_ID)
            metadata.created_at = time.time()
            try:
                reply = self.client_app(message, self.node_contexts[metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - a failing client is a reply with an error, as in Flower
                reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}"), reply_to=message)
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(message_id) for message_id in message_ids if message_id in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


@contextmanager
def flower_log_to(path: Path) -> Iterator[None]:
    """Send Flower's log to ``path`` instead of the terminal, as the Flower engine does."""
    flower_logger = logging.getLogger("flwr")
    saved = flower_logger.handlers[:], flower_logger.propagate
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    flower_logger.handlers, flower_logger.propagate = [handler], False
    try:
        yield
    finally:
        flower_logger.handlers, flower_logger.propagate = saved
        handler.close()


def node_contexts(run_config: Mapping[str, Any], num_nodes: int) -> dict[int, Context]:
    """One simulated node's ``Context`` per partition, as Flower's simulation gives them."""
    return {
        node_id: Context(
            run_id=RUN_ID,
            node_id=node_id,
            node_config={"partition-id": partition, "num-partitions": num_nodes},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for partition, node_id in enumerate(range(SERVER_NODE_ID + 1, SERVER_NODE_ID + 1 + num_nodes))
    }


def in_process_grid(client_app: ClientApp, run_config: Mapping[str, Any], num_nodes: int) -> InProcessGrid:
    """A grid of ``num_nodes`` in-process nodes running ``client_app``."""
    # Flower's runtimes set the identity of the task a process runs; messages read it.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = RUN_ID, RUN_ID, SERVER_NODE_ID
    return InProcessGrid(client_app, node_contexts(run_config, num_nodes))


def run_in_process(
    server_app: ServerApp, client_app: ClientApp, run_config: Mapping[str, Any], num_nodes: int
) -> None:
    """Run ``server_app`` against ``num_nodes`` in-process nodes, as ``flwr run`` would."""
    grid = in_process_grid(client_app, run_config, num_nodes)
    server_app(grid, Context(run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(), run_config=dict(run_config)))
