"""The server optimiser (FedOpt): closed forms of its steps, its state across a resume, its place in a round."""

from __future__ import annotations

import pytest
import torch

from dpfl.errors import UsageError
from dpfl.settings import RunSettings
from dpfl.strategies.dp_fedpgn import DPFedPGN
from dpfl.strategies.fedavg import FedAvg
from dpfl.task.server_optimizer import SERVER_ADAM_EPS, SERVER_MOMENTUM, ServerOptimizer


def tensors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=generator), "b": torch.randn(4, generator=generator)}


def test_sgd_at_lr_one_is_exactly_x_minus_the_mean_update():
    x, delta = tensors(0), tensors(1)
    new = ServerOptimizer("sgd", 1.0).step(x, delta)
    assert all(torch.equal(new[k], x[k] - delta[k]) for k in x)


def test_an_integer_entry_takes_the_plain_step():
    x, delta = {"count": torch.tensor(5)}, {"count": torch.tensor(2)}
    assert ServerOptimizer("adam", 0.1).step(x, delta)["count"] == 3


def test_server_momentum_accumulates_the_mean_updates():
    x, d1, d2 = tensors(0), tensors(1), tensors(2)
    optimizer = ServerOptimizer("momentum", 0.5)
    x1 = optimizer.step(x, d1)
    x2 = optimizer.step(x1, d2)
    for k in x:  # heavy ball: m1 = d1, m2 = β·d1 + d2
        assert torch.allclose(x1[k], x[k] - 0.5 * d1[k])
        assert torch.allclose(x2[k], x1[k] - 0.5 * (SERVER_MOMENTUM * d1[k] + d2[k]), atol=1e-6)


def test_adams_first_step_is_the_sign_of_the_update_damped_by_eps():
    x, delta = tensors(0), tensors(1)
    new = ServerOptimizer("adam", 0.01).step(x, delta)
    for k in x:  # bias-corrected m = Δ̄, v = Δ̄²
        expected = x[k] - 0.01 * delta[k] / (delta[k].abs() + SERVER_ADAM_EPS)
        assert torch.allclose(new[k], expected, atol=1e-6)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_a_resumed_optimizer_takes_the_same_step_as_an_uninterrupted_one(name):
    x, d1, d2 = tensors(0), tensors(1), tensors(2)
    straight = ServerOptimizer(name, 0.05)
    expected = straight.step(straight.step(x, d1), d2)
    first = ServerOptimizer(name, 0.05)
    x1 = first.step(x, d1)
    resumed = ServerOptimizer(name, 0.05)
    resumed.load_state_dict(first.state_dict())
    got = resumed.step(x1, d2)
    assert all(torch.equal(got[k], expected[k]) for k in x)


def test_the_strategy_applies_the_released_mean_with_its_server_optimizer():
    x = {"w": torch.zeros(4)}
    kwargs = dict(noise_multiplier=0.0, clip_norm=1e6, sample_rate=1.0, num_clients=2, local_steps=2, lr=0.1,
                  lr_decay=1.0, delta=1e-5)  # fmt: skip
    updates = [{"w": torch.tensor([1.0, 2.0, -3.0, 0.0])}, {"w": torch.tensor([3.0, 2.0, -1.0, 0.0])}]
    adam = FedAvg(**kwargs, server_optimizer="adam", server_lr=0.1).aggregate_updates(1, x, updates)
    assert torch.allclose(adam["w"], -0.1 * torch.tensor([2.0, 2.0, -2.0, 0.0]) / (2.0 + SERVER_ADAM_EPS))
    # DP-FedPGN's global direction stays the released mean per local step, not the server's step.
    pgn = DPFedPGN(**kwargs, gamma=1.0, server_optimizer="momentum", server_lr=0.5)
    pgn.aggregate_updates(1, x, updates)
    assert torch.allclose(pgn.global_direction["w"], torch.tensor([2.0, 2.0, -2.0, 0.0]) / (2 * 0.1))
    state = pgn.state_dict()
    assert "server-optimizer" in state and state["server-optimizer"]["state"]


def test_dp_fedpgns_public_part_is_applied_as_it_is_and_the_optimizer_steps_the_rest():
    x = {"w": torch.zeros(4)}
    kwargs = dict(noise_multiplier=0.0, clip_norm=1e6, sample_rate=1.0, num_clients=1, local_steps=2, lr=0.1,
                  lr_decay=1.0, delta=1e-5)  # fmt: skip
    pgn = DPFedPGN(**kwargs, gamma=0.2, server_optimizer="adam", server_lr=0.1)
    pgn.global_direction = {"w": torch.tensor([1.0, -1.0, 2.0, 0.0])}
    private = {"w": torch.tensor([0.5, 0.5, -0.5, 0.0])}
    public = 0.8 * 2 * 0.1 * pgn.global_direction["w"]  # (1 − γ)·K·η·c
    new_x = pgn.aggregate_updates(1, x, [private])
    adam_step = 0.1 * private["w"] / (private["w"].abs() + SERVER_ADAM_EPS)
    assert torch.allclose(new_x["w"], -adam_step - public, atol=1e-6)
    assert torch.allclose(pgn.global_direction["w"], (private["w"] + public) / (2 * 0.1))


def test_a_bad_server_optimizer_or_lr_is_refused_in_one_line():
    with pytest.raises(UsageError, match="server-optimizer.*'rmsprop'"):
        RunSettings(server_optimizer="rmsprop").validate()
    with pytest.raises(UsageError, match="server-lr"):
        RunSettings(server_lr=-1.0).validate()
