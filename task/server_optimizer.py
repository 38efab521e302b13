"""The server's optimiser: how the released mean update Δ̄ moves the global model.

FedOpt (Reddi et al., ICLR 2021): Δ̄ = mean of x − y_i is a pseudo-gradient, and
the server may apply it with any first-order optimiser instead of x ← x − Δ̄.
``sgd`` at lr 1 is plain FedAvg; ``momentum`` is FedAvgM (Hsu et al. 2019);
``adam`` is FedAdam. The optimiser only reads the released Δ̄ (already clipped,
noised and averaged), so under client-level DP it is post-processing: it costs
no privacy and is sound for every strategy. The clients' local optimiser is not
touched (plain SGD, momentum 0, which DP-FedPGN's exact public part needs).

The steps are torch.optim's own, run on the global weights with Δ̄ as their
gradient; pure math, no Flower and no I/O. It sits in ``task/`` beside the models'
recipes, which choose it, so that the run settings can check its name without
importing the strategies that run it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

Tensors = dict[str, torch.Tensor]

SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")
# FedAvgM's and FedAdam's usual values (Reddi et al. 2021, Sec. 5: β₁ = 0.9,
# β₂ = 0.99; ε, their adaptivity τ, 1e-3 so coordinates with almost no signal,
# and under DP mostly noise, are not blown up to full steps).
SERVER_MOMENTUM = 0.9
SERVER_ADAM_BETAS = (0.9, 0.99)
SERVER_ADAM_EPS = 1e-3


class ServerOptimizer:
    """x ← step(x, Δ̄) with ``name`` ∈ :data:`SERVER_OPTIMIZERS` at learning rate ``lr``."""

    def __init__(self, name: str, lr: float) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {name!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}")
        self.name = name
        self.lr = lr
        self.params: dict[str, torch.nn.Parameter] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.pending_state: dict[str, Any] | None = None

    def _build(self, x: Tensors) -> None:
        # One Parameter per floating-point entry of the state dict, in a fixed order so
        # the optimiser's saved state (indexed by position) matches after a resume.
        self.params = {name: torch.nn.Parameter(t.detach().clone()) for name, t in sorted(x.items()) if t.is_floating_point()}
        params = list(self.params.values())
        if not params:  # nothing but counters: every entry takes the plain step
            return
        if self.name == "adam":
            self.optimizer = torch.optim.Adam(params, lr=self.lr, betas=SERVER_ADAM_BETAS, eps=SERVER_ADAM_EPS)
        else:
            momentum = SERVER_MOMENTUM if self.name == "momentum" else 0.0
            self.optimizer = torch.optim.SGD(params, lr=self.lr, momentum=momentum)
        if self.pending_state is not None:
            self.optimizer.load_state_dict(self.pending_state)
            self.pending_state = None

    def step(self, x: Tensors, mean_delta: Tensors) -> Tensors:
        """The new global weights from x and the released pseudo-gradient Δ̄."""
        if self.optimizer is None:
            self._build(x)
        if self.optimizer is None:
            return {name: x[name] - mean_delta[name] for name in x}
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(x[name])
                param.grad = mean_delta[name].to(param.dtype).clone()
        self.optimizer.step()
        # Entries that are not weights (integer counters) take the plain step.
        return {name: self.params[name].detach().clone() if name in self.params else x[name] - mean_delta[name]
                for name in x}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return self.pending_state or {}
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the moments; applied when the first step sees the weights' shapes."""
        self.pending_state = dict(state) or None
        self.optimizer = None


__all__ = ["SERVER_OPTIMIZERS", "ServerOptimizer"]
