"""DP-FedSAM (Shi et al. 2023): local sharpness-aware minimisation, then the DP step."""

from __future__ import annotations

import torch
from torch import nn

from dpfl.strategies.base import ClientLevelDPStrategy, LocalUpdateRule


class SAMLocalUpdate(LocalUpdateRule):
    """SAM's gradient: ascend ρ·g/‖g‖, take the gradient there, come back."""

    def compute_gradient(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        rho = float(self.config["rho"])
        loss = super().compute_gradient(model, inputs, targets)
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        if grad_norm == 0:
            return loss
        with torch.no_grad():
            ascent = [rho * p.grad / grad_norm for p in params]
            for p, e in zip(params, ascent):
                p.add_(e)
        model.zero_grad()
        super().compute_gradient(model, inputs, targets)
        with torch.no_grad():
            for p, e in zip(params, ascent):
                p.sub_(e)
        return loss


class DPFedSAM(ClientLevelDPStrategy):
    name = "dp-fedsam"
    description = "DP-FedSAM: local SAM steps (ascent radius rho), then clipping and noise of the whole update"
    local_update_rule = SAMLocalUpdate
    options = {"rho": 0.1}
