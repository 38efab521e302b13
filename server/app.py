"""The ServerApp: runs a client-level DP strategy, evaluates centrally, records the run."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from dpfl.errors import UsageError
from dpfl.flat import Layout
from dpfl.privacy.accountants.last_iterate import last_iterate_epsilon
from dpfl.privacy.accountants.skellam import DistributedSkellamAccountant
from dpfl.privacy.accountants.rdp import epsilon_for
from dpfl.privacy.calibration import calibrate_noise_multiplier
from dpfl.privacy.participation import accounted_shape
from dpfl.privacy.validation import ensure_client_level_dp_compatible
from dpfl.records import record_tensors
from dpfl.server.checkpoint import (
    InitialState,
    RunCheckpoint,
    budget_change_warning,
    check_resumable,
    load_initial_state,
    correlated_resume_state,
    load_run_checkpoint,
    resumed_ledger,
    save_run_checkpoint,
    write_ledger,
    write_private_state,
)
from dpfl.server.deployment_round import run_deployment_round
from dpfl.task.evaluation import evaluate
from dpfl.server.recorder import PRIVATE_DIAGNOSTICS_FILE, RunRecorder
from dpfl.server.round_line import round_line
from dpfl.settings import RunSettings
from dpfl.strategies import get_strategy_class
from dpfl.strategies.base import BudgetExhausted, distributed_params, not_valid_reasons
from dpfl.task.checkpoint import ModelSpec
from dpfl.task.data import cached_dataset
from dpfl.task.devices import resolve_device
from dpfl.task.pretraining import initialise
from dpfl.task.recipes import recipe_for

# How long to wait for the federation's nodes to connect, and how often to look.
NODE_WAIT_TIMEOUT_S = 600.0
NODE_WAIT_POLL_S = 1.0
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunSettings.from_run_config(context.run_config))


def resolve_noise_multiplier(
    settings: RunSettings, prior: Sequence[tuple[float, float, int]] = (), update_size: int = 0
) -> float:
    """σ as given, or calibrated so that the rounds of ``prior`` (an init-from ledger) and the
    planned rounds together end at ``target-epsilon`` (under secure aggregation, with its
    Skellam accountant for an update of ``update_size`` values)."""
    if settings.target_epsilon > 0:
        accountant = settings.accountant
        if settings.aggregation == "secagg":
            try:  # the accountant needs only C and the size: any σ builds it
                accountant = DistributedSkellamAccountant(settings.delta, distributed_params(settings, 1.0, update_size))
            except ValueError as err:
                raise UsageError(str(err)) from None
        # Under a participation schema: one step per block of min-separation rounds (dpfl.privacy.participation).
        sample_rate, steps = accounted_shape(settings.participation_schema(), settings.sample_rate,
                                             settings.num_server_rounds)  # fmt: skip
        return calibrate_noise_multiplier(
            settings.target_epsilon, settings.delta, sample_rate, steps, accountant=accountant, prior=prior,
        )
    return settings.noise_multiplier


def load_resume(settings: RunSettings) -> RunCheckpoint | None:
    """The checkpoint ``resume-from`` names, checked against this run's config; None for a new run."""
    if not settings.resume_from:
        return None
    checkpoint = load_run_checkpoint(settings.resume_from)
    check_resumable(checkpoint, settings.to_run_config(), Path(settings.resume_from))
    if warning := budget_change_warning(checkpoint.run_config, settings.to_run_config()):
        log(WARNING, "dpfl: %s", warning)
    return checkpoint


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # other names or shapes: another architecture
        first = str(err).strip().splitlines()[-1].strip()
        raise UsageError(f"{source}: its weights do not fit this run's model ({first})") from None


def wait_for_nodes(grid: Grid, wanted: int) -> None:
    deadline = time.monotonic() + NODE_WAIT_TIMEOUT_S
    while (connected := len(list(grid.get_node_ids()))) < wanted:
        if time.monotonic() > deadline:
            raise UsageError(f"only {connected} of num-clients={wanted} nodes connected in {NODE_WAIT_TIMEOUT_S:g} s")
        log(INFO, "dpfl: waiting for nodes: %d of %d connected", connected, wanted)
        time.sleep(NODE_WAIT_POLL_S)


def local_epsilon_nominal(settings: RunSettings, local_steps: int, server_round: int) -> float:
    """Sample-level ε of a client of the nominal size that took part in every round so far.

    Public by construction (it uses only public values); each client's own ε, which
    depends on its data size and on how often it was sampled, stays in its node's log.
    """
    sample_rate = 1 / math.ceil(settings.nominal_client_size() / settings.batch_size)
    return epsilon_for(settings.local_noise_multiplier, sample_rate, local_steps * server_round, settings.local_delta)[0]


