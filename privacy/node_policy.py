"""A SuperNode's privacy policy: the least privacy its data owner accepts from any run.

The data owner writes the policy into the SuperNode's node config (``flower-supernode
--node-config "policy-min-noise-multiplier=1.0 policy-max-epsilon=8 ..."``); the
ClientApp checks every train message against it before it touches the data and
refuses a run that asks for less.

What the node obeys is what it checks: the message's mechanism values (σ, σ_Δ, C,
N, the clipping mode, the noise placement) are the very values the ClientApp derives
its clipping and noise share from (:meth:`dpfl.privacy.mechanism.ClientInstructions.from_config`),
so a server cannot pass the check with one value and be obeyed on another. Whatever a
submitter or the server claims about ε, the node computes it itself, from what it
can verify: how often it was asked to contribute (:class:`Participation`, kept in
the node's own state). It cannot verify the server's sampling, so amplification by
sampling enters its ε only if its policy says it trusts that sampling
(``policy-trust-server-sampling``); either way it refuses a run that asks it to
contribute implausibly often for the sample rate the server claims.

Pure: no Flower, no I/O; the ClientApp hands in its node config, the train
message's config record, the run's settings and the node's participation so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

from scipy.stats import binom

from dpfl.errors import UsageError
from dpfl.privacy.accountants.rdp import epsilon_for
from dpfl.privacy.distributed_dp import DistributedDPParams
from dpfl.privacy.distributed_dp import epsilon as distributed_epsilon
from dpfl.privacy.mechanism import (
    CLIP_NORM,
    CLIPPING,
    CONTRIBUTE_UPDATE,
    DELTA,
    NOISE_MULTIPLIER,
    NOISE_PLACEMENT,
    NUM_CLIENTS,
    REPORT_UNCLIPPED,
    REPRODUCIBLE_NOISE,
    SAMPLE_RATE,
    SAMPLE_SIZE,
    UPDATE_NOISE_MULTIPLIER,
)

POLICY_PREFIX = "policy-"
# The round number in a train message's config (strategies.base.SERVER_ROUND_KEY, which
# lives with the Flower glue this module must not import).
SERVER_ROUND = "server-round"
# δ at which the node computes ε when the policy does not name one.
DEFAULT_POLICY_DELTA = 1e-5
# A node refuses once P[Binomial(rounds, q) ≥ its contributions] falls below this: an
# honest Poisson sampler trips it about once in a million checks, while a server that
# claims q = 0.01 and asks every round is refused by its third or fourth request.
SAMPLING_TEST_LEVEL = 1e-6


@dataclass(frozen=True)
class PolicyRequest:
    """What one train message asks of the node, as the node sees it."""

    strategy: str
    noise_multiplier: float
    clip_norm: float  # 0 = no clipping (a non-private strategy)
    sample_rate: float
    delta: float
    rounds: int
    # Whether the strategy is private at all (the node looks it up in its own registry).
    private_strategy: bool = True
    server_round: int = 1
    contribute_update: bool = True
    update_noise_multiplier: float = 0.0
    clipping: str = "flat"
    noise_placement: str = "server"
    num_clients: int = 1
    sample_size: int = 1
    reproducible_noise: bool = False
    report_unclipped: bool = False

    @classmethod
    def from_train(cls, config: Mapping[str, Any], settings: Any, private_strategy: bool = True) -> PolicyRequest:
        """From a train message's config record and the run's ``RunSettings``.

        The mechanism's values come from the message (what the ClientApp obeys). Rounds
        are the larger of the run's and the message's round number: a server that runs
        past its announced rounds is judged by what it does.
        """
        server_round = int(config[SERVER_ROUND])
        return cls(
            strategy=str(settings.strategy),
            noise_multiplier=float(config[NOISE_MULTIPLIER]),
            clip_norm=float(config[CLIP_NORM]),
            sample_rate=float(config[SAMPLE_RATE]),
            delta=float(config[DELTA]),
            rounds=max(int(settings.num_server_rounds), server_round),
            private_strategy=private_strategy,
            server_round=server_round,
            contribute_update=bool(config[CONTRIBUTE_UPDATE]),
            update_noise_multiplier=float(config[UPDATE_NOISE_MULTIPLIER]),
            clipping=str(config[CLIPPING]),
            noise_placement=str(config[NOISE_PLACEMENT]),
            num_clients=int(config[NUM_CLIENTS]),
            sample_size=int(config[SAMPLE_SIZE]),
            reproducible_noise=bool(config[REPRODUCIBLE_NOISE]),
            report_unclipped=bool(config[REPORT_UNCLIPPED]),
        )

    def malformed(self) -> str | None:
        """Why these values are no mechanism at all (a non-finite or out-of-range number), or None."""
        numbers = {"noise multiplier": self.noise_multiplier, "update noise multiplier": self.update_noise_multiplier,
                   "clip norm": self.clip_norm}  # fmt: skip
        for name, value in numbers.items():
            if not (math.isfinite(value) and value >= 0):
                return f"run's {name} {value!r} is not a finite number >= 0"
        if not 0 <= self.sample_rate <= 1:
            return f"run's sample rate {self.sample_rate!r} is not in [0, 1]"
        if not 0 < self.delta < 1:
            return f"run's delta {self.delta!r} is not in (0, 1)"
        if self.num_clients < 1 or self.sample_size < 1 or self.server_round < 0:
            return (f"run's {self.num_clients} clients, sample size {self.sample_size} or round {self.server_round} "
                    "is not a count")  # fmt: skip
        return None

    @property
    def epsilon_valid(self) -> bool:
        """Whether ε bounds this run as the node will run it: computed here, never taken from a claim."""
        return (self.private_strategy and self.clipping == "flat" and not self.reproducible_noise
                and self.noise_multiplier > 0 and self.clip_norm > 0)  # fmt: skip


@dataclass(frozen=True)
class Participation:
    """What the node has answered of a run: the highest round number, the messages whose round
    did not move past it (a repeated or earlier round: each counts as a round of its own), and
    how often it contributed. Refused messages leave it unchanged."""

    rounds: int = 0
    contributions: int = 0
    repeats: int = 0

    @property
    def effective_rounds(self) -> int:
        """The rounds the node must assume: a server cannot hide rounds by repeating their numbers."""
        return self.rounds + self.repeats

    def after(self, request: PolicyRequest) -> Participation:
        """The participation once ``request`` is answered."""
        repeat = 0 < request.server_round <= self.rounds
        return Participation(max(self.rounds, request.server_round), self.contributions + request.contribute_update,
                             self.repeats + repeat)  # fmt: skip

    def implausible_under(self, sample_rate: float) -> bool:
        """Whether so many contributions in so few rounds are implausible for Poisson(``sample_rate``)."""
        if self.contributions == 0:
            return False
        rounds = max(self.effective_rounds, self.contributions)
        return float(binom.sf(self.contributions - 1, rounds, min(max(sample_rate, 0.0), 1.0))) < SAMPLING_TEST_LEVEL


def _number(key: str, value: Any) -> float:
    # bool is an int in Python; `policy-max-epsilon=true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"node config {key}={value!r} must be a positive number")
    return float(value)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"node config {key}={value!r} must be true or false")
    return value


@dataclass(frozen=True)
class NodePrivacyPolicy:
    """Limits a run must respect on this node; ``None``/``False`` = no limit."""

    min_noise_multiplier: float | None = None
    max_clip_norm: float | None = None
    max_epsilon: float | None = None
    # δ at which max_epsilon is checked (a run with a smaller δ is checked at its own).
    delta: float = DEFAULT_POLICY_DELTA
    private_only: bool = False
    registered_strategies_only: bool = False
    # Whether the node's ε may count on amplification by the server's (unverifiable) sampling.
    trust_server_sampling: bool = False

    @classmethod
    def keys(cls) -> list[str]:
        return [POLICY_PREFIX + f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodePrivacyPolicy:
        """The policy in a node config's ``policy-*`` keys; none of them = no policy.

        An unknown ``policy-*`` key is an error, not ignored: a misspelt limit must not
        silently leave the node unprotected.
        """
        parsers: dict[str, Callable[[str, Any], Any]] = {
            f.name: _flag if f.type in ("bool", bool) else _number for f in fields(cls)
        }
        values = {}
        for key, value in node_config.items():
            if not key.startswith(POLICY_PREFIX):
                continue
            name = key[len(POLICY_PREFIX) :].replace("-", "_")
            if name not in parsers:
                raise UsageError(f"unknown node config key {key!r}; privacy policy keys: {', '.join(cls.keys())}")
            values[name] = parsers[name](key, value)
        if values.get("delta", 0) >= 1:
            raise UsageError(f"node config policy-delta={values['delta']!r} must be in (0, 1)")
        return cls(**values)

    @property
    def limits_set(self) -> bool:
        """Whether the data owner set any limit (trusting the server's sampling is none)."""
        return any((self.min_noise_multiplier, self.max_clip_norm, self.max_epsilon, self.private_only,
                    self.registered_strategies_only))  # fmt: skip

    def violation(self, request: PolicyRequest, participation: Participation = Participation()) -> str | None:
        """One line naming every limit ``request`` breaks, or None when it respects them all.

        ``participation`` is the node's, with ``request`` answered (:meth:`Participation.after`).
        A message whose values are no mechanism at all is refused whatever the policy.
        """
        if malformed := request.malformed():
            return malformed
        reasons = []
        if self.registered_strategies_only and ":" in request.strategy:
            reasons.append(
                f"strategy {request.strategy!r} is a plugin given as module:Class, "
                "but this node runs registered strategies only"
            )
        if self.limits_set:
            reasons += self._inconsistencies(request, participation)
        if (self.private_only or self.max_epsilon is not None) and not request.epsilon_valid:
            reasons.append(
                f"run has no valid client-level DP guarantee (strategy {request.strategy!r}, "
                f"noise multiplier {request.noise_multiplier:g}, clip norm {request.clip_norm:g}), "
                + ("but this node accepts private runs only" if self.private_only
                   else f"so it cannot be held to this node's maximum epsilon {self.max_epsilon:g}")
            )
        if self.min_noise_multiplier is not None and request.noise_multiplier < self.min_noise_multiplier:
            reasons.append(
                f"noise multiplier {request.noise_multiplier:g} is below this node's minimum "
                f"{self.min_noise_multiplier:g}"
            )
        if self.max_clip_norm is not None and not 0 < request.clip_norm <= self.max_clip_norm:
            shown = "0 (no clipping)" if request.clip_norm <= 0 else f"{request.clip_norm:g}"
            reasons.append(f"clip norm {shown} is above this node's maximum {self.max_clip_norm:g}")
        if self.max_epsilon is not None and request.epsilon_valid:
            delta = min(request.delta, self.delta)
            epsilon = self.epsilon_of(request, participation, delta)
            if epsilon > self.max_epsilon:
                reasons.append(f"epsilon {epsilon:.3g} at delta {delta:g} {self._basis(request, participation)} "
                               f"is above this node's maximum {self.max_epsilon:g}")  # fmt: skip
        return "; ".join(reasons) or None

    @staticmethod
    def _inconsistencies(request: PolicyRequest, participation: Participation) -> list[str]:
        """What no honest server asks of a node that has set limits."""
        reasons = []
        if request.noise_multiplier > 0 and not request.clip_norm > 0:
            reasons.append("run asks for noise without clipping: an unclipped update has no sensitivity bound")
        if request.reproducible_noise:
            reasons.append("run asks for reproducible noise, which anyone who knows the seed can remove")
        if request.clipping != "flat":
            reasons.append(f"run asks for clipping {request.clipping!r}, which has no formal guarantee")
        if request.report_unclipped and request.noise_placement == "client":
            reasons.append("run asks for the unnoised bit [norm <= C] while the node adds its own noise")
        if request.update_noise_multiplier < request.noise_multiplier:
            reasons.append(f"update noise multiplier {request.update_noise_multiplier:g} is below the noise "
                           f"multiplier {request.noise_multiplier:g}")  # fmt: skip
        expected_size = max(1, round(request.sample_rate * request.num_clients))
        if request.sample_size != expected_size:
            reasons.append(f"sample size {request.sample_size} is not round(q*N) = {expected_size}")
        if participation.implausible_under(request.sample_rate):
            reasons.append(
                f"this node was asked to contribute {participation.contributions} times in "
                f"{participation.effective_rounds} rounds, implausible at sample rate {request.sample_rate:g} "
                f"(binomial tail below {SAMPLING_TEST_LEVEL:g})"
            )
        return reasons

    def epsilon_of(self, request: PolicyRequest, participation: Participation, delta: float) -> float:
        """This node's ε (RDP) by this policy: amplified over the run's rounds if it trusts the
        server's sampling, else over its own contributions without amplification."""
        if self.trust_server_sampling:
            return amplified_epsilon(request, participation, delta)
        return unamplified_epsilon(request, participation, delta)

    def secure_aggregation_violation(
        self, params: DistributedDPParams, participation: Participation, rounds: int, sample_rate: float, delta: float
    ) -> str | None:
        """Under secure aggregation with distributed DP: one line naming the limits broken, or None.

        The node's ε comes from what it sees: the threshold t and its own share's μ (so the
        noise of any released sum), the rounded sensitivity, and its own contributions, with no
        amplification unless it trusts the server's sampling (then over ``rounds`` at
        ``sample_rate``); never from a claimed ε.
        """
        reasons = []
        if self.min_noise_multiplier is not None and params.noise_multiplier < self.min_noise_multiplier:
            reasons.append(f"noise multiplier {params.noise_multiplier:g} is below this node's minimum "
                           f"{self.min_noise_multiplier:g}")  # fmt: skip
        if self.max_clip_norm is not None and params.clip_norm > self.max_clip_norm:
            reasons.append(f"clip norm {params.clip_norm:g} is above this node's maximum {self.max_clip_norm:g}")
        if self.max_epsilon is not None:
            delta = min(delta, self.delta)
            if self.trust_server_sampling:
                history, basis = [(sample_rate, max(rounds, participation.effective_rounds))], "trusting the server's sampling"
            else:
                history, basis = [(1.0, participation.contributions)], "without amplification by sampling"
            epsilon = distributed_epsilon(params, history, delta)[0]
            if epsilon > self.max_epsilon:
                reasons.append(
                    f"epsilon {epsilon:.3g} at delta {delta:g} after {participation.contributions} contributions "
                    f"under secure aggregation (threshold {params.threshold}, {basis}) is above this node's "
                    f"maximum {self.max_epsilon:g}"
                )
        return "; ".join(reasons) or None

    def _basis(self, request: PolicyRequest, participation: Participation) -> str:
        if self.trust_server_sampling:
            return (f"after {accounted_rounds(request, participation)} rounds (noise multiplier "
                    f"{request.noise_multiplier:g}, sample rate {request.sample_rate:g}, trusting the server's "
                    "sampling)")  # fmt: skip
        return (f"after {participation.contributions} contributions (noise multiplier "
                f"{request.noise_multiplier:g}, without amplification by sampling)")  # fmt: skip


def accounted_rounds(request: PolicyRequest, participation: Participation) -> int:
    """The rounds a node that trusts the server's sampling counts: the planned rounds, or more if
    it has seen more (a round number past them, or repeated round numbers)."""
    return max(request.rounds, participation.effective_rounds)


def amplified_epsilon(request: PolicyRequest, participation: Participation, delta: float) -> float:
    """ε of the run's rounds of Poisson(q)-subsampled Gaussian releases, as the server claims them."""
    if not (request.noise_multiplier > 0 and 0 < request.sample_rate <= 1):
        return math.inf
    return _epsilon(request.noise_multiplier, request.sample_rate, accounted_rounds(request, participation), delta)


def unamplified_epsilon(request: PolicyRequest, participation: Participation, delta: float) -> float:
    """ε of this node's own contributions, each a Gaussian release with multiplier σ (no sampling)."""
    if participation.contributions == 0:
        return 0.0
    if not request.noise_multiplier > 0:
        return math.inf
    return _epsilon(request.noise_multiplier, 1.0, participation.contributions, delta)


@lru_cache(maxsize=1024)
def _epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    # One process serves many simulated nodes, which ask for the same few values every round.
    return epsilon_for(noise_multiplier, sample_rate, steps, delta)[0]
