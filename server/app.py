"""The ServerApp: runs a client-level DP strategy, evaluates centrally, records the run."""

from __future__ import annotations

import time
import math
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from dpfl.client.data import cached_dataset, model_spec
from dpfl.errors import UsageError
from dpfl.privacy.accounting import calibrate_noise_multiplier, epsilon_for
from dpfl.privacy.validation import ensure_client_level_dp_compatible
from dpfl.server.deployment_round import run_deployment_round
from dpfl.server.evaluation import evaluate
from dpfl.server.recorder import PRIVATE_DIAGNOSTICS_FILE, RunRecorder, format_epsilon
from dpfl.settings import RunSettings
from dpfl.strategies import get_strategy_class
from dpfl.strategies.base import BudgetExhausted, not_valid_reasons
from dpfl.task.pretraining import initialise
from dpfl.task.recipes import recipe_for

# How long to wait for the federation's nodes to connect, and how often to look.
NODE_WAIT_TIMEOUT_S = 600.0
NODE_WAIT_POLL_S = 1.0
# Per-round reply timeout.
ROUND_TIMEOUT_S = 3600.0

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunSettings.from_run_config(context.run_config))


def resolve_noise_multiplier(settings: RunSettings) -> float:
    """σ as given, or calibrated so that the planned rounds end at ``target-epsilon``."""
    if settings.target_epsilon > 0:
        return calibrate_noise_multiplier(
            settings.target_epsilon, settings.delta, settings.sample_rate, settings.num_server_rounds,
            accountant=settings.accountant,
        )
    return settings.noise_multiplier


def wait_for_nodes(grid: Grid, wanted: int) -> None:
    deadline = time.monotonic() + NODE_WAIT_TIMEOUT_S
    while (connected := len(list(grid.get_node_ids()))) < wanted:
        if time.monotonic() > deadline:
            raise UsageError(f"only {connected} of num-clients={wanted} nodes connected in {NODE_WAIT_TIMEOUT_S:g} s")
        log(INFO, "waiting for nodes: %d of %d connected", connected, wanted)
        time.sleep(NODE_WAIT_POLL_S)


def local_epsilon_nominal(settings: RunSettings, local_steps: int, server_round: int) -> float:
    """Sample-level ε of a client of the nominal size that took part in every round so far.

    Public by construction (it uses only public values); each client's own ε, which
    depends on its data size and on how often it was sampled, stays in its node's log.
    """
    sample_rate = 1 / math.ceil(settings.nominal_client_size() / settings.batch_size)
    return epsilon_for(settings.local_noise_multiplier, sample_rate, local_steps * server_round, settings.local_delta)[0]


def run_federation(grid: Grid, settings: RunSettings) -> dict:
    # The server holds only its own held-out data: no training set is loaded here.
    data = cached_dataset(settings.dataset, settings.data_dir, settings.image_size, with_train=False,
                          validation_fraction=settings.validation_fraction)
    spec = model_spec(settings, data)
    torch.manual_seed(settings.seed)
    model = ensure_client_level_dp_compatible(spec.build(), convert=False)
    pretraining_seconds = initialise(model, spec, settings.pretraining)
    noise_multiplier = resolve_noise_multiplier(settings)
    local_steps = settings.local_steps()
    strategy = get_strategy_class(settings.strategy).from_settings(
        settings, noise_multiplier=noise_multiplier, local_steps=local_steps
    )
    recorder = RunRecorder(
        settings.out_dir,
        {
            **settings.to_run_config(),
            "resolved-noise-multiplier": noise_multiplier,
            "local-steps": local_steps,
            "epsilon-valid": strategy.epsilon_valid,
            "recipe": recipe_for(settings.model).as_run_config(),
            "pretraining-seconds": pretraining_seconds,
        },
    )
    log(INFO, "dpfl: writing run records to %s", recorder.out_dir)
    log(WARNING, "dpfl: raw server-side diagnostics (not covered by epsilon, never to be shared) go to %s",
        recorder.out_dir / PRIVATE_DIAGNOSTICS_FILE)  # fmt: skip
    for warning in [*not_valid_reasons(strategy.mechanism.params), settings.delta_warning()]:
        if warning:
            log(WARNING, "dpfl: %s", warning)
    latest = {"arrays": ArrayRecord(model.state_dict())}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        latest["arrays"] = arrays
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, data.test)
        if server_round > 0:
            train_metrics = dict(strategy.last_metrics)
            recorder.record_private(strategy.private_diagnostics)
        else:
            train_metrics = {"epsilon": 0.0 if strategy.epsilon_valid else math.nan}
        if settings.local_dp:
            train_metrics["local-epsilon-nominal"] = local_epsilon_nominal(settings, local_steps, server_round)
        if data.validation is not None:
            train_metrics["validation-accuracy"] = evaluate(model, data.validation)[1]
        row = recorder.record_round({"round": server_round, "accuracy": accuracy, "loss": loss, **train_metrics})
        log(
            INFO,
            "dpfl round %d/%d: accuracy %.4f, loss %.4f, epsilon %s (delta %g), %.1f s",
            server_round, settings.num_server_rounds, accuracy, loss, format_epsilon(row["epsilon"]), settings.delta,
            row["round-time"],
        )  # fmt: skip
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    wait_for_nodes(grid, settings.num_clients)
    try:
        strategy.start(
            grid,
            latest["arrays"],
            num_rounds=settings.num_server_rounds,
            timeout=ROUND_TIMEOUT_S,
            evaluate_fn=evaluate_fn,
        )
        outcome = "completed"
    except BudgetExhausted as stop:
        outcome = f"stopped before the budget was exceeded: {stop}"
    log(INFO, "dpfl: %s", outcome)
    summary = recorder.finish(
        spec,
        settings.dataset,
        latest["arrays"].to_torch_state_dict(),
        outcome,
        {
            "noise-multiplier": strategy.noise_multiplier, "local-steps": local_steps, "strategy": settings.strategy,
            "pretraining-seconds": pretraining_seconds,
            "final-validation-accuracy": recorder.rounds[-1].get("validation-accuracy") if recorder.rounds else None,
        },  # fmt: skip
    )
    # After the trained model is saved: a failing deployment cannot cost it.
    if settings.deploy:
        run_deployment_round(grid, settings, latest["arrays"], recorder.out_dir)
    return summary
