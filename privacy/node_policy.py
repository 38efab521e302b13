"""A SuperNode's privacy policy: the least privacy its data owner accepts from any run.

The data owner writes the policy into the SuperNode's node config (``flower-supernode
--node-config "policy-min-noise-multiplier=1.0 policy-max-epsilon=8 ..."``); the
ClientApp checks every train message against it before it touches the data and
refuses a run that asks for less. Whatever a submitter or the server claims, the
node recomputes ε itself from the mechanism's parameters (σ, q, δ, rounds).

Pure: no Flower, no I/O; the ClientApp hands in its node config, the train
message's config record and the run's settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from dpfl.errors import UsageError
from dpfl.privacy.accountants.rdp import epsilon_for
from dpfl.privacy.mechanism import CLIP_NORM, DELTA, EPSILON_VALID, NOISE_MULTIPLIER, SAMPLE_RATE

POLICY_PREFIX = "policy-"
# The round number in a train message's config (strategies.base.SERVER_ROUND_KEY, which
# lives with the Flower glue this module must not import).
SERVER_ROUND = "server-round"
# δ at which the node computes ε when the policy does not name one.
DEFAULT_POLICY_DELTA = 1e-5


@dataclass(frozen=True)
class PolicyRequest:
    """What one train message asks of the node, as the node sees it."""

    strategy: str
    noise_multiplier: float
    clip_norm: float  # 0 = no clipping (a non-private strategy)
    sample_rate: float
    delta: float
    rounds: int
    epsilon_valid: bool

    @classmethod
    def from_train(cls, config: Mapping[str, Any], settings: Any) -> PolicyRequest:
        """From a train message's config record and the run's ``RunSettings``.

        σ, C, q and δ are what the server's mechanism actually uses (σ may have been
        calibrated from a target ε), so they come from the message. Rounds are the
        larger of the run's and the message's round number: a server that runs past
        its announced rounds is judged by what it does.
        """
        return cls(
            strategy=str(settings.strategy),
            noise_multiplier=float(config[NOISE_MULTIPLIER]),
            clip_norm=float(config[CLIP_NORM]),
            sample_rate=float(config[SAMPLE_RATE]),
            delta=float(config[DELTA]),
            rounds=max(int(settings.num_server_rounds), int(config[SERVER_ROUND])),
            epsilon_valid=bool(config[EPSILON_VALID]),
        )


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

    def violation(self, request: PolicyRequest) -> str | None:
        """One line naming every limit ``request`` breaks, or None when it respects them all."""
        reasons = []
        if self.registered_strategies_only and ":" in request.strategy:
            reasons.append(
                f"strategy {request.strategy!r} is a plugin given as module:Class, "
                "but this node runs registered strategies only"
            )
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
            epsilon = self.epsilon_of(request, delta)
            if epsilon > self.max_epsilon:
                reasons.append(
                    f"epsilon {epsilon:.3g} at delta {delta:g} after {request.rounds} rounds "
                    f"(noise multiplier {request.noise_multiplier:g}, sample rate {request.sample_rate:g}) "
                    f"is above this node's maximum {self.max_epsilon:g}"
                )
        return "; ".join(reasons) or None

    @staticmethod
    def epsilon_of(request: PolicyRequest, delta: float) -> float:
        """ε of the run's rounds of Poisson-subsampled Gaussian releases, computed here (RDP)."""
        if not (request.noise_multiplier > 0 and 0 < request.sample_rate <= 1):
            return math.inf
        return epsilon_for(request.noise_multiplier, request.sample_rate, request.rounds, delta)[0]
