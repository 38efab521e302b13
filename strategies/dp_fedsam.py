"""DP-FedSAM (Shi et al. 2023): local sharpness-aware minimisation, then the DP step."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.func import grad

from dpfl.privacy.clipping import global_l2_norm
from dpfl.strategies.base import ClientLevelDPStrategy, LocalUpdateRule, Tensors, gradient_at_shift, l2_norm, shifted
from dpfl.strategies.base import Batch, LossFunction  # the functional form's types


class SAMLocalUpdate(LocalUpdateRule):
    """SAM's gradient: ascend ρ·g/‖g‖, take the gradient there, come back."""

    def compute_gradient(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        rho = float(self.config["rho"])
        loss = super().compute_gradient(model, inputs, targets)
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        grad_norm = global_l2_norm(grads)
        if grad_norm == 0:
            return loss
        ascent = {name: rho * g / grad_norm for name, g in grads.items()}
        model.zero_grad()
        gradient_at_shift(model, ascent, functools.partial(super().compute_gradient, model, inputs, targets))
        return loss

    def functional_gradient(self, loss: LossFunction, params: Tensors, batch: Batch) -> tuple[Tensors, torch.Tensor]:
        rho = float(self.config["rho"])
        grads, value = super().functional_gradient(loss, params, batch)
        norm = l2_norm(grads)
        # A zero gradient stays where it is (a zero ascent), as in the loop.
        scale = rho / torch.where(norm > 0, norm, torch.ones_like(norm))
        return grad(loss)(shifted(params, {name: scale * g for name, g in grads.items()}), *batch), value


class DPFedSAM(ClientLevelDPStrategy):
    name = "dp-fedsam"
    description = "DP-FedSAM: local SAM steps (ascent radius rho), then clipping and noise of the whole update"
    local_update_rule = SAMLocalUpdate
    options = {"rho": 0.1}
