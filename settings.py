"""The run configuration: one validated place for every run-config key.

``[tool.flwr.app.config]`` in pyproject.toml lists the same keys with the same
defaults (a test keeps them equal), so ``flwr run .`` and ``dpfl simulate`` start
from one configuration. Keys are Flower's kebab-case; attributes are snake_case.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from dpfl.errors import UsageError
from dpfl.privacy.accountants import ACCOUNTANTS
from dpfl.task.partition import PARTITION_SCHEMES
from dpfl.task.recipes import SERVER_STEP_KEYS, UNSET, recipe_for, recipe_name

# The names validate() checks against live beside torch (models, data sets, the mechanism,
# compression, crossbars): they are imported there, so that reading a run's settings (every
# `dpfl` command line) does not import torch.


# Vectorised cohorts: where possible (auto), always (on: refused where not possible), never (off).
COHORT_BATCHING = ("auto", "on", "off")


@dataclass(frozen=True)
class RunSettings:
    # Keys marked "recipe" default to their "not set" sentinel (0 or "auto"); on
    # construction every key still at its sentinel takes the model's recipe value
    # (dpfl.task.recipes). The server step (server-optimizer, server-lr) also depends on
    # the strategy, which this layer may not import: it keeps its sentinel until
    # with_server_step (called by ClientLevelDPStrategy.resolved_settings) fills it.
    # dataclasses.replace keeps resolved values: build a new RunSettings to get another
    # model's recipe.
    # Federation
    num_server_rounds: int = 0  # recipe
    num_clients: int = 400
    strategy: str = "dp-fedpgn"
    strategy_options: str = ""
    # Task
    model: str = "resnet10"
    model_width: int = 0  # recipe
    model_depth: int = 0  # recipe: the ViT's encoder blocks
    dataset: str = "digits"
    data_dir: str = ""
    image_size: int = 0
    partition: str = "iid"
    # Share of the server's held-out data set aside (stratified) as its validation set,
    # for tuning without looking at the test set; 0 = none.
    validation_fraction: float = 0.0
    dirichlet_alpha: float = 0.5
    # Client-level DP
    noise_multiplier: float = 1.0
    target_epsilon: float = 8.0
    max_epsilon: float = 10.0
    clip_norm: float = 0.0  # recipe
    sample_rate: float = 0.0  # recipe
    delta: float = 1e-5
    noise_placement: str = "server"
    accountant: str = "rdp"
    clipping: str = "flat"
    reproducible_noise: bool = False
    # Noise and participation (dpfl.privacy.participation): mechanism "gaussian" (independent
    # noise), or correlated noise (dpfl.privacy.factorizations): "bandmf" (banded matrix
    # factorisation, band = min-separation), "tree" (binary-tree aggregation) or "blt" (buffered
    # linear Toeplitz; tree and blt are never amplified: q = 1 under cyclic too);
    # participation "poisson" (every client, every round, with probability sample-rate), "cyclic"
    # (min-separation fixed groups, one per round, Poisson within it) or "min-sep" (a client waits
    # min-separation rounds between two participations)
    mechanism: str = "gaussian"
    participation: str = "poisson"
    min_separation: int = 1
    # Adaptive clipping (Andrew et al. 2021): clip-mode "adaptive" moves C (from clip-norm)
    # towards the target-quantile of the update norms at rate clip-lr, from a count noised
    # with std clip-count-noise (0 = expected clients / 20, raised so sigma grows <= 5%)
    clip_mode: str = "fixed"
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clip_count_noise: float = 0.0
    # Secure aggregation (dpfl.secagg, dpfl.privacy.distributed_dp): "plain" (the server sees each
    # update) or "secagg" (SecAgg+ with distributed Skellam noise: the server learns only the noisy
    # sum); secagg-threshold t (the fewest inputs a released sum holds; 0 = ceil(2n/3) of the n
    # clients), secagg-neighbours k (0 = automatic: dpfl.privacy.secure_sum.default_degree), and
    # secagg-bits b (the sum is taken mod 2^b)
    aggregation: str = "plain"
    secagg_threshold: int = 0
    secagg_neighbours: int = 0
    secagg_bits: int = 32
    # Client failures: per-round reply timeout; skip a round's update below min-replies
    # replies (a count released with Gaussian noise of std reply-count-noise; 0 = never skip)
    round_timeout: float = 3600.0
    min_replies: int = 0
    reply_count_noise: float = 20.0
    # Local training
    lr: float = 0.0  # recipe
    lr_decay: float = 0.0  # recipe
    local_epochs: int = 0  # recipe
    client_size: int = 0
    batch_size: int = 0  # recipe
    weight_decay: float = 1e-3
    grad_clip: float = 10.0
    # Multi-precision training: local steps also take the forward of the weights quantised
    # at each of these bits (comma-separated, e.g. "2,4"), for devices of those precisions
    train_bit_widths: str = ""
    # Where clients train (auto, cpu, cuda, cuda:N, mps; dpfl.task.devices), and whether the
    # in-process engine trains a round's clients as one vectorised computation (auto, on, off;
    # dpfl.client.cohort): auto does wherever the strategy's rule has a functional form
    device: str = "auto"
    cohort_batching: str = "auto"
    # How the server applies the released mean update (post-processing, dpfl.task.server_optimizer)
    server_optimizer: str = "auto"  # recipe, by strategy: "sgd", "momentum" or "adam"
    server_lr: float = 0.0  # recipe, by strategy
    pretraining: str = "auto"  # recipe: "none", "fractal" or "strokes" (public synthetic pretraining)
    # Sample-level DP inside clients (DP-SGD), on top of client-level DP
    local_dp: bool = False
    local_noise_multiplier: float = 1.0
    local_clip: float = 1.0
    local_delta: float = 1e-5
    # Deployment round after training: each (or deploy-clients random) node compresses the
    # final model with its own data and runs it on its own simulated CIM device
    deploy: bool = False
    deploy_clients: int = 0
    deploy_method: str = "tucker2"
    deploy_norm: str = "sigma"
    deploy_ratio: float = 0.5
    deploy_mapping: str = "mdm"
    deploy_mode: str = "auto"
    deploy_sweep_tiles: str = ""  # e.g. "64,128,256,512"; "" = only the node's own tile size
    deploy_node_configs: str = ""
    # Bookkeeping
    seed: int = 0
    out_dir: str = "runs/latest"
    # Crash safety: continue a run folder (its own init-from then no longer applies), or
    # start from a checkpoint carrying its privacy ledger
    resume_from: str = ""
    init_from: str = ""
    init_new_data: bool = False

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Build from Flower's run config (kebab-case keys); unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise UsageError(f"unknown run-config key {key!r}; known keys: {', '.join(cls.keys())}")
            values[name] = coerce_config_value(key, value, type(getattr(cls, name)))
        settings = cls(**values)
        settings.validate()
        return settings

    def __post_init__(self) -> None:
        unset = [name for name in self._unset() if name not in SERVER_STEP_KEYS]
        if unset:
            recipe = recipe_for(self.model, self.dataset)
            for name in unset:  # frozen: set once, here, as a generated __init__ would
                object.__setattr__(self, name, getattr(recipe, name))

    def _unset(self) -> list[str]:
        return [name for name, sentinel in UNSET.items() if getattr(self, name) == sentinel]

    def with_server_step(self, public_part: bool) -> RunSettings:
        """These settings with the server step the user did not set taken from the model's
        recipe for a strategy with (or without) a public part; idempotent."""
        unset = [name for name in self._unset() if name in SERVER_STEP_KEYS]
        if not unset:
            return self
        given = None if "server_optimizer" in unset else self.server_optimizer
        optimizer, lr = recipe_for(self.model, self.dataset).server_step(public_part, given)
        return replace(self, **{name: value for name, value in zip(SERVER_STEP_KEYS, (optimizer, lr)) if name in unset})

    def with_strategy_option_defaults(self, declared: Iterable[str]) -> RunSettings:
        """These settings with the model's recipe defaults for the options a strategy
        ``declared`` and the user did not set appended to ``strategy-options``; idempotent."""
        defaults = recipe_for(self.model, self.dataset).option_defaults(declared, self.strategy_options)
        if not defaults:
            return self
        return replace(self, strategy_options=" ".join([*self.strategy_options.split(), *defaults]))

    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        from dpfl.privacy.mechanism import CLIPPING_MODES, NOISE_PLACEMENTS
        from dpfl.privacy.validation import check_local_dp_supported
        from dpfl.task.names import DATASET_NAMES
        from dpfl.task.devices import check_device_name
        from dpfl.task.models import GROUP_NORM_GROUPS, MODEL_BUILDERS, build_model, check_depth
        from dpfl.task.pretraining import PRETRAINING_CHOICES
        from dpfl.task.server_optimizer import SERVER_OPTIMIZERS

        _at_least("num-server-rounds", self.num_server_rounds, 1)
        _at_least("num-clients", self.num_clients, 1)
        _one_of("model", self.model, MODEL_BUILDERS)
        check_depth(self.model, self.model_depth)
        _one_of("dataset", self.dataset, DATASET_NAMES)
        _one_of("partition", self.partition, PARTITION_SCHEMES)
        _one_of("noise-placement", self.noise_placement, NOISE_PLACEMENTS)
        _one_of("clipping", self.clipping, CLIPPING_MODES)
        _one_of("accountant", self.accountant, ACCOUNTANTS)
        self._validate_adaptive_clipping()
        self._validate_participation()
        self._validate_secure_aggregation()
        _one_of("pretraining", self.pretraining, PRETRAINING_CHOICES)
        if self.server_optimizer != UNSET["server_optimizer"]:  # else the strategy's recipe step
            _one_of("server-optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        if self.server_lr != UNSET["server_lr"]:
            _positive("server-lr", self.server_lr)
        _positive("dirichlet-alpha", self.dirichlet_alpha)
        if not 0 <= self.validation_fraction < 1:
            raise UsageError(f"validation-fraction must be in [0, 1), got {self.validation_fraction}")
        if self.target_epsilon == 0:
            _positive("noise-multiplier", self.noise_multiplier)
        else:
            _positive("target-epsilon", self.target_epsilon)
        if self.max_epsilon < 0:
            raise UsageError(f"max-epsilon must be > 0 (or 0 for no budget), got {self.max_epsilon}")
        if 0 < self.max_epsilon < self.target_epsilon:
            raise UsageError(
                f"target-epsilon {self.target_epsilon} is over the budget max-epsilon {self.max_epsilon}; "
                "lower the target or raise the budget"
            )
        _positive("round-timeout", self.round_timeout)
        _at_least("min-replies", self.min_replies, 0)
        _positive("reply-count-noise", self.reply_count_noise)
        if self.min_replies and not self.target_epsilon and self.reply_count_noise <= self.noise_multiplier:
            # (A calibrated sigma is checked when the ServerApp has it.)
            raise UsageError(
                f"reply-count-noise must exceed the noise multiplier {self.noise_multiplier:g} when min-replies "
                f"is set (its cost is taken from the update's noise), got {self.reply_count_noise:g}"
            )
        _positive("clip-norm", self.clip_norm)
        if not 0 < self.sample_rate <= 1:
            raise UsageError(f"sample-rate must be in (0, 1], got {self.sample_rate}")
        if not 0 < self.delta < 1:
            raise UsageError(f"delta must be in (0, 1), got {self.delta}")
        _positive("lr", self.lr)
        if not 0 < self.lr_decay <= 1:
            raise UsageError(f"lr-decay must be in (0, 1], got {self.lr_decay}")
        _at_least("local-epochs", self.local_epochs, 1)
        if self.client_size < 0:
            raise UsageError(f"client-size must be >= 0 (0 = the data set's published size / num-clients), got {self.client_size}")
        _at_least("batch-size", self.batch_size, 1)
        if self.weight_decay < 0:
            raise UsageError(f"weight-decay must be >= 0, got {self.weight_decay}")
        _positive("grad-clip", self.grad_clip)
        check_device_name(self.device)
        _one_of("cohort-batching", self.cohort_batching, COHORT_BATCHING)
        if self.image_size < 0:
            raise UsageError(f"image-size must be >= 0 (0 = the dataset's own), got {self.image_size}")
        _positive("local-noise-multiplier", self.local_noise_multiplier)
        _positive("local-clip", self.local_clip)
        if not 0 < self.local_delta < 1:
            raise UsageError(f"local-delta must be in (0, 1), got {self.local_delta}")
        self._validate_deployment()
        if self.local_dp:
            # Layer types do not depend on the data's shape, so a nominal shape will do.
            check_local_dp_supported(build_model(self.model, 10, 3, 32, 2 * GROUP_NORM_GROUPS), self.model)
        if self.bit_widths() and self.local_dp:
            raise UsageError("train-bit-widths cannot be combined with local-dp (one backward pass per DP-SGD step)")

    def _validate_adaptive_clipping(self) -> None:
        from dpfl.privacy.adaptive_clipping import CLIP_MODES, check_adaptive_clipping_supported, check_count_noise

        _one_of("clip-mode", self.clip_mode, CLIP_MODES)
        if self.clip_count_noise < 0:
            raise UsageError(f"clip-count-noise must be >= 0 (0 = automatic), got {self.clip_count_noise}")
        if self.clip_mode == "adaptive":
            check_adaptive_clipping_supported(self.noise_placement, self.clipping)
            adaptive = self.adaptive_clipping(self.noise_multiplier)  # its own checks of the ranges
            if self.target_epsilon == 0:  # σ is known now; a calibrated σ is checked by the server
                check_count_noise(self.noise_multiplier, adaptive.count_noise_std)

    def _validate_participation(self) -> None:
        from dpfl.privacy.names import NOISE_MECHANISMS, PARTICIPATIONS
        from dpfl.privacy.participation import check_schema_supported

        _one_of("mechanism", self.mechanism, NOISE_MECHANISMS)
        _one_of("participation", self.participation, PARTICIPATIONS)
        _at_least("min-separation", self.min_separation, 1)
        schema = self.participation_schema()
        if schema is None:
            return
        try:
            schema.check_federation(self.num_clients)
            check_schema_supported(schema, self.noise_placement, self.clipping, self.clip_mode == "adaptive",
                                   self.min_replies)  # fmt: skip
        except ValueError as err:
            raise UsageError(str(err)) from None

    def _validate_secure_aggregation(self) -> None:
        from dpfl.privacy.names import AGGREGATIONS
        from dpfl.privacy.secure_sum import setup_problem

        _one_of("aggregation", self.aggregation, AGGREGATIONS)
        _at_least("secagg-threshold", self.secagg_threshold, 0)
        _at_least("secagg-neighbours", self.secagg_neighbours, 0)
        if self.aggregation != "secagg":
            return
        clashes = {"noise-placement=client": self.noise_placement == "client",
                   f"clipping={self.clipping}": self.clipping != "flat",
                   "clip-mode=adaptive": self.clip_mode == "adaptive",
                   f"min-replies={self.min_replies}": self.min_replies > 0,
                   f"mechanism={self.mechanism}": self.mechanism != "gaussian",
                   f"participation={self.participation}": self.participation != "poisson"}  # fmt: skip
        if clash := next((name for name, applies in clashes.items() if applies), None):
            raise UsageError(
                f"aggregation=secagg cannot be combined with {clash}: its clients add distributed Skellam noise to "
                "flat-clipped updates of a Poisson sample, and the server sees only their sum"
            )
        threshold, degree = self.secure_aggregation_shape()
        if problem := setup_problem(self.num_clients, degree, threshold, self.secagg_bits):
            raise UsageError(problem)

    def secure_aggregation_shape(self) -> tuple[int, int]:
        """(t, k) of the run's secure aggregation over its num-clients nodes, defaults resolved."""
        from dpfl.privacy.secure_sum import default_degree, default_min_inputs

        threshold = self.secagg_threshold or default_min_inputs(self.num_clients)
        return threshold, self.secagg_neighbours or default_degree(self.num_clients)

    def participation_schema(self):
        """The run's ParticipationSchema, or None for Poisson sampling with independent noise (the default)."""
        from dpfl.privacy.participation import ParticipationSchema

        if self.participation == "poisson" and self.mechanism == "gaussian":
            return None
        try:
            return ParticipationSchema(self.participation, self.min_separation, self.num_server_rounds, self.mechanism)
        except ValueError as err:
            raise UsageError(str(err)) from None

    def adaptive_clipping(self, noise_multiplier: float):
        """The run's AdaptiveClipping at the resolved σ, or None for a fixed clip norm."""
        from dpfl.privacy.adaptive_clipping import AdaptiveClipping

        if self.clip_mode != "adaptive":
            return None
        return AdaptiveClipping.resolve(self.target_quantile, self.clip_lr, self.clip_count_noise,
                                        self.sample_rate * self.num_clients, noise_multiplier)  # fmt: skip

    def _validate_deployment(self) -> None:
        from dpfl.cim.names import DEPLOY_MODES, MAPPINGS
        from dpfl.compression.names import METHODS, NORMS

        if self.deploy_clients < 0:
            raise UsageError(f"deploy-clients must be >= 0 (0 = every node), got {self.deploy_clients}")
        _one_of("deploy-method", self.deploy_method, METHODS)
        _one_of("deploy-norm", self.deploy_norm, NORMS)
        _one_of("deploy-mapping", self.deploy_mapping, MAPPINGS)
        _one_of("deploy-mode", self.deploy_mode, DEPLOY_MODES)
        if not 0 < self.deploy_ratio < 1:
            raise UsageError(f"deploy-ratio must be in (0, 1), got {self.deploy_ratio}")
        self.sweep_tile_sizes()
        # The syntax and who may set each key: each node judges its own values, so one bad node fails alone.
        check_run_config_node_keys(parse_node_configs(self.deploy_node_configs))

    def bit_widths(self) -> tuple[int, ...]:
        """The weight bits of multi-precision training (``train-bit-widths``; "" = none)."""
        return _integer_list("train-bit-widths", self.train_bit_widths, "weight bits in 1..16", 1, 16)

    def sweep_tile_sizes(self) -> tuple[int, ...]:
        """The tile sizes of each node's NF sweep beside its own (``deploy-sweep-tiles``; "" = none)."""
        return _integer_list("deploy-sweep-tiles", self.deploy_sweep_tiles, "tile sizes >= 2", 2)

    def nominal_client_size(self) -> int:
        """The public number of examples of a nominal client: ``client-size``, or the
        data set's published training-set size over ``num-clients``.

        Public by construction: the server never counts the clients' data.
        """
        from dpfl.task.data import PUBLISHED_TRAIN_SIZES

        if self.client_size:
            return self.client_size
        if self.dataset not in PUBLISHED_TRAIN_SIZES:
            raise UsageError(f"dataset {self.dataset!r} has no published size: set client-size (examples per client)")
        return math.ceil(PUBLISHED_TRAIN_SIZES[self.dataset] / self.num_clients)

    def local_steps(self) -> int:
        """K, the public number of local steps: local epochs over a nominal client's data.

        K must not depend on a client's own data size: the server adds the public
        part (1−γ)Kηc back for every client, and a per-client K would leak who took
        part. Every client takes exactly K steps (cycling over its data).
        """
        return self.local_epochs * math.ceil(self.nominal_client_size() / self.batch_size)

    def delta_warning(self) -> str | None:
        """A one-line warning when δ is too large to mean anything for N clients."""
        if self.delta >= 1 / self.num_clients:
            return (
                f"delta {self.delta:g} is at least 1/num-clients = {1 / self.num_clients:g}: a mechanism that "
                "releases one whole client's data with probability delta would satisfy it; use delta << 1/N"
            )
        return None

    @property
    def budget(self) -> float:
        """The ε budget; infinite when ``max-epsilon`` is 0."""
        return self.max_epsilon or math.inf


