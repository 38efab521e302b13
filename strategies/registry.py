"""Finding strategies: the ``dpfl.strategies`` entry points and ``module:Class`` plugins.

Every strategy, built-in or third-party, is resolved and checked here, so that a
bad plugin (it does not import, lacks a part, or returns the wrong thing) fails in
one line naming it before any federation starts.
"""

from __future__ import annotations

import importlib
import math
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from dpfl.errors import UsageError
from dpfl.strategies.base import (
    PLATFORM_CONFIG_KEYS,
    ClientLevelDPStrategy,
    LocalUpdateRule,
    checked_extra_records,
    checked_round_config,
)

ENTRY_POINT_GROUP = "dpfl.strategies"


@lru_cache(maxsize=1)
def registered_strategies() -> dict[str, Any]:
    """Name → entry point of every installed strategy."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_strategy_class(name: str) -> type[ClientLevelDPStrategy]:
    """A strategy class by registered name or ``module:Class``, checked for shape."""
    return _resolve(name)


@lru_cache(maxsize=32)
def _resolve(name: str) -> type[ClientLevelDPStrategy]:
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # noqa: BLE001 - any failure to import is the plugin's
            raise UsageError(f"strategy plugin {name!r}: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
        if not hasattr(module, class_name):
            raise UsageError(f"strategy plugin {name!r}: module {module_name!r} has no {class_name!r}")
        cls = getattr(module, class_name)
    else:
        registered = registered_strategies()
        if name not in registered:
            raise UsageError(
                f"unknown strategy {name!r}; choose one of {', '.join(sorted(registered))} or give module:Class"
            )
        try:
            cls = registered[name].load()
        except Exception as err:  # noqa: BLE001
            raise UsageError(f"strategy {name!r} cannot be loaded ({type(err).__name__}: {err})") from None
    check_strategy_class(cls, name)
    return cls


def check_strategy_class(cls: Any, label: str) -> None:
    """Refuse what is not a complete dpfl strategy, naming the problem."""
    if not (isinstance(cls, type) and issubclass(cls, ClientLevelDPStrategy)):
        raise UsageError(f"strategy plugin {label!r} is not a subclass of dpfl.strategies.ClientLevelDPStrategy")
    if not (isinstance(cls.name, str) and cls.name):
        raise UsageError(f"strategy plugin {label!r} has no name (set the class attribute `name`)")
    if not isinstance(cls.description, str) or not cls.description:
        raise UsageError(f"strategy plugin {label!r} has no description (set the class attribute `description`)")
    taken = sorted(PLATFORM_CONFIG_KEYS & set(cls.options))
    if taken:
        raise UsageError(f"strategy plugin {label!r} declares option {', '.join(taken)}, which the platform owns; rename it")
    rule = cls.local_update_rule
    if not (isinstance(rule, type) and issubclass(rule, LocalUpdateRule)):
        raise UsageError(f"strategy plugin {label!r}: local_update_rule is not a subclass of LocalUpdateRule")


def smoke_test_strategy(cls: type[ClientLevelDPStrategy], settings: Any, label: str) -> None:
    """Run every hook of both parts once on a tiny model; wrong return types fail here."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = {name: t.detach().clone() for name, t in model.state_dict().items()}
    strategy = cls.from_settings(settings, noise_multiplier=1.0, local_steps=2)
    strategy.global_arrays = ArrayRecord(x)
    try:
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
        if getattr(settings, "local_dp", False):
            _local_dp_step(cls, config, records, model)
    except UsageError as err:
        raise UsageError(f"strategy {label!r}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a hook that raises is the plugin's to fix
        raise UsageError(f"strategy {label!r} failed its check ({type(err).__name__}: {err})") from None


def _local_dp_step(cls: type[ClientLevelDPStrategy], config: dict, records: dict, model: nn.Module) -> None:
    """Two DP-SGD steps with the rule: refuses a rule DP-SGD cannot privatise (SAM, proximal terms)."""
    from torch.utils.data import TensorDataset

    from dpfl.client.local_dp import LocalDP
    from dpfl.client.training import train_private_update
    from dpfl.privacy.mechanism import ClientInstructions
    from dpfl.privacy.randomness import Randomness

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
