"""An in-process simulation engine for the same ServerApp and ClientApp objects.

Flower's simulation runs the ClientApp in Ray actors behind a SuperLink, at a
fixed cost per round and per message; for sweeps (benchmarks, many seeds) that
cost dominates small models. ``InProcessGrid`` implements Flower's ``Grid`` by
handing each message straight to the ClientApp, one node ``Context`` per
simulated node (with its own persistent ``state``), so the unchanged apps run on
either engine. Records travel as Python objects, never as bytes
(:mod:`dpfl.records`).

With ``workers`` > 1 the messages of a round are split into that many contiguous
shares, each run by one worker process (forked from this one, so it starts with
the ClientApp and the data already loaded, with one torch thread). A message's
node context goes with it and its updated ``state`` comes back, so a node's state
does not depend on which worker served it; replies are returned in the order the
messages were pushed. Since every client's computation depends only on its
message and its node (dpfl's ClientApp seeds its local randomness from the run's
seed, round and partition), a run's result does not depend on ``workers``.

A ``cohort`` handler (dpfl's is ``dpfl.client.app.train_cohort``) takes all the train
messages a process holds at once, so that their local training can run as one
vectorised computation; without one, each message goes through the ClientApp alone.
Workers that use CUDA are spawned rather than forked (a CUDA context does not survive
a fork), each with its own GPU, round robin.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any
from uuid import uuid4

import torch
from threadpoolctl import threadpool_limits

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from dpfl.client.node import SIMULATED_NODE_KEY
from dpfl.server.public_records import is_public_log_line

SERVER_NODE_ID = 1
RUN_ID = 1
# Error code of a ClientApp that raised, as Flower's own runtime reports it.
CLIENT_APP_RAISED_EXCEPTION = 0


class RunStopped(Exception):
    """The run was asked to stop (Ctrl-C, SIGTERM) and ends before its next client."""


# Replies to several (message, node context) deliveries at once, or the exception each raised.
CohortHandler = Callable[[Sequence[tuple[Message, Context]]], list[Message | Exception]]


class InProcessGrid(Grid):
    def __init__(
        self,
        client_app: ClientApp,
        node_contexts: Mapping[int, Context],
        workers: ClientWorkers | None = None,
        stop: threading.Event | None = None,
        cohort: CohortHandler | None = None,
    ) -> None:
        self.client_app = client_app
        self.node_contexts = dict(node_contexts)
        self.workers = workers
        self.cohort = cohort
        # Set by another thread to end the run before its next client (or round, with workers).
        self.stop = stop
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
        messages = list(messages)
        for message in messages:
            metadata = message.metadata
            metadata.__dict__.update(_message_id=str(uuid4()), _run_id=self._run.run_id, _src_node_id=SERVER_NODE_ID)
            metadata.created_at = time.time()
        deliveries = [(message, self.node_contexts[message.metadata.dst_node_id]) for message in messages]
        if self.workers is None or len(deliveries) < 2:
            replies = deliver(self.client_app, self.cohort, deliveries, self._stop_if_asked)
        else:
            self._stop_if_asked()
            replies = []
            for (message, context), (reply, state) in zip(deliveries, self.workers.run(deliveries)):
                context.state = state
                replies.append(reply)
        ids = [message.metadata.message_id for message in messages]
        self._replies.update(zip(ids, replies))
        return ids

    def _stop_if_asked(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise RunStopped("the run was stopped")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(message_id) for message_id in message_ids if message_id in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


@contextmanager
def flower_log_to(path: Path, private_path: Path | None = None) -> Iterator[None]:
    """Send Flower's log to ``path`` instead of the terminal, as the Flower engine does.

    Only the ServerApp's own lines (:func:`dpfl.server.public_records.is_public_log_line`)
    and without timestamps: the log is public, and the time between two rounds' lines grows
    with the number of clients that trained in between (a private count). Every other line
    goes to ``private_path`` (the server's), with its time, or nowhere."""
    flower_logger = logging.getLogger("flwr")
    saved = flower_logger.handlers[:], flower_logger.propagate
    public = logging.FileHandler(path)
    public.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    public.addFilter(lambda record: is_public_log_line(record.getMessage()))
    handlers = [public]
    if private_path is not None:
        private = logging.FileHandler(private_path)
        private.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        private.addFilter(lambda record: not is_public_log_line(record.getMessage()))
        handlers.append(private)
    flower_logger.handlers, flower_logger.propagate = handlers, False
    try:
        yield
    finally:
        flower_logger.handlers, flower_logger.propagate = saved
        for handler in handlers:
            handler.close()


def node_contexts(
    run_config: Mapping[str, Any], num_nodes: int, node_configs: Sequence[Mapping[str, Any]] = ()
) -> dict[int, Context]:
    """One simulated node's ``Context`` per partition, as Flower's simulation gives them, with
    the simulated data owners' ``node_configs`` (round robin by partition) in its node config."""
    return {
        node_id: Context(
            run_id=RUN_ID,
            node_id=node_id,
            node_config={**(node_configs[partition % len(node_configs)] if node_configs else {}),
                         SIMULATED_NODE_KEY: True, "partition-id": partition, "num-partitions": num_nodes},  # fmt: skip
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for partition, node_id in enumerate(range(SERVER_NODE_ID + 1, SERVER_NODE_ID + 1 + num_nodes))
    }


def handle(client_app: ClientApp, message: Message, context: Context) -> Message:
    """The ClientApp's reply to ``message``; a ClientApp that raises replies with an error, as in Flower."""
    try:
        return client_app(message, context)
    except Exception as err:  # noqa: BLE001 - a failing client is a reply with an error
        return error_reply(message, err)


def error_reply(message: Message, err: Exception) -> Message:
    return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}"), reply_to=message)


def deliver(
    client_app: ClientApp,
    cohort: CohortHandler | None,
    deliveries: Sequence[tuple[Message, Context]],
    before_client: Callable[[], None] = lambda: None,
) -> list[Message]:
    """The replies to ``deliveries``: the train messages through ``cohort`` together (when
    there is one and they are several), anything else through the ClientApp one by one.
    ``before_client`` runs before each client (or the cohort), to stop a run between them."""
    train = [i for i, (message, _) in enumerate(deliveries) if message.metadata.message_type == MessageType.TRAIN]
    replies: dict[int, Message] = {}
    if cohort is not None and len(train) > 1:
        before_client()
        outcomes = cohort([deliveries[i] for i in train])
        for i, outcome in zip(train, outcomes, strict=True):
            message = deliveries[i][0]
            replies[i] = error_reply(message, outcome) if isinstance(outcome, Exception) else outcome
    for i, (message, context) in enumerate(deliveries):
        if i not in replies:
            before_client()
            replies[i] = handle(client_app, message, context)
    return [replies[i] for i in range(len(deliveries))]


class ClientWorkers:
    """Worker processes that run shares of a round's messages through the ClientApp.

    Forked rather than spawned where no GPU is used: a worker inherits the loaded
    ClientApp (whatever module defines it), the imported libraries and the cached data
    set at no cost, where a spawned one would import them again for seconds. Each
    worker takes one torch thread: the parallelism is over clients (or its cohort). With
    ``gpus``, workers are spawned (CUDA cannot be used in a process forked after it was
    initialised) and each makes one of them its current CUDA device, round robin;
    ``start_method`` overrides the choice.
    """

    def __init__(
        self,
        client_app: ClientApp,
        workers: int,
        cohort: CohortHandler | None = None,
        gpus: Sequence[int] = (),
        start_method: str | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        context = multiprocessing.get_context(start_method or ("spawn" if gpus else "fork"))
        self._pool = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start_worker,
            initargs=(client_app, cohort, tuple(gpus), context.Value("i", 0)),
        )  # fmt: skip

    def run(self, deliveries: Sequence[tuple[Message, Context]]) -> list[tuple[Message, RecordDict]]:
        """(reply, the node's new state) for each (message, node context), in order."""
        size, extra = divmod(len(deliveries), self.workers)
        shares, start = [], 0
        for worker in range(self.workers):
            end = start + size + (worker < extra)
            if end > start:
                shares.append(deliveries[start:end])
            start = end
        return [result for share in self._pool.map(_run_share, shares) for result in share]

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


# The ClientApp of this worker process and its cohort handler, set once when the worker starts.
_worker_app: ClientApp | None = None
_worker_cohort: CohortHandler | None = None


def _start_worker(client_app: ClientApp, cohort: CohortHandler | None, gpus: tuple[int, ...], started) -> None:
    # Flower's log handlers come with the fork: a worker logs where this process does.
    global _worker_app, _worker_cohort
    _worker_app, _worker_cohort = client_app, cohort
    if gpus:
        with started.get_lock():  # the workers' start order deals out the GPUs
            index, started.value = started.value, started.value + 1
        torch.cuda.set_device(gpus[index % len(gpus)])
    # One thread per worker, for torch and for BLAS alike: the workers already fill the
    # cores, and OpenBLAS's spinning threads in several forked workers (scipy's LAPACK
    # in the CIM solver) starve each other to a near-standstill.
    torch.set_num_threads(1)
    threadpool_limits(limits=1)
    # Ctrl-C reaches the whole process group: the parent stops the run, its workers
    # finish their share and exit with it, without a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_share(share: Sequence[tuple[Message, Context]]) -> list[tuple[Message, RecordDict]]:
    assert _worker_app is not None, "worker not started"
    return [(reply, context.state) for reply, (_, context) in zip(deliver(_worker_app, _worker_cohort, share), share)]


def in_process_grid(
    client_app: ClientApp,
    run_config: Mapping[str, Any],
    num_nodes: int,
    workers: ClientWorkers | None = None,
    stop: threading.Event | None = None,
    node_configs: Sequence[Mapping[str, Any]] = (),
    cohort: CohortHandler | None = None,
) -> InProcessGrid:
    """A grid of ``num_nodes`` in-process nodes running ``client_app`` (in ``workers``, if given)."""
    # Flower's runtimes set the identity of the task a process runs; messages read it.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = RUN_ID, RUN_ID, SERVER_NODE_ID
    return InProcessGrid(client_app, node_contexts(run_config, num_nodes, node_configs), workers, stop, cohort)


def run_in_process(
    server_app: ServerApp,
    client_app: ClientApp,
    run_config: Mapping[str, Any],
    num_nodes: int,
    workers: int = 1,
    stop: threading.Event | None = None,
    node_configs: Sequence[Mapping[str, Any]] = (),
    cohort: CohortHandler | None = None,
    gpus: Sequence[int] = (),
) -> None:
    """Run ``server_app`` against ``num_nodes`` in-process nodes, as ``flwr run`` would;
    ``workers`` > 1 runs each round's clients in that many worker processes (spawned, one
    per GPU of ``gpus`` in turn, when there are any), and ``cohort`` hands each process's
    train messages over together. Setting ``stop`` (from another thread) ends the run
    with :class:`RunStopped`. ``node_configs``: the simulated data owners' own node
    configs (round robin by partition)."""
    pool = ClientWorkers(client_app, workers, cohort, gpus) if workers > 1 else None
    try:
        grid = in_process_grid(client_app, run_config, num_nodes, pool, stop, node_configs, cohort)
        server_context = Context(run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                                 run_config=dict(run_config))  # fmt: skip
        server_app(grid, server_context)
    finally:
        if pool is not None:
            pool.close()
