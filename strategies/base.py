"""The DP-aware base every strategy builds on: a server part and a client part.

A strategy is a ``flwr.serverapp.strategy.Strategy`` subclass of
:class:`ClientLevelDPStrategy` whose ``local_update_rule`` names its client part, a
:class:`LocalUpdateRule`. The platform owns everything privacy rests on and a
strategy cannot bypass it: Poisson sampling, flat clipping of the private part of
each update (on the client, and again on the server when it adds the noise),
Gaussian noise on the sum, the fixed-denominator mean, accounting and the budget.
A strategy says only what is new: how a local step's direction is formed, which
part of the update is public (data-independent), and what server state it keeps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log
from torch import nn

from dpfl.privacy.accounting import ClientLevelAccountant
from dpfl.privacy.clipping import flat_clip
from dpfl.privacy.noise import client_noise_std, noisy_mean
from dpfl.privacy.sampling import poisson_sample

Tensors = dict[str, torch.Tensor]

# Record keys of the train messages.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
UPDATE_KEY = "update"
METRICS_KEY = "metrics"


class BudgetExhausted(PrivacyBudgetExhausted):
    """The next round would spend more than the ε budget; the run stops before it."""


class LocalUpdateRule:
    """Client part of a strategy: how each local SGD step's direction is formed.

    The platform's loop (``dpfl.client.training.local_sgd``) calls
    :meth:`compute_gradient` on a mini-batch, clips that raw gradient for stability,
    calls :meth:`direction` to turn it into the step direction held in ``p.grad``,
    and takes a plain SGD step (momentum 0, so the public part below stays exact).
    ``config`` is the round's train config; ``records`` the message's other records.
    """

    def __init__(self, config: Mapping[str, Any], records: Mapping[str, Tensors]) -> None:
        self.config = config
        self.records = records

    def compute_gradient(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Fill ``p.grad`` with the mini-batch gradient; return the loss."""
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        return float(loss.detach())

    def direction(self, model: nn.Module) -> None:
        """Turn the (clipped) gradient in ``p.grad`` into the step direction, in place."""

    def public_part(self, steps: int, lr: float) -> Tensors | None:
        """The data-independent part of Δ = x − y after ``steps`` steps at ``lr``, if any."""
        return None


