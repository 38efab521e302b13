"""DP-FedPGN: a first-order global gradient-norm penalty (Liu et al. 2025).

Each local step moves along d = γ·g + (1−γ)·c, with c the previous global step per
local step, c = Δ̄_{t−1}/(K·η) (the released mean update, = (x_{t−1} − x_t)/(K·η) under
the default server optimiser, sgd at lr 1). The c-part of the client's update,
(1−γ)·K·η·c, is public (it is built from released models only), so it is removed
before clipping and added back by the server: only u = Δ − (1−γ)Kηc is clipped
and noised, and it is γ times smaller than a FedAvg update. Momentum must be 0
and K, η the round's public values for that removal to be exact.

Option ``ascent-rho`` > 0 takes the local gradient at the point perturbed by ρ
along the normalised global direction, w + ρ·c/‖c‖ (c points uphill, like a
gradient), before mixing: the explicit form of the penalty's ascent step.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from dpfl.privacy.clipping import global_l2_norm
from dpfl.errors import UsageError
from dpfl.records import record_tensors, tensor_record
from dpfl.strategies.base import ClientLevelDPStrategy, LocalUpdateRule, Tensors, gradient_at_shift, shifted
from dpfl.strategies.base import Batch, LossFunction  # the functional form's types

GLOBAL_DIRECTION_KEY = "global-direction"


def public_part(global_direction: Tensors, gamma: float, steps: int, lr: float) -> Tensors:
    """(1−γ)·K·η·c: what K steps along d = γg + (1−γ)c move along c."""
    scale = (1 - gamma) * steps * lr
    return {name: scale * c for name, c in global_direction.items()}


class FedPGNLocalUpdate(LocalUpdateRule):
    """Mix the local gradient with the global direction: d = γ·g + (1−γ)·c."""

    def __init__(self, config: Mapping[str, Any], records: Mapping[str, Tensors]) -> None:
        super().__init__(config, records)
        self.gamma = float(config["gamma"])
        self.ascent_rho = float(config.get("ascent-rho", 0.0))
        self.global_direction = records[GLOBAL_DIRECTION_KEY]
        norm = global_l2_norm(self.global_direction)
        self.ascent = (
            {name: self.ascent_rho * c / norm for name, c in self.global_direction.items()}
            if self.ascent_rho > 0 and norm > 0
            else None
        )

    def compute_gradient(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        if self.ascent is None:
            return super().compute_gradient(model, inputs, targets)
        return gradient_at_shift(model, self.ascent, functools.partial(super().compute_gradient, model, inputs, targets))

    def direction(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            param.grad.mul_(self.gamma).add_(self.global_direction[name], alpha=1 - self.gamma)

    def functional_gradient(self, loss: LossFunction, params: Tensors, batch: Batch) -> tuple[Tensors, torch.Tensor]:
        return super().functional_gradient(loss, params if self.ascent is None else shifted(params, self.ascent), batch)

    def functional_direction(self, grads: Tensors) -> Tensors:
        return {name: g * self.gamma + self.global_direction[name] * (1 - self.gamma) for name, g in grads.items()}

    def public_part(self, steps: int, lr: float) -> Tensors:
        return public_part(self.global_direction, self.gamma, steps, lr)


class DPFedPGN(ClientLevelDPStrategy):
    name = "dp-fedpgn"
    description = "DP-FedPGN: local steps mix the gradient with the last global step; only the private part is noised"
    local_update_rule = FedPGNLocalUpdate
    # gamma: the weight of the local gradient in each step's direction d = γg + (1−γ)c.
    options = {"gamma": 0.2, "ascent-rho": 0.0}

    def __init__(self, *, gamma: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if gamma is not None:
            self.option_values["gamma"] = gamma
        if not 0 < self.gamma <= 1:
            raise UsageError(f"strategy option gamma must be in (0, 1], got {self.gamma}")
        self.global_direction: Tensors | None = None  # c; zeros before the first round

    @property
    def gamma(self) -> float:
        return float(self.option_values["gamma"])

    def _direction(self, like: Tensors) -> Tensors:
        if self.global_direction is None:
            self.global_direction = {name: torch.zeros_like(t) for name, t in like.items()}
        return self.global_direction

    def extra_records(self, server_round: int) -> dict[str, ArrayRecord]:
        assert self.global_arrays is not None
        return {GLOBAL_DIRECTION_KEY: tensor_record(self._direction(record_tensors(self.global_arrays)))}

    def public_update(self, server_round: int, like: Tensors) -> Tensors:
        return public_part(self._direction(like), self.gamma, self.local_steps, self.round_lr(server_round))

    def after_aggregate(self, server_round: int, mean_delta: Tensors) -> None:
        step = self.local_steps * self.round_lr(server_round)
        self.global_direction = {name: t / step for name, t in mean_delta.items()}

    def extra_state(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "global-direction": self.global_direction}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.option_values["gamma"] = float(state["gamma"])
        self.global_direction = state["global-direction"]
