"""The DP-aware base every strategy builds on: a server part and a client part.

A strategy is a ``flwr.serverapp.strategy.Strategy`` subclass of
:class:`ClientLevelDPStrategy` whose ``local_update_rule`` names its client part, a
:class:`LocalUpdateRule`. Everything privacy rests on is decided by
:mod:`dpfl.privacy.mechanism` (sampling, what clients are told, clipping, noise,
screening of replies, the fixed-denominator mean, accounting, the budget); this
module is its Flower glue, whose methods a strategy cannot override
(:data:`PLATFORM_METHODS`) and whose train-config and record keys it cannot
shadow (:data:`PLATFORM_CONFIG_KEYS`, :data:`PLATFORM_RECORD_KEYS`). A strategy
says only what is new: how a local
step's direction is formed, which part of the update is public (computed by the
server from released state only, so a wrong declaration costs accuracy, never
privacy), how the released mean is post-processed, what server state it keeps,
and its own options.

The platform's state (the mechanism, the budget, the round's released metrics and
its server-private diagnostics) is read-only to a strategy, and a strategy class
whose code names the mechanism or the private diagnostics is refused when it is
defined (:func:`platform_state_references`). This guards against mistakes: plugin
code runs inside the server process with its rights, so its author is trusted
(docs/plugins.md).
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log
from torch import nn
from torch.func import grad_and_value

from dpfl.errors import UsageError
from dpfl.privacy.accountants import create_accountant
from dpfl.privacy.accountants.skellam import DistributedSkellamAccountant
from dpfl.privacy.distributed_dp import DistributedDPParams, honest_sum_norm_bound
from dpfl.privacy.adaptive_clipping import AdaptiveClipping
from dpfl.flat import Layout
from dpfl.privacy.mechanism import (
    INSTRUCTION_KEYS,
    PAPER_MODE_WARNING,
    REPRODUCIBLE_NOISE_WARNING,
    UNCLIPPED,
    ClientLevelMechanism,
    MechanismParams,
)
from dpfl.privacy.participation import ParticipationSchema
from dpfl.privacy.randomness import Randomness
from dpfl.records import record_tensors, tensor_record
from dpfl.settings import RunSettings
from dpfl.strategies.secure_aggregation import SECAGG_KEY, SecureRound
from dpfl.task.server_optimizer import ServerOptimizer

Tensors = dict[str, torch.Tensor]
OptionValue = bool | int | float | str

# Record keys of the train messages.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
UPDATE_KEY = "update"
METRICS_KEY = "metrics"
# Public metric of a run with min-replies: 1 when the round's noisy reply count was below it.
UPDATE_SKIPPED = "update-skipped"
# Train-config keys the platform sets beside the mechanism's instructions.
SERVER_ROUND_KEY = "server-round"
LR_KEY = "lr"
LOCAL_STEPS_KEY = "local-steps"
# Keys a strategy's options, round_config or extra_records may not use: the platform's
# always win, and a collision is refused when the strategy is loaded.
PLATFORM_CONFIG_KEYS = INSTRUCTION_KEYS | {SERVER_ROUND_KEY, LR_KEY, LOCAL_STEPS_KEY}
PLATFORM_RECORD_KEYS = frozenset({ARRAYS_KEY, CONFIG_KEY, UPDATE_KEY, METRICS_KEY, SECAGG_KEY})

# Methods that implement the privacy mechanism or what it relies on (sampling,
# screening of replies, the learning-rate schedule, whether ε is valid, the
# construction from the run's settings): a strategy may not override them.
PLATFORM_METHODS = frozenset(
    {"configure_train", "aggregate_train", "aggregate_updates", "configure_evaluate", "aggregate_evaluate", "start",
     "from_settings", "round_lr", "screen_reply", "epsilon_valid", "state_dict", "load_state_dict", "public_metrics",
     "has_public_part", "resolved_settings", "final_model_messages",
     # read-only views of the platform's state
     "mechanism", "max_epsilon", "last_metrics", "private_diagnostics", "noise_multiplier", "clip_norm",
     "sample_rate", "num_clients", "expected_clients", "accountant"}
)  # fmt: skip
# What a strategy's own code (and that of every class it inherits from but the base) may not
# name: the mechanism (its randomness, parameters and sample), its accountant, the round's
# server-private facts, and the base class's private attributes.
PLATFORM_PRIVATE_NAMES = frozenset(
    {"mechanism", "accountant", "private_diagnostics", "_ClientLevelDPStrategy__platform"}
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

    A rule may also have a functional form, :meth:`functional_gradient` and
    :meth:`functional_direction`: the same computation as pure functions of named
    tensors, which the platform runs under ``torch.func.vmap`` to train a round's
    clients at once (``dpfl.client.cohort``). A rule that overrides a loop hook without
    its twin (at the same or a more derived class) has no functional form
    (:meth:`has_functional_form`) and runs in the loop.
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

    # --- the functional form: twins of the two loop hooks -----------------------------

    def functional_gradient(self, loss: LossFunction, params: Tensors, batch: Batch) -> tuple[Tensors, torch.Tensor]:
        """:meth:`compute_gradient` as a pure function: (the gradient, the loss) at ``params``.

        ``loss(params, *batch)`` is one client's mean loss on its mini-batch. The
        platform calls this under ``torch.func.vmap`` over a cohort's clients, so it
        may use ``torch.func`` transforms and tensor operations, but no in-place
        change of its inputs, no ``.item()`` and no Python branch on a tensor's value
        (``torch.where`` instead).
        """
        return grad_and_value(loss)(params, *batch)

    def functional_direction(self, grads: Tensors) -> Tensors:
        """:meth:`direction` as a pure function of the (clipped) gradient."""
        return grads

    @classmethod
    def has_functional_form(cls) -> bool:
        """Whether both loop hooks have their functional twin defined where they are, or below."""
        twins = (("compute_gradient", "functional_gradient"), ("direction", "functional_direction"))
        return all(issubclass(defining_class(cls, twin), defining_class(cls, hook)) for hook, twin in twins)


# One client's mini-batch as the functional form sees it: inputs, targets and the
# examples' weights in its mean loss (1/b for each of its b examples, 0 for padding).
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
LossFunction = Callable[..., torch.Tensor]


def defining_class(cls: type, name: str) -> type:
    return next(klass for klass in cls.__mro__ if name in vars(klass))


def l2_norm(tensors: Tensors) -> torch.Tensor:
    """The L2 norm of named tensors taken together, as a tensor (the functional form's
    global norm; :func:`dpfl.privacy.clipping.global_l2_norm` is the mechanism's, in float64)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors.values()]))


def shifted(params: Tensors, shift: Mapping[str, torch.Tensor]) -> Tensors:
    """``params`` moved by ``shift`` where it has an entry: :func:`gradient_at_shift`'s point, functionally."""
    return {name: p + shift[name] if name in shift else p for name, p in params.items()}


def gradient_at_shift(model: nn.Module, shift: Mapping[str, torch.Tensor], compute: Callable[[], float]) -> float:
    """``compute()`` (a gradient) with the named parameters moved by ``shift``, then moved back.

    The ascent step of sharpness-aware rules (DP-FedSAM's ρ·g/‖g‖, DP-FedPGN's ρ·c/‖c‖).
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, step in shift.items():
            params[name].add_(step)
    loss = compute()
    with torch.no_grad():
        for name, step in shift.items():
            params[name].sub_(step)
    return loss


class ClientLevelDPStrategy(Strategy):
    """Client-level DP federated averaging of the private part of local updates.

    Per round: sample clients by Poisson(q); each trains K local steps from x,
    forms Δ = x − y, removes the strategy's public part, clips the rest to C and
    (with client-side placement) adds its share of the noise; the server screens
    the replies, sums, adds the noise (or its shortfall), divides by the expected
    count qN, adds the public part back, post-processes, and moves x by Δ̄ with the
    server optimiser (x ← x − Δ̄ for sgd at lr 1; post-processing of the release). The
    mechanism itself (sampling, instructions, clipping, noise, denominator,
    accounting) is :class:`dpfl.privacy.mechanism.ClientLevelMechanism`; this class
    is its Flower glue and the strategy hooks. A strategy with ``private = False``
    is a reference curve without DP.
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
                "(sampling, clipping, noise, accounting and what they rely on); use the strategy hooks instead"
            )
        named = platform_state_references(cls)
        if named:
            raise TypeError(
                f"{cls.__qualname__} uses {', '.join(named)}, the platform's privacy state (the mechanism's "
                "randomness, parameters and sample, the server-private diagnostics); a strategy reads only "
                "the public properties (noise_multiplier, clip_norm, sample_rate, ...)"
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
        reproducible_noise: bool = False,
        adaptive_clipping: AdaptiveClipping | None = None,
        min_replies: int = 0,
        reply_count_noise: float = 0.0,
        seed: int = 0,
        option_values: Mapping[str, OptionValue] | None = None,
        server_optimizer: str = "sgd",
        server_lr: float = 1.0,
        schema: ParticipationSchema | None = None,
        secure_aggregation: DistributedDPParams | None = None,
        secagg_degree: int = 0,
    ) -> None:
        super().__init__()
        if secure_aggregation is not None and not self.private:
            raise ValueError(f"aggregation=secagg needs a private strategy: {self.name} adds no noise and "
                             "keeps no clip norm; use dp-fedavg or another private strategy")  # fmt: skip
        params = MechanismParams(
            noise_multiplier=noise_multiplier if self.private else 0.0,
            clip_norm=clip_norm if self.private else math.inf,
            sample_rate=sample_rate,
            num_clients=num_clients,
            delta=delta,
            noise_placement=noise_placement,
            clipping=clipping,
            private=self.private,
            reproducible_noise=reproducible_noise,
            adaptive_clipping=adaptive_clipping if self.private else None,
            min_replies=min_replies,
            reply_count_noise=reply_count_noise,
            schema=schema,
            secure_aggregation=secure_aggregation,
        )
        # The seed reaches the privacy randomness only when the user asked for reproducible noise.
        randomness = Randomness(seed if reproducible_noise else None)
        # Secure aggregation's distributed Skellam mechanism has its own accountant.
        ledger = (DistributedSkellamAccountant(delta, params.secure_aggregation) if params.secure_aggregation
                  else create_accountant(accountant, delta))  # fmt: skip
        self.__platform = _PlatformState(
            mechanism=ClientLevelMechanism(params, ledger, randomness), max_epsilon=max_epsilon,
            secagg_degree=secagg_degree,
        )
        self.local_steps = local_steps
        self.lr = lr
        self.lr_decay = lr_decay
        self.option_values = {**self.options, **(option_values or {})}
        # How the released Δ̄ moves x (post-processing): x − Δ̄ for sgd at lr 1.
        self.server_optimizer = ServerOptimizer(server_optimizer, server_lr)
        self.current_round = 0
        self.global_arrays: ArrayRecord | None = None

    @classmethod
    def has_public_part(cls) -> bool:
        """Whether the server adds a public part back to the released mean (the strategy
        overrides :meth:`public_update`)."""
        return cls.public_update is not ClientLevelDPStrategy.public_update

    @classmethod
    def resolved_settings(cls, settings: RunSettings) -> RunSettings:
        """``settings`` with what the user did not set and the model's recipe gives for this
        strategy: the server step (a strategy with a public part gets the recipe's step for
        one) and the defaults of the options this strategy declares (docs/vit.md). What
        config.json records and the strategy is built with."""
        return settings.with_server_step(cls.has_public_part()).with_strategy_option_defaults(cls.options)

    @classmethod
    def from_settings(
        cls, settings: RunSettings, *, noise_multiplier: float, local_steps: int, update_size: int = 0
    ) -> ClientLevelDPStrategy:
        """Build from the run's ``RunSettings`` (server step resolved) and its ``strategy-options``;
        ``update_size`` (the model's number of values) is needed under secure aggregation."""
        settings = cls.resolved_settings(settings)
        strategy = cls(
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
            reproducible_noise=settings.reproducible_noise,
            adaptive_clipping=settings.adaptive_clipping(noise_multiplier),
            min_replies=settings.min_replies,
            reply_count_noise=settings.reply_count_noise,
            seed=settings.seed,
            option_values=cls.parse_options(settings.strategy_options),
            server_optimizer=settings.server_optimizer,
            server_lr=settings.server_lr,
            schema=settings.participation_schema(),
            secure_aggregation=distributed_params(settings, noise_multiplier, update_size),
            secagg_degree=settings.secure_aggregation_shape()[1],
        )
        strategy.apply_settings(settings)
        return strategy

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

    # The platform's state, read-only to a strategy (assigning any of these raises).
    @property
    def mechanism(self) -> ClientLevelMechanism:
        return self.__platform.mechanism

    @property
    def max_epsilon(self) -> float:
        return self.__platform.max_epsilon

    @property
    def last_metrics(self) -> dict[str, float]:
        """The public metrics of the last round (a copy: what is released is the platform's)."""
        return dict(self.__platform.last_metrics)

    @property
    def private_diagnostics(self) -> dict[str, Any]:
        """Raw facts of the last round only the server may see (realised counts, drop reasons):
        never part of the public records."""
        return dict(self.__platform.private_diagnostics)

    # The mechanism's public parameters, read by strategies and reports.
    @property
    def noise_multiplier(self) -> float:
        return self.mechanism.params.noise_multiplier

    @property
    def clip_norm(self) -> float:
        return self.mechanism.params.clip_norm

    @property
    def sample_rate(self) -> float:
        return self.mechanism.params.sample_rate

    @property
    def num_clients(self) -> int:
        return self.mechanism.params.num_clients

    @property
    def expected_clients(self) -> float:
        return self.mechanism.params.expected_clients

    @property
    def accountant(self):
        return self.mechanism.accountant

    @property
    def epsilon_valid(self) -> bool:
        return self.mechanism.params.epsilon_valid

    # --- what a strategy may override -------------------------------------------------

    def apply_settings(self, settings: RunSettings) -> None:
        """Take what the strategy needs from the run's settings beyond its options (e.g. the model)."""

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

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
    ) -> Result:
        """Flower's round loop, from ``first_round`` (a resumed run starts after its checkpoint).

        Rounds ``first_round`` … ``num_rounds``: train on the sampled clients (replies
        that do not arrive within ``timeout`` seconds are left out), aggregate, then
        ``evaluate_fn``; round 0's evaluation only when starting from round 1. There
        is no client-side evaluation: the server evaluates on its own data.
        """
        self.summary()
        self.__platform.round_timeout = timeout
        train_config = ConfigRecord() if train_config is None else train_config
        result = Result()
        arrays = initial_arrays
        if evaluate_fn and first_round == 1:
            if (metrics := evaluate_fn(0, arrays)) is not None:
                result.evaluate_metrics_serverapp[0] = metrics
        for server_round in range(first_round, num_rounds + 1):
            log(INFO, "dpfl: round %s/%s starts", server_round, num_rounds)
            messages = list(self.configure_train(server_round, arrays, train_config, grid))
            replies = grid.send_and_receive(messages, timeout=timeout)
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            if evaluate_fn and (metrics := evaluate_fn(server_round, arrays)) is not None:
                result.evaluate_metrics_serverapp[server_round] = metrics
        return result

    def round_lr(self, server_round: int) -> float:
        """η_t = η₀·decay^(t+1) with t = server_round − 1: decayed before round 1 too."""
        return self.lr * self.lr_decay**server_round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        refusal = self.mechanism.budget_refusal(server_round, self.max_epsilon)
        if refusal:
            raise BudgetExhausted(refusal)
        for warning in not_valid_reasons(self.mechanism.params):
            log(WARNING, "dpfl: %s", warning)
        self.global_arrays = arrays
        nodes = sorted(grid.get_node_ids())
        sampled = self.mechanism.sample(nodes, server_round)
        recipients = self.mechanism.recipients(nodes, sampled)
        secure_records: dict[int, ConfigRecord] = {}
        if secure := self.mechanism.params.secure_aggregation:
            # SecAgg+'s first two exchanges; the train messages go to the nodes still in the round.
            self.__platform.secure_round = SecureRound.begin(
                nodes, self.__platform.secagg_degree, secure.threshold, secure.bits,
                self.mechanism.secure_round_seeds(server_round), server_round, secure.padded_size,
            )  # fmt: skip
            if self.__platform.secure_round is not None:
                secure_records = self.__platform.secure_round.exchange_keys(grid, self.__platform.round_timeout)
            self.__platform.secure_grid = grid
            recipients = [(node, contributes) for node, contributes in recipients if node in secure_records]
        messages = self._train_messages(server_round, arrays, config, recipients)
        for message in messages:
            if message.metadata.dst_node_id in secure_records:
                message.content[SECAGG_KEY] = secure_records[message.metadata.dst_node_id]
        # The realised sample is private: only the server-private diagnostics hold its size.
        self.__platform.private_diagnostics = {"round": server_round, "sampled": len(sampled), "messages": len(messages)}
        return messages

    def _train_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, recipients: Iterable[tuple[int, bool]]
    ) -> list[Message]:
        records = checked_extra_records(self.extra_records(server_round))
        strategy_config = checked_round_config(self.round_config(server_round))
        # A round's train config depends only on whether the node contributes: built once for
        # each, shared by the messages as the round's arrays are (a reader gets its own values).
        train_configs: dict[bool, ConfigRecord] = {}
        messages = []
        for node, contributes in recipients:
            if contributes not in train_configs:
                train_configs[contributes] = ConfigRecord(
                    {
                        **dict(config),
                        **strategy_config,
                        SERVER_ROUND_KEY: server_round,
                        LR_KEY: self.round_lr(server_round),
                        LOCAL_STEPS_KEY: self.local_steps,
                        **self.mechanism.instructions(contributes),
                    }
                )
            content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: train_configs[contributes], **records})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return messages

    def final_model_messages(self, arrays: ArrayRecord, nodes: Iterable[int]) -> list[Message]:
        """Train messages that hand ``nodes`` the final model without asking for an update.

        A node deploys only the weights of its last train message, which its policy
        checked (docs/cim.md); these carry the last round's number and ask for no
        update, so they change neither what a node counts nor what is accounted. Under
        client placement a node still answers with a noise share, which is discarded.
        """
        return self._train_messages(self.current_round, arrays, ConfigRecord(), [(node, False) for node in nodes])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.global_arrays is not None, "aggregate_train before configure_train"
        x = record_tensors(self.global_arrays)
        if self.mechanism.params.secure_aggregation:
            return self.__aggregate_secure(server_round, x, list(replies))
        updates, unclipped, dropped, contributions, failed, arrived = [], [], [], 0, 0, 0
        layout = Layout(x)  # the model's names, shapes and dtypes, taken once for all replies
        for reply in replies:
            arrived += 1
            failed += reply.has_error()
            update, reason = self.screen_reply(reply, layout)
            bit = None
            if update is not None and self.mechanism.adaptive:
                bit, reason = read_unclipped(reply, self.mechanism)
                if bit is None:  # a reply without a valid bit is dropped whole
                    update = None
            if update is None:  # its reason goes to the server-private diagnostics only
                dropped.append(reason)
            else:
                updates.append(update)
                # Under client placement the unsampled nodes' noise-only replies are no contributions.
                contributions += self.mechanism.contributes(reply.metadata.src_node_id)
                if bit is not None:
                    unclipped.append(bit)
        # At this round's C, before adaptive clipping moves it.
        if self.mechanism.adaptive:
            clipped = [not bit for bit in unclipped]
        else:
            clipped = [self.mechanism.is_clipped(update) for update in updates]
        new_x = self.aggregate_updates(server_round, x, updates, contributions, unclipped)
        # A client that raised, timed out or whose node died: the round goes on without it.
        diagnostics = {"accepted": len(updates), "dropped": len(dropped), "drop-reasons": dropped, "failed": failed,
                       "no-reply": self.private_diagnostics.get("messages", arrived) - arrived,
                       "update-skipped": self.last_metrics.get(UPDATE_SKIPPED, 0.0) > 0}  # fmt: skip
        if self.mechanism.params.flat and self.mechanism.params.noise_placement == "server":
            diagnostics["clipped-fraction"] = sum(clipped) / len(clipped) if clipped else None
        self.__platform.private_diagnostics.update(diagnostics)
        return tensor_record(new_x), MetricRecord(self.last_metrics)

    def __aggregate_secure(
        self, server_round: int, x: Tensors, replies: list[Message]
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Secure aggregation's end of the round: the round is accounted before the sum is
        unmasked (write-ahead), then released from the sum alone; no single update is seen,
        so none is screened (the release bounds the sum's norm instead)."""
        secure_round = self.__platform.secure_round
        self.mechanism.account_round(server_round)
        total = None
        if secure_round is not None:
            total = secure_round.unmasked_sum(replies, self.__platform.secure_grid, self.__platform.round_timeout)
        rotation_seed = secure_round.rotation_seed if secure_round else b""
        survivors = len(secure_round.survivors) if secure_round else 0
        mean_delta = self.mechanism.release_secure_sum(total, x, rotation_seed, survivors)
        new_x = self.__apply_release(server_round, x, mean_delta)
        self.__platform.private_diagnostics.update({
            "failed": sum(reply.has_error() for reply in replies), "no-reply": self.private_diagnostics["messages"] - len(replies),
            "secagg-survivors": survivors if total is not None else 0,
            "secagg-failed-stage": secure_round.failed_stage if secure_round else "too few nodes",
            "update-skipped": mean_delta is None,
        })  # fmt: skip
        self.__platform.secure_round = self.__platform.secure_grid = None
        return tensor_record(new_x), MetricRecord(self.last_metrics)

    def screen_reply(self, reply: Message, x: Tensors | Layout) -> tuple[Tensors | None, str]:
        """The reply's update if it may be aggregated, else None and why it was dropped
        (``x``: the global weights, or their :class:`dpfl.flat.Layout`).

        Leaving a client out is safe for DP (the denominator is fixed), so anything
        malformed, non-finite or implausible is dropped rather than repaired.
        """
        if reply.has_error():
            return None, f"the client failed: {reply.error.reason}"
        try:
            update = record_tensors(reply.content.array_records[UPDATE_KEY])
        except Exception as err:  # noqa: BLE001 - whatever a broken or hostile client sent
            return None, f"no readable {UPDATE_KEY!r} record ({type(err).__name__}: {err})"
        reason = self.mechanism.screen(update, x)
        return (None, reason) if reason else (update, "")

    def aggregate_updates(
        self,
        server_round: int,
        x: Tensors,
        updates: list[Tensors],
        contributions: int | None = None,
        unclipped: list[float] = (),
    ) -> Tensors:
        """The new global weights from the screened replies; accounts the round.

        ``contributions``: how many of ``updates`` come from sampled clients (default
        all); with ``min-replies``, a round whose noisy count is below it keeps x.
        ``unclipped``: the replies' bits under adaptive clipping.
        """
        mean_delta = self.mechanism.release(updates, x, server_round, contributions, unclipped)
        return self.__apply_release(server_round, x, mean_delta)

    def __apply_release(self, server_round: int, x: Tensors, mean_delta: Tensors | None) -> Tensors:
        """The new global weights from the released mean Δ̄ (None: the round's update is skipped)."""
        self.current_round = server_round
        if mean_delta is None:
            self.__platform.last_metrics = {**self.public_metrics(server_round), UPDATE_SKIPPED: 1.0}
            return dict(x)
        public = self.public_update(server_round, x)
        if public is not None:
            mean_delta = {name: t + public[name] for name, t in mean_delta.items()}
        mean_delta = self.transform_update(server_round, mean_delta)
        self.after_aggregate(server_round, mean_delta)
        self.__platform.last_metrics = self.public_metrics(server_round)
        if self.mechanism.params.counts_replies or self.mechanism.params.secure_aggregation:
            self.__platform.last_metrics[UPDATE_SKIPPED] = 0.0
        if public is None:
            return self.server_optimizer.step(x, mean_delta)
        # The server optimiser steps along what is new this round; the public part (for
        # DP-FedPGN 0.8 of the last released mean, a momentum of its own) is applied as
        # it is, since an optimiser's momentum and scaling on top of it re-amplify the
        # noise it carries (docs/vit.md).
        stepped = self.server_optimizer.step(x, {name: t - public[name] for name, t in mean_delta.items()})
        return {name: stepped[name] - public[name] if name in public else stepped[name] for name in stepped}

    def public_metrics(self, server_round: int) -> dict[str, float]:
        """What may be released about the round: ε and the mechanism's public parameters."""
        epsilon, order = self.mechanism.privacy_spent()
        metrics = {
            "epsilon": epsilon,
            "rdp-order": order,
            "lr": self.round_lr(server_round),
            "noise-multiplier": self.noise_multiplier,
            "expected-clients": self.expected_clients,
        }
        if self.mechanism.last_adaptive_release is not None:  # released under the same ε
            clip_norm, unclipped = self.mechanism.last_adaptive_release
            metrics.update({"clip-norm": clip_norm, "noisy-clipped-fraction": 1 - unclipped})
        return metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # The server evaluates the global model centrally on held-out data.
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        if not self.private:
            log(INFO, "dpfl strategy %s: no differential privacy (a reference curve), q=%g", self.name, self.sample_rate)
            return
        params = self.mechanism.params
        log(
            INFO,
            "dpfl strategy %s: client-level DP, sigma=%.4g, C=%g, q=%g (expected %.1f of %d clients), clipping %s, "
            "noise on the %s, %s accountant, delta=%g, budget epsilon=%g, %s noise, options %s",
            self.name, params.noise_multiplier, params.clip_norm, params.sample_rate, params.expected_clients,
            params.num_clients, params.clipping, params.noise_placement, self.accountant.mechanism,
            params.delta, self.max_epsilon, "reproducible" if params.reproducible_noise else "secure",
            self.option_values,
        )  # fmt: skip
        if schema := params.schema:
            log(INFO, "dpfl strategy %s: %s noise, participation %s with min-separation %d (at most %d rounds per "
                "client), expected %.1f clients per round", self.name, schema.mechanism, schema.participation,
                schema.min_separation, schema.max_participations, params.expected_clients)  # fmt: skip
        if secure := params.secure_aggregation:
            # What one hostile node can do to a released sum: its residues are unchecked, but the
            # decoded sum's norm is bounded on release (dpfl.privacy.distributed_dp.bounded_sum).
            cap = honest_sum_norm_bound(secure, secure.max_inputs)
            log(INFO, "dpfl strategy %s: secure aggregation (SecAgg+) over every node, threshold t=%d of %d, %d "
                "neighbours, sums mod 2^%d; distributed Skellam noise, each node's share mu=%.4g sized for t; the "
                "server sees only the masked sum, and one hostile node can move a released sum by at most %.4g in "
                "norm (an honest node: C=%g)", self.name, secure.threshold, secure.max_inputs,
                min(self.__platform.secagg_degree, secure.max_inputs - 1), secure.bits, secure.mu_per_input,
                2 * cap, secure.clip_norm)  # fmt: skip
        if adaptive := params.adaptive_clipping:
            log(INFO, "dpfl strategy %s: adaptive clipping from C=%g towards quantile %g at rate %g, count noise %.4g, "
                "update noise multiplier %.4g", self.name, params.clip_norm, adaptive.target_quantile,
                adaptive.learning_rate, adaptive.count_noise_std, params.update_noise_multiplier)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The server state beside the global weights; never the noise or sampling randomness."""
        return {"round": self.current_round, "accountant": self.accountant.state_dict(),
                "mechanism": self.mechanism.state_dict(), "strategy": self.extra_state(),
                "server-optimizer": self.server_optimizer.state_dict()}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.current_round = int(state["round"])
        self.accountant.load_state_dict(state["accountant"])
        self.mechanism.load_state_dict(state["mechanism"])
        self.load_extra_state(state["strategy"])
        # Checkpoints from before server optimisers had only x − Δ̄, which keeps no state.
        self.server_optimizer.load_state_dict(state.get("server-optimizer", {}))


@dataclass
class _PlatformState:
    """The base class's privacy state, behind read-only properties of the strategy."""

    mechanism: ClientLevelMechanism
    max_epsilon: float
    last_metrics: dict[str, float] = field(default_factory=dict)
    private_diagnostics: dict[str, Any] = field(default_factory=dict)
    # Secure aggregation: the neighbourhood degree, and the round in progress with its grid
    # (server memory only: never in a checkpoint).
    secagg_degree: int = 0
    round_timeout: float = 3600.0
    secure_round: SecureRound | None = None
    secure_grid: Grid | None = None


def platform_state_references(cls: type) -> list[str]:
    """``self.<name>`` uses that reach the platform's privacy state, in the source of ``cls`` and
    of every class it inherits from except the platform's own (a mixin counts).

    Read from the syntax trees when the class is defined; a class whose source is not
    available (defined in an interactive session) is left to the read-only properties.
    """
    named = set()
    for klass in cls.__mro__:
        if klass in ClientLevelDPStrategy.__mro__:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        named |= {
            f"self.{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in PLATFORM_PRIVATE_NAMES
            and isinstance(node.value, ast.Name) and node.value.id == "self"
        }  # fmt: skip
    return sorted(named)


def distributed_params(settings: RunSettings, noise_multiplier: float, update_size: int) -> DistributedDPParams | None:
    """The run's distributed Skellam mechanism under ``aggregation=secagg`` (else None); a one-line
    ValueError when its values do not fit (the modulus too small for the sum, naming the fewest bits)."""
    if settings.aggregation != "secagg":
        return None
    if update_size < 1:
        raise ValueError("secure aggregation needs the model's size to size its noise shares (update_size)")
    threshold, _ = settings.secure_aggregation_shape()
    return DistributedDPParams(clip_norm=settings.clip_norm, noise_multiplier=noise_multiplier, size=update_size,
                               threshold=threshold, max_inputs=settings.num_clients, bits=settings.secagg_bits)  # fmt: skip


def not_valid_reasons(params: MechanismParams) -> list[str]:
    """Why this run's ε is not a guarantee (one warning each), or nothing."""
    if not params.private:
        return []
    return [text for text, applies in ((PAPER_MODE_WARNING, params.clipping == "paper"),
                                       (REPRODUCIBLE_NOISE_WARNING, params.reproducible_noise)) if applies]  # fmt: skip


def read_unclipped(reply: Message, mechanism: ClientLevelMechanism) -> tuple[float | None, str]:
    """An adaptive-clipping reply's bit [‖u‖ ≤ C], or None and why the reply must be dropped."""
    try:
        value = reply.content.metric_records[METRICS_KEY][UNCLIPPED]
    except Exception as err:  # noqa: BLE001 - whatever a broken or hostile client sent
        return None, f"no readable {UNCLIPPED!r} bit in {METRICS_KEY!r} ({type(err).__name__}: {err})"
    reason = mechanism.screen_unclipped(value)
    return (None, reason) if reason else (float(value), "")


def checked_round_config(config: Mapping[str, OptionValue]) -> dict[str, OptionValue]:
    """A strategy's train-config entries, refused if one would shadow a platform key."""
    taken = sorted(PLATFORM_CONFIG_KEYS & set(config))
    if taken:
        raise UsageError(f"round_config sets {', '.join(taken)}, which the platform owns; rename it")
    return dict(config)


def checked_extra_records(records: Mapping[str, ArrayRecord]) -> dict[str, ArrayRecord]:
    """A strategy's extra records, refused if one would replace the model, config or reply records."""
    taken = sorted(PLATFORM_RECORD_KEYS & set(records))
    if taken:
        raise UsageError(f"extra_records uses {', '.join(taken)}, which the platform owns; rename it")
    return dict(records)
