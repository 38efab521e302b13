"""A configured run on either engine: its checks before start, resuming, and running it.

``dpfl simulate`` and ``dpfl audit`` call these and only print; what a run needs
before its first round (the strategy's smoke test, the data set and its partition,
an ``init-from`` checkpoint) fails here, in one line, rather than inside every
simulated node.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from dpfl.client.app import app as client_app, train_cohort
from dpfl.engines.inprocess import CohortHandler, flower_log_to, run_in_process
from dpfl.engines.local_federation import FederationError, simulation
from dpfl.errors import UsageError
from dpfl.flat import Layout
from dpfl.plugins import smoke_test_strategy
from dpfl.privacy.mechanism import MechanismParams
from dpfl.progress import Progress, no_progress
from dpfl.server.app import app as server_app, resolve_noise_multiplier
from dpfl.server.checkpoint import (
    budget_change_warning,
    check_resumable,
    correlated_resume_state,
    load_initial_state,
    load_run_checkpoint,
)
from dpfl.server.public_records import pin_public_times
from dpfl.server.recorder import lock_run_dir
from dpfl.settings import RunSettings
from dpfl.strategies import get_strategy_class
from dpfl.strategies.base import not_valid_reasons
from dpfl.task.checkpoint import ModelSpec
from dpfl.task.data import cached_dataset, load_dataset
from dpfl.task.devices import cuda_devices, device_name
from dpfl.task.partition import partition_indices
from dpfl.task.pretraining import GENERATORS, pretrained_weights

FLOWER_LOG = "flower.log"
# Every line of Flower's log that is not the ServerApp's own (the server operator's), and what
# the simulated nodes' processes print under Flower's engine (per-client lines, the nodes' own).
SERVER_LOG = "server_private_flower.log"
NODES_LOG = "nodes/simulated_nodes.log"
# Lines of the Flower log shown when `flwr run` fails.
LOG_TAIL_LINES = 15
# How often a follower looks for new rounds in a run's metrics.jsonl, in seconds.
FOLLOW_INTERVAL = 0.5
Follow = Callable[[Callable[[], bool]], None]


def resumed_settings(run_dir: Path, changes: Mapping[str, Any]) -> RunSettings:
    """The settings of the run in ``run_dir`` with ``changes`` applied, checked against its checkpoint."""
    checkpoint = load_run_checkpoint(run_dir)
    saved = RunSettings.from_run_config(checkpoint.run_config)
    settings = dataclasses.replace(saved, **changes, resume_from=str(run_dir), out_dir=str(run_dir))
    settings.validate()
    check_resumable(checkpoint, settings.to_run_config(), run_dir)
    correlated_resume_state(run_dir, checkpoint.round, settings.participation_schema(),
                            checkpoint.run_config["num-server-rounds"])  # fmt: skip
    lock_run_dir(run_dir).close()  # refused now, in one line, if another process writes it
    return settings


def prepare_run(settings: RunSettings, download: bool = False, progress: Progress = no_progress) -> None:
    """Everything a run needs before its first round, checked (and the data set cached), and
    the public pretraining its model starts from computed into the cache, with ``progress``."""
    initial = None
    device_name(settings.device)  # a device that is not here is refused now, in one line
    if settings.init_from and not settings.resume_from:
        initial = load_initial_state(settings.init_from, settings.init_new_data)
    smoke_test_strategy(get_strategy_class(settings.strategy), settings, settings.strategy)
    if download:
        load_dataset(settings.dataset, settings.data_dir, settings.image_size, download=True)
    data = cached_dataset(settings.dataset, settings.data_dir, settings.image_size)
    partition_indices(data.train_labels, settings.num_clients, settings.partition, settings.dirichlet_alpha, settings.seed)
    spec = ModelSpec.for_data(settings.model, settings.model_width, data, settings.model_depth)
    if not settings.resume_from:  # the ServerApp calibrates σ the same way: an unreachable target is refused now
        size = Layout(spec.build().state_dict()).size if settings.aggregation == "secagg" else 0
        resolve_noise_multiplier(settings, initial.history if initial else (), size)
    if settings.pretraining in GENERATORS and not (settings.resume_from or settings.init_from):
        # The ServerApp reads the cache (in whatever process it runs), so it starts at once.
        pretrained_weights(spec, settings.pretraining, progress=progress)


def run_warnings(settings: RunSettings) -> list[str]:
    """Why this run's epsilon is not a guarantee, a delta too large for its clients, and a resume
    that lifts or raises the run's budget."""
    budget = (budget_change_warning(load_run_checkpoint(settings.resume_from).run_config, settings.to_run_config())
              if settings.resume_from else None)  # fmt: skip
    params = MechanismParams(
        noise_multiplier=settings.noise_multiplier, clip_norm=settings.clip_norm, sample_rate=settings.sample_rate,
        num_clients=settings.num_clients, delta=settings.delta, clipping=settings.clipping,
        private=get_strategy_class(settings.strategy).private, reproducible_noise=settings.reproducible_noise,
    )  # fmt: skip
    return [warning for warning in [*not_valid_reasons(params), settings.delta_warning(), budget] if warning]


