"""The plugin smoke test: every hook of a strategy's server and client parts run once.

It sits above both ``dpfl.strategies`` and ``dpfl.client`` because the client part
is exercised through the client's own training (with local DP when the run asks
for it), so a plugin that returns the wrong thing, or a local rule DP-SGD cannot
privatise, fails in one line naming it before any federation starts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.utils.data import TensorDataset

from dpfl.client.local_dp import LocalDP
from dpfl.client.training import train_private_update
from dpfl.errors import UsageError
from dpfl.flat import Layout
from dpfl.privacy.mechanism import ClientInstructions
from dpfl.privacy.randomness import Randomness
from dpfl.settings import RunSettings
from dpfl.strategies.base import ClientLevelDPStrategy, checked_extra_records, checked_round_config


def smoke_test_strategy(cls: type[ClientLevelDPStrategy], settings: RunSettings, label: str) -> None:
    """Run every hook of both parts once on a tiny model; wrong return types fail here."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = {name: t.detach().clone() for name, t in model.state_dict().items()}
    try:
        strategy = cls.from_settings(settings, noise_multiplier=1.0, local_steps=2, update_size=Layout(x).size)
        strategy.global_arrays = ArrayRecord(x)
        config = strategy.round_config(1)
        _expect(isinstance(config, dict) and all(isinstance(v, (bool, int, float, str)) for v in config.values()),
                "round_config must return a dict of bool/int/float/str")  # fmt: skip
        checked_round_config(config)
        records = strategy.extra_records(1)
        _expect(isinstance(records, dict) and all(isinstance(r, ArrayRecord) for r in records.values()),
                "extra_records must return a dict of ArrayRecord")  # fmt: skip
        checked_extra_records(records)
        _expect_like(strategy.public_update(1, x), x, "public_update", optional=True)
        _expect_like(strategy.transform_update(1, x), x, "transform_update", optional=False)
        strategy.after_aggregate(1, x)

        rule = cls.local_update_rule({**config, "lr": 0.1}, {k: r.to_torch_state_dict() for k, r in records.items()})
        model.zero_grad()
        loss = rule.compute_gradient(model, torch.randn(2, 4), torch.tensor([0, 2]))
        _expect(isinstance(loss, float) and math.isfinite(loss), "compute_gradient must return the loss as a float")
        for param in model.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        rule.direction(model)
        _expect_like(rule.public_part(2, 0.1), x, "local_update_rule.public_part", optional=True)
        if settings.local_dp:
            _local_dp_step(cls, config, records, model)
    except UsageError as err:
        raise UsageError(f"strategy {label!r}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a hook that raises is the plugin's to fix
        raise UsageError(f"strategy {label!r} failed its check ({type(err).__name__}: {err})") from None


def _local_dp_step(cls: type[ClientLevelDPStrategy], config: dict, records: dict, model: nn.Module) -> None:
    """Two DP-SGD steps with the rule: refuses a rule DP-SGD cannot privatise (SAM, proximal terms)."""
    rule = cls.local_update_rule({**config, "lr": 0.1}, {k: r.to_torch_state_dict() for k, r in records.items()})
    data = TensorDataset(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    train_private_update(
        model, data, rule, steps=2, lr=0.1, batch_size=4, weight_decay=0.0, grad_clip=10.0,
        instructions=ClientInstructions.flat(1.0), generator=torch.Generator().manual_seed(0),
        noise_stream=Randomness().stream("smoke-test"), local_dp=LocalDP(1.0, 1.0, 1e-5),
    )  # fmt: skip


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def _expect_like(value: Any, like: dict[str, torch.Tensor], hook: str, optional: bool) -> None:
    if value is None and optional:
        return
    _expect(
        isinstance(value, dict)
        and value.keys() == like.keys()
        and all(isinstance(value[k], torch.Tensor) and value[k].shape == like[k].shape for k in like),
        f"{hook} must return {'None or ' if optional else ''}a dict of tensors shaped like the model's",
    )