def run_federation(grid: Grid, settings: RunSettings) -> dict:
    strategy_class = get_strategy_class(settings.strategy)
    # The server step is the strategy's from here on: config.json, the checkpoint's run
    # config (which a resume must match) and the strategy all hold the resolved one.
    settings = strategy_class.resolved_settings(settings)
    resume = load_resume(settings)
    if resume:  # the records continue in the folder being resumed
        settings = dataclasses.replace(settings, out_dir=settings.resume_from)
    # The server holds only its own held-out data: no training set is loaded here.
    data = cached_dataset(settings.dataset, settings.data_dir, settings.image_size, with_train=False,
                          validation_fraction=settings.validation_fraction)
    spec = ModelSpec.for_data(settings.model, settings.model_width, data, settings.model_depth)
    torch.manual_seed(settings.seed)
    model = ensure_client_level_dp_compatible(spec.build(), convert=False)
    device = resolve_device(settings.device)  # where the server evaluates (the model stays on the CPU)
    size = Layout(model.state_dict()).size  # an update's values: what secure aggregation's shares are sized for
    initial: InitialState | None = None
    if resume:
        load_weights(model, resume.weights, f"resume-from {settings.resume_from!r}")
        pretraining_seconds, noise_multiplier = resume.pretraining_seconds, resume.noise_multiplier
    else:
        if settings.init_from:
            initial = load_initial_state(settings.init_from, settings.init_new_data)
            load_weights(model, initial.weights, f"init-from {settings.init_from!r}")
            pretraining_seconds = 0.0
        else:
            pretraining_seconds = initialise(model, spec, settings.pretraining)
        noise_multiplier = resolve_noise_multiplier(settings, initial.history if initial else (), size)
    local_steps = settings.local_steps()
    try:
        strategy = strategy_class.from_settings(settings, noise_multiplier=noise_multiplier, local_steps=local_steps,
                                                update_size=size)  # fmt: skip
    except ValueError as err:  # the mechanism's parameters do not fit together
        raise UsageError(str(err)) from None
    if resume:
        strategy.load_state_dict({**resume.strategy_state, "accountant": resumed_ledger(resume, Path(settings.out_dir))})
        private_state = correlated_resume_state(Path(settings.out_dir), resume.round, settings.participation_schema(),
                                                resume.run_config["num-server-rounds"])  # fmt: skip
        if private_state is not None:
            strategy.mechanism.restore_private_state(private_state, resume.round)
    elif initial:
        strategy.accountant.continue_from(initial.history)
    recorder = RunRecorder(
        settings.out_dir,
        {
            **settings.to_run_config(),
            "resolved-noise-multiplier": noise_multiplier,
            "local-steps": local_steps,
            "epsilon-valid": strategy.epsilon_valid,
            "recipe": recipe_for(settings.model, settings.dataset).as_run_config(),
            "pretraining-seconds": pretraining_seconds,
        },
        resume=resume,
    )
    # Write-ahead: the ledger reaches the disk before each round's noise is drawn.
    strategy.mechanism.journal = lambda ledger: write_ledger(recorder.out_dir, ledger)
    # Likewise the secret state of correlated noise (server-private, never in checkpoint.pt).
    strategy.mechanism.private_journal = lambda state: write_private_state(recorder.out_dir, state)
    log(INFO, "dpfl: writing run records to %s%s", recorder.out_dir, f" (resumed after round {resume.round})" if resume else "")
    log(WARNING, "dpfl: raw server-side diagnostics (not covered by epsilon, never to be shared) go to %s",
        recorder.out_dir / PRIVATE_DIAGNOSTICS_FILE)  # fmt: skip
    for warning in [*not_valid_reasons(strategy.mechanism.params), settings.delta_warning()]:
        if warning:
            log(WARNING, "dpfl: %s", warning)
    latest = {"arrays": ArrayRecord(model.state_dict())}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        latest["arrays"] = arrays
        model.load_state_dict(record_tensors(arrays))
        loss, accuracy = evaluate(model, data.test, device=device)
        if server_round > 0:
            train_metrics = dict(strategy.last_metrics)
            recorder.record_private(strategy.private_diagnostics)
        else:
            train_metrics = {"epsilon": 0.0 if strategy.epsilon_valid else math.nan}
        if settings.local_dp:
            train_metrics["local-epsilon-nominal"] = local_epsilon_nominal(settings, local_steps, server_round)
        if data.validation is not None:
            train_metrics["validation-accuracy"] = evaluate(model, data.validation, device=device)[1]
        row = recorder.record_round({"round": server_round, "accuracy": accuracy, "loss": loss, **train_metrics})
        save_run_checkpoint(recorder.out_dir, RunCheckpoint(
            round=server_round, weights=dict(record_tensors(arrays)), strategy_state=strategy.state_dict(),
            run_config=settings.to_run_config(), noise_multiplier=noise_multiplier, epsilon_valid=strategy.epsilon_valid,
            rounds=recorder.rounds, pretraining_seconds=pretraining_seconds,
        ))  # fmt: skip
        # No duration: Flower's log is public, and a round's time grows with its private cohort.
        log(INFO, "dpfl %s", round_line(row, settings.num_server_rounds, settings.delta, settings.local_delta))
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    wait_for_nodes(grid, settings.num_clients)
    try:
        strategy.start(
            grid,
            latest["arrays"],
            num_rounds=settings.num_server_rounds,
            timeout=settings.round_timeout,
            evaluate_fn=evaluate_fn,
            first_round=resume.round + 1 if resume else 1,
        )
        outcome = "completed"
    except BudgetExhausted as stop:
        outcome = f"stopped before the budget was exceeded: {stop}"
    log(INFO, "dpfl: %s", outcome)
    summary = recorder.finish(
        spec,
        settings.dataset,
        dict(record_tensors(latest["arrays"])),
        outcome,
        {
            "noise-multiplier": strategy.noise_multiplier, "local-steps": local_steps, "strategy": settings.strategy,
            "pretraining-seconds": pretraining_seconds,
            "final-validation-accuracy": recorder.rounds[-1].get("validation-accuracy") if recorder.rounds else None,
            # A heuristic for who sees only the final model, beside the accountant's ε (never instead of it).
            # It assumes independent noise in every round a client may take part in: Poisson sampling only.
            "last-iterate-epsilon": last_iterate_epsilon(strategy.accountant.history, settings.delta)
            if strategy.epsilon_valid and settings.participation_schema() is None else None,
        },  # fmt: skip
        ledger=strategy.accountant.state_dict() if strategy.epsilon_valid else None,
    )
    # After the trained model is saved: a failing deployment cannot cost it.
    if settings.deploy:
        run_deployment_round(grid, settings, strategy, latest["arrays"], recorder.out_dir)
    return summary
