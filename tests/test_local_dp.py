"""Sample-level DP inside clients (``--local-dp``): Opacus DP-SGD with a cumulative ε."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from dpfl.client.app import app as client_app
from dpfl.client.data import load_client_partition
from dpfl.client.local_dp import STATE_KEY, LocalDP
from dpfl.client.training import train_private_update
from dpfl.errors import UsageError
from dpfl.privacy.mechanism import ClientInstructions
from dpfl.privacy.randomness import Randomness
from dpfl.engines.inprocess import RUN_ID, SERVER_NODE_ID, InProcessGrid
from dpfl.settings import RunSettings
from dpfl.strategies import get_strategy_class
from dpfl.strategies.base import LocalUpdateRule
from dpfl.strategies.dp_fedpgn import FedPGNLocalUpdate, GLOBAL_DIRECTION_KEY
from dpfl.strategies.dp_fedsam import SAMLocalUpdate
from dpfl.task.models import build_model

N, STEPS, LR = 12, 3, 0.5


def small_task(model: str = "cnn") -> tuple[torch.nn.Module, TensorDataset]:
    torch.manual_seed(0)
    inputs = torch.randn(N, 1, 8, 8)
    inputs[0] *= 100.0  # an outlier whose raw gradient dominates the batch's
    return build_model(model, 4, 1, 8, 4), TensorDataset(inputs, torch.randint(0, 4, (N,)))


def train(model, dataset, rule=None, local_dp=None):
    """K full-batch steps (batch > n, so Poisson rate 1) without client-level clipping or noise."""
    return train_private_update(
        model,
        dataset,
        rule or LocalUpdateRule({}, {}),
        steps=STEPS,
        lr=LR,
        batch_size=2 * N,
        weight_decay=0.0,
        grad_clip=1e6,
        instructions=ClientInstructions.flat(0.0),
        generator=torch.Generator().manual_seed(1),
        noise_stream=Randomness().stream("client-noise"),
        local_dp=local_dp,
    )


def norm(tensors) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors.values()))


@pytest.mark.parametrize("model_name", ["cnn", "resnet10"])
def test_without_noise_or_binding_clip_it_is_plain_full_batch_sgd(model_name):
    # Checks Opacus's per-sample scaling and that the hook-safe model computes the
    # same function: with every sample in every batch, no noise and a clip that
    # never binds, DP-SGD's step is the plain mean-gradient step.
    model, dataset = small_task(model_name)
    plain = train(model, dataset).update
    model, _ = small_task(model_name)
    private = train(model, dataset, local_dp=LocalDP(0.0, 1e6, 1e-5)).update
    for name in plain:
        torch.testing.assert_close(private[name], plain[name], rtol=1e-4, atol=1e-6)


def test_per_sample_clipping_bounds_every_step():
    clip = 1e-3
    model, dataset = small_task()
    unclipped = norm(train(model, dataset).update)
    model, _ = small_task()
    update = train(model, dataset, local_dp=LocalDP(0.0, clip, 1e-5)).update
    # Each step is the mean of n per-sample gradients of norm <= clip.
    assert norm(update) <= STEPS * LR * clip * (1 + 1e-4)
    assert unclipped > 100 * STEPS * LR * clip


@pytest.mark.parametrize("ascent_rho", [0.0, 0.05])
def test_dp_fedpgn_mixes_the_global_direction_into_the_privatised_gradient(ascent_rho):
    gamma, clip = 0.2, 1e-3
    model, dataset = small_task()
    direction = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    rule = FedPGNLocalUpdate({"gamma": gamma, "ascent-rho": ascent_rho}, {GLOBAL_DIRECTION_KEY: direction})
    result = train(model, dataset, rule, LocalDP(0.0, clip, 1e-5))
    # The private part left after removing (1−γ)Kηc is only γ times the clipped
    # gradients: the mixing with c happened, after the per-sample clipping.
    assert result.norm_before_clip <= gamma * STEPS * LR * clip * (1 + 1e-4)
    assert norm(rule.public_part(STEPS, LR)) > 1.0


class ProximalUpdate(LocalUpdateRule):
    """A FedProx-style term added to p.grad, outside the per-sample loss."""

    def compute_gradient(self, model, inputs, targets):
        loss = super().compute_gradient(model, inputs, targets)
        with torch.no_grad():
            for param in model.parameters():
                param.grad.add_(param, alpha=0.1)
        return loss


@pytest.mark.parametrize("rule", [SAMLocalUpdate({"rho": 0.1}, {}), ProximalUpdate({}, {})])
def test_a_gradient_dp_sgd_cannot_privatise_is_refused(rule):
    model, dataset = small_task()
    with pytest.raises(UsageError, match="not the mean of per-sample gradients"):
        train(model, dataset, rule, LocalDP(1.0, 1.0, 1e-5))


def test_client_epsilon_is_cumulative_over_rounds_in_its_persistent_state():
    settings = RunSettings(model="cnn", model_width=4, num_clients=20, sample_rate=1.0, local_dp=True, seed=3)
    node_id = SERVER_NODE_ID + 1
    context = Context(
        run_id=RUN_ID,
        node_id=node_id,
        node_config={"partition-id": 0, "num-partitions": settings.num_clients},
        state=RecordDict(),
        run_config=settings.to_run_config(),
    )
    grid = InProcessGrid(client_app, {node_id: context})
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = RUN_ID, RUN_ID, SERVER_NODE_ID
    partition = load_client_partition(settings, context.node_config)
    steps = 4
    strategy = get_strategy_class("dp-fedpgn").from_settings(settings, noise_multiplier=1.0, local_steps=steps)
    arrays = ArrayRecord(partition.spec.build().state_dict())
    epsilons = []
    for server_round in (1, 2):
        replies = list(grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord(), grid)))
        # Only the privatised update leaves the client: no loss, data size or epsilon.
        assert set(replies[0].content.keys()) == {"update"}
        arrays, _ = strategy.aggregate_train(server_round, replies)
        epsilons.append(LocalDP(settings.local_noise_multiplier, settings.local_clip, settings.local_delta,
                                context.state).epsilon())  # fmt: skip

    # Opacus's Poisson rate for n samples in batches of b, as its loader samples them.
    sample_rate = 1 / math.ceil(len(partition.dataset) / settings.batch_size)
    reference = RDPAccountant()
    expected = []
    for _ in range(2):
        for _ in range(steps):
            reference.step(noise_multiplier=settings.local_noise_multiplier, sample_rate=sample_rate)
        expected.append(reference.get_epsilon(settings.local_delta))
    assert epsilons == pytest.approx(expected, rel=1e-9)
    assert epsilons[1] > epsilons[0]
    history = json.loads(str(context.state[STATE_KEY]["accountant"]))["history"]
    assert history == [[settings.local_noise_multiplier, sample_rate, 2 * steps]]


def test_local_dp_setting_coerces_from_run_config_text():
    assert RunSettings.from_run_config({"local-dp": "false"}).local_dp is False
    assert RunSettings.from_run_config({"local-dp": "true"}).local_dp is True
    assert RunSettings.from_run_config({"local-dp": True}).local_dp is True
    with pytest.raises(UsageError, match="local-dp must be bool, got 'maybe'"):
        RunSettings.from_run_config({"local-dp": "maybe"})


def test_a_model_without_per_sample_gradients_is_refused_in_one_line(dpfl_quick, tmp_path):
    result = dpfl_quick("simulate", "--model", "vit", "--local-dp", "--out", str(tmp_path / "never"))
    assert result.returncode == 2
    assert "local-dp does not support model 'vit'" in result.stderr and "MultiheadAttention" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["in-process", "flower"])
def test_simulate_with_local_dp_reports_a_growing_local_epsilon(dpfl, tmp_path, engine):
    out = tmp_path / "run"
    result = dpfl(
        "simulate", "--local-dp", "--engine", engine, "--model", "cnn", "--width", "4", "--clients", "3",
        "--sample-rate", "1.0", "--rounds", "3", "--noise-multiplier", "1.0", "--max-epsilon", "0", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    local_epsilons = [row["local-epsilon-nominal"] for row in rows if row["round"] > 0]
    assert len(local_epsilons) == 3 and all(0 < a < b for a, b in zip(local_epsilons, local_epsilons[1:]))


def test_dp_sgd_adds_its_noise_inside_the_client():
    # Against a sigma = 0 twin on the same (reproducible) Poisson batches: the step
    # differs by lr * N(0, (sigma * clip / B)^2) per coordinate, B the expected batch.
    sigma, clip, steps = 2.0, 1.0, 1
    updates = []
    for noise in (sigma, 0.0):
        model, dataset = small_task()
        local_dp = LocalDP(noise, clip, 1e-5, randomness=Randomness(seed=7), label=(1, 0))
        updates.append(train_private_update(
            model, dataset, LocalUpdateRule({}, {}), steps=steps, lr=LR, batch_size=2 * N, weight_decay=0.0,
            grad_clip=1e6, instructions=ClientInstructions.flat(0.0), generator=torch.Generator().manual_seed(1),
            noise_stream=Randomness().stream("client-noise"), local_dp=local_dp,
        ).update)  # fmt: skip
    difference = torch.cat([(updates[0][k] - updates[1][k]).flatten() for k in updates[0]]).double()
    assert float(difference.std()) == pytest.approx(LR * sigma * clip / N, rel=0.05)
    assert abs(float(difference.mean())) < 4 * LR * sigma * clip / N / math.sqrt(difference.numel())