class ClientLevelDPStrategy(Strategy):
    """Client-level DP federated averaging of the private part of local updates.

    Per round: sample clients by Poisson(q); each trains K local steps from x,
    forms Δ = x − y, removes the strategy's public part, clips the rest to C and
    (with client-side placement) adds its share of the noise; the server sums, adds
    the noise (or its shortfall), divides by the expected count qN, adds the public
    part back and sets x ← x − Δ̄. One Poisson-subsampled Gaussian per round goes to
    the accountant, also for a round in which nobody was sampled.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    local_update_rule: ClassVar[type[LocalUpdateRule]] = LocalUpdateRule

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        sample_rate: float,
        num_clients: int,
        local_steps: int,
        lr: float,
        lr_decay: float,
        delta: float,
        max_epsilon: float = math.inf,
        noise_placement: str = "server",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.sample_rate = sample_rate
        self.num_clients = num_clients
        self.expected_clients = sample_rate * num_clients
        self.local_steps = local_steps
        self.lr = lr
        self.lr_decay = lr_decay
        self.max_epsilon = max_epsilon
        self.noise_placement = noise_placement
        self.accountant = ClientLevelAccountant(delta)
        self.current_round = 0
        self.global_arrays: ArrayRecord | None = None
        self.last_metrics: dict[str, float] = {}
        self._sampling_rng = np.random.default_rng(seed)
        self._noise_rng = torch.Generator().manual_seed(seed + 1)

    @classmethod
    def from_settings(cls, settings: Any, *, noise_multiplier: float, local_steps: int) -> ClientLevelDPStrategy:
        """Build from the run's ``RunSettings``; a strategy with options of its own extends this."""
        return cls(**cls._common_kwargs(settings, noise_multiplier, local_steps))

    @staticmethod
    def _common_kwargs(settings: Any, noise_multiplier: float, local_steps: int) -> dict[str, Any]:
        return {
            "noise_multiplier": noise_multiplier,
            "clip_norm": settings.clip_norm,
            "sample_rate": settings.sample_rate,
            "num_clients": settings.num_clients,
            "local_steps": local_steps,
            "lr": settings.lr,
            "lr_decay": settings.lr_decay,
            "delta": settings.delta,
            "max_epsilon": settings.budget,
            "noise_placement": settings.noise_placement,
            "seed": settings.seed,
        }

    # --- what a strategy may override -------------------------------------------------

    def extra_records(self, server_round: int) -> dict[str, ArrayRecord]:
        """Records sent beside the global model (e.g. DP-FedPGN's global direction)."""
        return {}

    def round_config(self, server_round: int) -> dict[str, Any]:
        """Strategy-specific train-config entries."""
        return {}

    def public_update(self, server_round: int, like: Tensors) -> Tensors | None:
        """The public part of every client's Δ this round, added back to the mean."""
        return None

    def after_aggregate(self, server_round: int, mean_delta: Tensors) -> None:
        """Update server state from the released mean Δ̄ (post-processing only)."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""

    # --- the platform's part ----------------------------------------------------------

    def round_lr(self, server_round: int) -> float:
        """η_t = η₀·decay^(t+1) with t = server_round − 1: decayed before round 1 too."""
        return self.lr * self.lr_decay**server_round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        projected = self.accountant.epsilon_after_step(self.noise_multiplier, self.sample_rate)
        if projected > self.max_epsilon:
            raise BudgetExhausted(
                f"round {server_round} would raise epsilon to {projected:.3f}, over the budget "
                f"{self.max_epsilon:g} (spent so far: {self.accountant.epsilon():.3f})"
            )
        self.global_arrays = arrays
        nodes = sorted(grid.get_node_ids())
        sampled = poisson_sample(nodes, self.sample_rate, self._sampling_rng)
        lr = self.round_lr(server_round)
        train_config = ConfigRecord(
            {
                **dict(config),
                "server-round": server_round,
                "strategy": self.name,
                "lr": lr,
                "local-steps": self.local_steps,
                "clip-norm": self.clip_norm,
                "client-noise-std": (
                    client_noise_std(self.noise_multiplier, self.clip_norm, self.expected_clients)
                    if self.noise_placement == "client"
                    else 0.0
                ),
                **self.round_config(server_round),
            }
        )
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: train_config, **self.extra_records(server_round)})
        log(INFO, "configure_train: Poisson sampled %d of %d nodes (q=%g)", len(sampled), len(nodes), self.sample_rate)
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node) for node in sampled]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.global_arrays is not None, "aggregate_train before configure_train"
        x = self.global_arrays.to_torch_state_dict()
        updates, norms, losses = [], [], []
        for reply in replies:
            update = self._valid_update(reply, x)
            if update is None:
                continue
            metrics = reply.content[METRICS_KEY]
            norms.append(float(metrics["update-norm"]))
            losses.append(float(metrics["train-loss"]))
            updates.append(update)
        new_x = self.aggregate_updates(server_round, x, updates)
        self.last_metrics = {
            **self.last_metrics,
            "update-norm-mean": float(np.mean(norms)) if norms else 0.0,
            "update-norm-max": float(np.max(norms)) if norms else 0.0,
            "clipped-fraction": float(np.mean([n > self.clip_norm for n in norms])) if norms else 0.0,
            "train-loss": float(np.mean(losses)) if losses else math.nan,
        }
        return ArrayRecord(new_x), MetricRecord(self.last_metrics)

    def aggregate_updates(self, server_round: int, x: Tensors, updates: list[Tensors]) -> Tensors:
        """The new global weights from the clients' private updates; accounts the round."""
        clipped_sum = {name: torch.zeros_like(t) for name, t in x.items()}
        for update in updates:
            if self.noise_placement == "server":
                # Re-clip: the sensitivity bound holds whatever a client sent.
                update, _ = flat_clip(update, self.clip_norm)
            for name, t in update.items():
                clipped_sum[name] += t
        mean_delta = noisy_mean(
            clipped_sum,
            noise_multiplier=self.noise_multiplier,
            clip_norm=self.clip_norm,
            placement=self.noise_placement,
            reported=len(updates),
            expected_clients=self.expected_clients,
            generator=self._noise_rng,
        )
        public = self.public_update(server_round, x)
        if public is not None:
            mean_delta = {name: t + public[name] for name, t in mean_delta.items()}
        self.after_aggregate(server_round, mean_delta)
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        self.current_round = server_round
        epsilon, order = self.accountant.privacy_spent()
        self.last_metrics = {
            "epsilon": epsilon,
            "rdp-order": order,
            "sampled": len(updates),
            "lr": self.round_lr(server_round),
            "noise-multiplier": self.noise_multiplier,
        }
        return {name: x[name] - mean_delta[name] for name in x}

    def _valid_update(self, reply: Message, x: Tensors) -> Tensors | None:
        # A failed or malformed reply is dropped: leaving a client out is safe for DP.
        if reply.has_error():
            log(WARNING, "dropping a reply with error: %s", reply.error.reason)
            return None
        update = reply.content[UPDATE_KEY].to_torch_state_dict()
        if update.keys() != x.keys() or any(update[k].shape != x[k].shape for k in x):
            log(WARNING, "dropping a reply whose update does not match the model's tensors")
            return None
        return update

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # The server evaluates the global model centrally on held-out data.
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(
            INFO,
            "%s: client-level DP, sigma=%.4g, C=%g, q=%g (expected %.1f of %d clients), "
            "noise on the %s, delta=%g, budget epsilon=%g",
            self.name,
            self.noise_multiplier,
            self.clip_norm,
            self.sample_rate,
            self.expected_clients,
            self.num_clients,
            self.noise_placement,
            self.accountant.delta,
            self.max_epsilon,
        )

    def state_dict(self) -> dict[str, Any]:
        """The server state beside the global weights, in one serialisable place."""
        return {
            "round": self.current_round,
            "accountant": self.accountant.state_dict(),
            "sampling-rng": self._sampling_rng.bit_generator.state,
            "noise-rng": self._noise_rng.get_state().tolist(),
            "strategy": self.extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.current_round = int(state["round"])
        self.accountant.load_state_dict(state["accountant"])
        self._sampling_rng.bit_generator.state = state["sampling-rng"]
        self._noise_rng.set_state(torch.tensor(state["noise-rng"], dtype=torch.uint8))
        self.load_extra_state(state["strategy"])