def follow_rounds(metrics: Path, on_round: Callable[[dict[str, Any]], None]) -> Follow:
    """A ``follow`` for :func:`run_simulation`: ``on_round`` sees each round of ``metrics``
    (a run's ``metrics.jsonl``, public records only) as the ServerApp writes it."""

    def follow(running: Callable[[], bool]) -> None:
        offset = 0
        while True:
            finished = not running()
            if metrics.exists():
                with metrics.open() as lines:
                    lines.seek(offset)
                    for line in iter(lines.readline, ""):
                        if not line.endswith("\n"):  # being written
                            break
                        offset += len(line)
                        on_round(json.loads(line))
            if finished:
                return
            time.sleep(FOLLOW_INTERVAL)

    return follow


def cohort_obstacles(settings: RunSettings, engine: str) -> list[str]:
    """Why the run's clients could not train in vectorised cohorts on ``engine`` (none: they can)."""
    rule = get_strategy_class(settings.strategy).local_update_rule
    return [
        text for text, applies in (
            ("Flower's engine runs each client on its own", engine != "in-process"),
            (f"the strategy's local rule {rule.__qualname__} has no functional form", not rule.has_functional_form()),
            ("local DP (Opacus) trains each client on its own", settings.local_dp),
            ("multi-precision training (train-bit-widths) trains each client on its own", bool(settings.bit_widths())),
        ) if applies
    ]  # fmt: skip


def vectorised(settings: RunSettings, engine: str = "in-process") -> bool:
    """Whether the run's clients train in vectorised cohorts: ``cohort-batching`` auto
    wherever they can, off never; on refuses, in one line, a run where they cannot."""
    obstacles = cohort_obstacles(settings, engine)
    if obstacles and settings.cohort_batching == "on":
        raise UsageError(f"cohort-batching on: a round's clients cannot train as one cohort here: {'; '.join(obstacles)}")
    return settings.cohort_batching != "off" and not obstacles


def client_training(settings: RunSettings, engine: str) -> str:
    """How the run's clients train and where, for the run's header."""
    device = device_name(settings.device)
    if vectorised(settings, engine):
        return f"clients train on {device} in vectorised cohorts (torch.func)"
    why = "cohort-batching off" if settings.cohort_batching == "off" else "; ".join(cohort_obstacles(settings, engine))
    return f"clients train on {device} one by one ({why})"


def cohort_handler(settings: RunSettings) -> CohortHandler | None:
    """dpfl's cohort handler for an in-process run of ``settings``, or None to train one by one."""
    return train_cohort if vectorised(settings) else None


def run_simulation(
    settings: RunSettings, engine: str, workers: int, follow: Follow, node_configs: Sequence[Mapping[str, Any]] = (),
) -> str | None:
    """Run ``settings`` on ``engine`` while ``follow(running)`` watches; the failure, or None.

    ``follow`` is called in this thread and returns once ``running()`` is false. A
    KeyboardInterrupt inside it stops the run cleanly before it propagates.
    ``node_configs``: the simulated data owners' own node configs (round robin by
    partition), never part of the run config.
    """
    out = Path(settings.out_dir)
    if engine == "flower":
        failure = _run_on_flower(settings, out, follow, node_configs)
    else:
        failure = run_in_process_following(settings, follow, workers, node_configs=node_configs)
    if (out / "config.json").exists():  # flower.log's last line came after the records were written
        pin_public_times(out)
    return failure


def _run_on_flower(
    settings: RunSettings, out: Path, follow: Follow, node_configs: Sequence[Mapping[str, Any]]
) -> str | None:
    try:
        with simulation(settings, settings.num_clients, out / FLOWER_LOG, out / SERVER_LOG, out / NODES_LOG,
                        node_configs) as flower:  # fmt: skip
            follow(lambda: flower.poll() is None)
    except FederationError as err:
        return str(err)
    if flower.returncode:
        tail = (out / SERVER_LOG).read_text(errors="replace").strip().splitlines()[-LOG_TAIL_LINES:]
        return "flwr run exited with code {}; last lines of {}:\n{}".format(flower.returncode, SERVER_LOG, "\n".join(tail))
    return None


def run_in_process_following(
    settings: RunSettings, follow: Follow, workers: int = 1, client: ClientApp = client_app,
    num_nodes: int | None = None, log: Path | None = None, node_configs: Sequence[Mapping[str, Any]] = (),
) -> str | None:
    """Run ``settings`` on the in-process engine, ``client`` on ``num_nodes`` nodes (default:
    the ClientApp on one node per client), while ``follow`` watches as in :func:`run_simulation`;
    Flower's public log goes to ``log`` (default: the run folder's), its other lines to
    :data:`SERVER_LOG` beside it. The failure, or None."""
    failure: list[str] = []
    stop = threading.Event()
    log = log or Path(settings.out_dir) / FLOWER_LOG
    log.parent.mkdir(parents=True, exist_ok=True)

    def target() -> None:
        try:
            # Vectorised cohorts are the ClientApp's own: another client (an audit's) trains one by one.
            cohort = cohort_handler(settings) if client is client_app else None
            run_in_process(server_app, client, settings.to_run_config(), num_nodes or settings.num_clients, workers, stop,
                           node_configs, cohort, cuda_devices(settings.device))  # fmt: skip
        except Exception as err:  # noqa: BLE001 - reported below, as a failed Flower run would be
            failure.append(f"{type(err).__name__}: {err}")

    with flower_log_to(log, log.with_name(SERVER_LOG)):
        worker = threading.Thread(target=target, daemon=True)
        worker.start()
        try:
            follow(worker.is_alive)
        except KeyboardInterrupt:
            # End the run before its next client: a thread still inside torch when the
            # interpreter exits aborts the process.
            stop.set()
            worker.join()
            raise
    return failure[0] if failure else None
