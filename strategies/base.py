"""The DP-aware base every strategy builds on: a server part and a client part.

A strategy is a ``flwr.serverapp.strategy.Strategy`` subclass of
:class:`ClientLevelDPStrategy` whose ``local_update_rule`` names its client part, a
:class:`LocalUpdateRule`. The platform owns everything privacy rests on and a
strategy cannot override it (:data:`PLATFORM_METHODS`): Poisson sampling, flat
clipping of the private part of each update (on the client, and again on the
server when it adds the noise), Gaussian noise on the sum, the fixed-denominator
mean, accounting and the budget. A strategy says only what is new: how a local
step's direction is formed, which part of the update is public (computed by the
server from released state only, so a wrong declaration costs accuracy, never
privacy), how the released mean is post-processed, what server state it keeps,
and its own options.
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

from dpfl.errors import UsageError
from dpfl.privacy.accounting import create_accountant
from dpfl.privacy.clipping import flat_clip
from dpfl.privacy.noise import client_noise_std, noisy_mean
from dpfl.privacy.sampling import fixed_size_sample, poisson_sample

Tensors = dict[str, torch.Tensor]
OptionValue = bool | int | float | str

# Record keys of the train messages.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
UPDATE_KEY = "update"
METRICS_KEY = "metrics"

# Clipping modes: "flat" is the sound client-level DP mechanism; "paper" reproduces
# the DP-FedPGN reference code (per-tensor clipping to the client's median tensor
# norm, client-side noise, fixed-size sampling), which has no formal guarantee.
CLIPPING_MODES = ("flat", "paper")
PAPER_MODE_WARNING = (
    "clipping=paper reproduces the reference code's per-tensor, data-dependent clipping with "
    "fixed-size sampling: it carries NO formal differential-privacy guarantee, and epsilon is not valid"
)

# Methods that implement the privacy mechanism: a strategy may not override them.
PLATFORM_METHODS = frozenset(
    {"configure_train", "aggregate_train", "aggregate_updates", "configure_evaluate", "aggregate_evaluate", "start"}
)


class BudgetExhausted(PrivacyBudgetExhausted):
    """The next round would spend more than the ε budget; the run stops before it."""


class LocalUpdateRule:
    """Client part of a strategy: how each local SGD step's direction is formed.

    The platform's loop (``dpfl.client.training.local_sgd``) calls
    :meth:`compute_gradient` on a mini-batch, clips that raw gradient for stability,
    calls :meth:`direction` to turn it into the step direction held in ``p.grad``,
    and takes a plain SGD step (momentum 0, so a public part stays exact).
    ``config`` is the round's train config (the strategy's options included);
    ``records`` the message's other records as tensors.
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
    part back, post-processes, and sets x ← x − Δ̄. One Poisson-subsampled Gaussian
    per round goes to the accountant, also for a round in which nobody was sampled.
    A strategy with ``private = False`` is a reference curve without DP: no clipping,
    no noise, a plain mean over the clients that reported, no accounting.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    local_update_rule: ClassVar[type[LocalUpdateRule]] = LocalUpdateRule
    # The strategy's own options with their defaults, set with `--strategy-option k=v`.
    options: ClassVar[dict[str, OptionValue]] = {}
    private: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        overridden = PLATFORM_METHODS & set(vars(cls))
        if overridden:
            raise TypeError(
                f"{cls.__qualname__} overrides {', '.join(sorted(overridden))}, which the platform owns "
                "(sampling, clipping, noise and accounting); use the strategy hooks instead"
            )

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
        clipping: str = "flat",
        accountant: str = "rdp",
        seed: int = 0,
        option_values: Mapping[str, OptionValue] | None = None,
    ) -> None:
        super().__init__()
        self.noise_multiplier = noise_multiplier if self.private else 0.0
        self.clip_norm = clip_norm if self.private else math.inf
        self.sample_rate = sample_rate
        self.num_clients = num_clients
        self.expected_clients = sample_rate * num_clients
        self.local_steps = local_steps
        self.lr = lr
        self.lr_decay = lr_decay
        self.max_epsilon = max_epsilon
        self.noise_placement = noise_placement
        self.clipping = clipping
        self.option_values = {**self.options, **(option_values or {})}
        self.accountant = create_accountant(accountant, delta)
        self.current_round = 0
        self.global_arrays: ArrayRecord | None = None
        self.last_metrics: dict[str, float] = {}
        self._sampling_rng = np.random.default_rng(seed)
        self._noise_rng = torch.Generator().manual_seed(seed + 1)

    @classmethod
    def from_settings(cls, settings: Any, *, noise_multiplier: float, local_steps: int) -> ClientLevelDPStrategy:
        """Build from the run's ``RunSettings`` and its ``strategy-options``."""
        return cls(
            noise_multiplier=noise_multiplier,
            clip_norm=settings.clip_norm,
            sample_rate=settings.sample_rate,
            num_clients=settings.num_clients,
            local_steps=local_steps,
            lr=settings.lr,
            lr_decay=settings.lr_decay,
            delta=settings.delta,
            max_epsilon=settings.budget,
            noise_placement=settings.noise_placement,
            clipping=settings.clipping,
            accountant=settings.accountant,
            seed=settings.seed,
            option_values=cls.parse_options(settings.strategy_options),
        )

    @classmethod
    def parse_options(cls, text: str) -> dict[str, OptionValue]:
        """``"rho=0.1 ls-sigma=2"`` → typed values of this strategy's declared options."""
        values: dict[str, OptionValue] = {}
        for item in text.split():
            key, sep, raw = item.partition("=")
            if not sep or key not in cls.options:
                allowed = ", ".join(cls.options) or "none"
                raise UsageError(f"strategy {cls.name} has no option {item!r}; its options: {allowed}")
            default = cls.options[key]
            try:
                values[key] = (raw.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)(raw)
            except ValueError:
                raise UsageError(f"strategy option {key} must be {type(default).__name__}, got {raw!r}") from None
        return values

    @property
    def epsilon_valid(self) -> bool:
        return self.private and self.clipping == "flat"

    # --- what a strategy may override -------------------------------------------------

    def extra_records(self, server_round: int) -> dict[str, ArrayRecord]:
        """Records sent beside the global model (e.g. DP-FedPGN's global direction)."""
        return {}

    def round_config(self, server_round: int) -> dict[str, OptionValue]:
        """Train-config entries for the client part; by default the strategy's options."""
        return dict(self.option_values)

    def public_update(self, server_round: int, like: Tensors) -> Tensors | None:
        """The public part of every client's Δ this round, added back to the mean."""
        return None

    def transform_update(self, server_round: int, mean_delta: Tensors) -> Tensors:
        """Post-process the released mean Δ̄ before it is applied (e.g. smoothing)."""
        return mean_delta

    def after_aggregate(self, server_round: int, mean_delta: Tensors) -> None:
        """Update server state from the applied mean Δ̄ (post-processing only)."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""

    # --- the platform's part ----------------------------------------------------------

    def round_lr(self, server_round: int) -> float:
        """η_t = η₀·decay^(t+1) with t = server_round − 1: decayed before round 1 too."""
        return self.lr * self.lr_decay**server_round

    def _sample(self, nodes: list[int]) -> list[int]:
        if self.clipping == "paper":
            return fixed_size_sample(nodes, max(1, round(self.expected_clients)), self._sampling_rng)
        return poisson_sample(nodes, self.sample_rate, self._sampling_rng)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.epsilon_valid:
            projected = self.accountant.epsilon_after_step(self.noise_multiplier, self.sample_rate)
            if projected > self.max_epsilon:
                raise BudgetExhausted(
                    f"round {server_round} would raise epsilon to {projected:.3f}, over the budget "
                    f"{self.max_epsilon:g} (spent so far: {self.accountant.epsilon():.3f})"
                )
        elif self.private:
            log(WARNING, PAPER_MODE_WARNING)
        self.global_arrays = arrays
        nodes = sorted(grid.get_node_ids())
        sampled = self._sample(nodes)
        train_config = ConfigRecord(
            {
                **dict(config),
                "server-round": server_round,
                "lr": self.round_lr(server_round),
                "local-steps": self.local_steps,
                "clipping": self.clipping,
                "clip-norm": self.clip_norm if self.private else 0.0,  # 0: no clipping
                "noise-multiplier": self.noise_multiplier,
                "sample-size": max(1, round(self.expected_clients)),
                "client-noise-std": (
                    client_noise_std(self.noise_multiplier, self.clip_norm, self.expected_clients)
                    if self.private and self.noise_placement == "client"
                    else 0.0
                ),
                **self.round_config(server_round),
            }
        )
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: train_config, **self.extra_records(server_round)})
        log(INFO, "configure_train: sampled %d of %d nodes (q=%g)", len(sampled), len(nodes), self.sample_rate)
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node) for node in sampled]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.global_arrays is not None, "aggregate_train before configure_train"
        x = self.global_arrays.to_torch_state_dict()
        updates, metrics = [], []
        for reply in replies:
            update = self._valid_update(reply, x)
            if update is not None:
                updates.append(update)
                metrics.append(reply.content[METRICS_KEY])
        new_x = self.aggregate_updates(server_round, x, updates)
        norms = [float(m["update-norm"]) for m in metrics]
        clip_norm = self.clip_norm if self.clipping == "flat" else math.inf
        self.last_metrics = {
            **self.last_metrics,
            "update-norm-mean": float(np.mean(norms)) if norms else 0.0,
            "update-norm-max": float(np.max(norms)) if norms else 0.0,
            "clipped-fraction": float(np.mean([n > clip_norm for n in norms])) if norms else 0.0,
            "train-loss": float(np.mean([float(m["train-loss"]) for m in metrics])) if metrics else math.nan,
        }
        local_epsilons = [float(m["local-epsilon"]) for m in metrics if "local-epsilon" in m]
        if local_epsilons:  # sample-level DP inside clients (--local-dp): the worst client
            self.last_metrics["local-epsilon-max"] = max(local_epsilons)
        return ArrayRecord(new_x), MetricRecord(self.last_metrics)

    def aggregate_updates(self, server_round: int, x: Tensors, updates: list[Tensors]) -> Tensors:
        """The new global weights from the clients' private updates; accounts the round."""
        total = {name: torch.zeros_like(t) for name, t in x.items()}
        for update in updates:
            if self.private and self.clipping == "flat" and self.noise_placement == "server":
                # Re-clip: the sensitivity bound holds whatever a client sent.
                update, _ = flat_clip(update, self.clip_norm)
            for name, t in update.items():
                total[name] += t
        if self.epsilon_valid:
            mean_delta = noisy_mean(
                total,
                noise_multiplier=self.noise_multiplier,
                clip_norm=self.clip_norm,
                placement=self.noise_placement,
                reported=len(updates),
                expected_clients=self.expected_clients,
                generator=self._noise_rng,
            )
            self.accountant.step(self.noise_multiplier, self.sample_rate)
        else:
            # Paper mode: the clients' own noise, a plain mean over the fixed sample;
            # no DP: a plain mean over those who reported.
            denominator = max(1, round(self.expected_clients)) if self.private else max(1, len(updates))
            mean_delta = {name: t / denominator for name, t in total.items()}
        public = self.public_update(server_round, x)
        if public is not None:
            mean_delta = {name: t + public[name] for name, t in mean_delta.items()}
        mean_delta = self.transform_update(server_round, mean_delta)
        self.after_aggregate(server_round, mean_delta)
        self.current_round = server_round
        epsilon, order = self.accountant.privacy_spent() if self.epsilon_valid else (math.nan, math.nan)
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
        if not self.private:
            log(INFO, "%s: no differential privacy (a reference curve), q=%g", self.name, self.sample_rate)
            return
        log(
            INFO,
            "%s: client-level DP, sigma=%.4g, C=%g, q=%g (expected %.1f of %d clients), clipping %s, "
            "noise on the %s, %s accountant, delta=%g, budget epsilon=%g, options %s",
            self.name, self.noise_multiplier, self.clip_norm, self.sample_rate, self.expected_clients,
            self.num_clients, self.clipping, self.noise_placement, self.accountant.mechanism,
            self.accountant.delta, self.max_epsilon,
            self.option_values,
        )  # fmt: skip

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