# The node-config keys a run config may propose to a node (deploy-node-configs), and a node
# may accept: its simulated device and its compression, nothing it shares or where it writes.
RUN_CONFIG_NODE_PREFIXES = ("device-", "compress-")
# How a bool key may be spelled in a run config; bool("false") would be True.
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def coerce_config_value(key: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            return value if isinstance(value, bool) else _BOOL_WORDS[str(value).strip().lower()]
        if kind is int and (isinstance(value, bool) or float(value) != int(float(value))):
            raise ValueError
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError, KeyError):
        raise UsageError(f"{key} must be {kind.__name__}, got {value!r}") from None


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise UsageError(f"{key} must be > 0, got {value}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise UsageError(f"{key} must be >= {low}, got {value}")


def _one_of(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise UsageError(f"unknown {key} {value!r}; choose one of {', '.join(allowed)}")


def parse_node_configs(text: str, what: str = "deploy-node-configs") -> list[dict[str, str]]:
    """``"k=v k=v; k=v"``: one node config per ``;``-separated entry (a simulation's
    stand-in for the node configs of real SuperNodes)."""
    configs = []
    for entry in filter(str.strip, text.split(";")):
        config = {}
        for item in entry.split():
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                raise UsageError(f"{what}: {item!r} is not key=value (entries: 'k=v k=v; k=v ...')")
            config[key] = value
        configs.append(config)
    return configs


def check_run_config_node_keys(configs: list[dict[str, str]]) -> None:
    """Refuse, in one line, a node key the run config may not set: only device and compression keys
    (``device-*``, ``compress-*``) may come from it; sharing, storage and policy are the node's own."""
    for config in configs:
        for key in config:
            if not key.startswith(RUN_CONFIG_NODE_PREFIXES):
                raise UsageError(
                    f"deploy-node-configs: {key!r} is the node's own choice and cannot come from the run config "
                    f"(only {', '.join(p + '*' for p in RUN_CONFIG_NODE_PREFIXES)}); in simulation, set it with "
                    "--node-config"
                )


def _integer_list(key: str, text: str, what: str, low: int, high: int | None = None) -> tuple[int, ...]:
    """A comma-separated list of integers in [low, high] ("" = none), or a one-line UsageError naming ``key``."""
    if not text.strip():
        return ()
    try:
        values = tuple(int(value) for value in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < low or (high is not None and max(values) > high):
        raise UsageError(f"{key} must be comma-separated {what}, got {text!r}")
    return values


def describe_recipe(settings: RunSettings, public_part: bool | None = None) -> str:
    """One line for a run's header: the model's recipe and what the run overrides.

    ``public_part``: whether the run's strategy has a public part, which picks the
    recipe's server step; None (several strategies) shows both steps.
    """
    recipe = recipe_for(settings.model, settings.dataset)
    by_strategy = [recipe.values(public_part)] if public_part is not None else [recipe.values(False), recipe.values(True)]
    values, overridden = [], []
    for name in UNSET:
        key = name.replace("_", "-")
        choices = list(dict.fromkeys(step[name] for step in by_strategy))
        values.append(f"{key} {choices[0]}" + (f" ({choices[1]} with a public part)" if len(choices) > 1 else ""))
        if getattr(settings, name) not in {*choices, UNSET[name]}:  # the sentinel: the recipe's, still to be resolved
            overridden.append(f"{key}={getattr(settings, name)}")
    if recipe.strategy_option_defaults:
        values.append(f"strategy options {recipe.strategy_option_defaults} (where the strategy has them)")
    return f"recipe {recipe_name(settings.model, settings.dataset)}: {', '.join(values)}" + (f"; overridden: {', '.join(overridden)}" if overridden else "")
