"""The client-level Gaussian mechanism: the one owner of everything the guarantee rests on.

Per round, on the server: refuse a round that would exceed the budget; sample
clients by Poisson(q) from a secure stream; tell every client what it must do
(:meth:`ClientLevelMechanism.instructions`). On each client
(:func:`privatise_update`): clip the private part u of its update to C in
float64 and add its noise share. What a client does is derived from the few
values a node's policy checks (σ, C, N, the clipping mode,
:meth:`ClientInstructions.from_config`), never from a separate key: a node that
checked σ cannot be told to add another noise std. Back on the server
(:meth:`ClientLevelMechanism.release`): screen every update, re-clip, record the
round in the accountant *before* any noise is drawn (write-ahead: a crash can
only over-count), sum, add the noise, and divide by the fixed qN (dividing by the
realised count would release it).

Adaptive clipping (:mod:`dpfl.privacy.adaptive_clipping`): the clip norm C is then
the mechanism's state, each sampled client also reports [‖u‖ ≤ C], and
:meth:`ClientLevelMechanism.release` releases the noisy unclipped fraction with the
update and moves C; the update's noise multiplier is σ_Δ > σ, so that the
accountant, told σ, covers both releases.

Noise placement. ``server``: the server adds N(0, σ²C²) to the sum. ``client``:
every one of the N clients adds a share N(0, σ²C²/N) each round, the sampled ones
to their update and the others to a zero update, and the server adds only the
shares of clients that did not reply. The released noise is then N(0, σ²C²)
whatever the number of sampled or replying clients, so its level reveals neither;
it assumes every client adds its share honestly.

Secure aggregation (``MechanismParams.secure_aggregation``): every node encodes its
clipped update (a zero one if not sampled) with its distributed Skellam share
(:func:`encode_secure_update`, :mod:`dpfl.privacy.distributed_dp`), the server learns
only the sum mod 2^b, and :meth:`ClientLevelMechanism.release_secure_sum` decodes it,
bounds its norm and divides by qN; the round is accounted (:meth:`account_round`) before
the sum is unmasked, with the Skellam accountant.

A minimum number of replies (``min_replies`` > 0): whether a round's update is
applied depends on how many sampled clients replied, a private count. The server
therefore releases that count only with Gaussian noise (std ``reply_count_noise``,
sensitivity 1) and skips the update when the noisy count is below the minimum.
The count and the update are then one Gaussian release of the vector
(Σu/C, Σ1) whose noise multiplier is σ when the update's own multiplier is
σ_Δ = (σ⁻² − σ_c⁻²)^(−1/2) (:func:`split_noise_multiplier`, Andrew et al. 2021,
Thm. 1): the accountant, told σ, stays exact.

A strategy with ``private = False`` is a reference curve without DP: no
clipping, no noise, a plain mean over the clients that replied, no accounting.
``clipping = "paper"`` reproduces the DP-FedPGN authors' code (github.com/junkangLiu0/DP-FedPGN
at 6203180, for Liu et al., arXiv 2510.27504: per-tensor median clipping, client
noise σC_i/√m, fixed-size sampling) and has no formal guarantee.

The mechanism's parameters, randomness, accountant, clip norm and the round's
sample cannot be rebound after construction (read-only attributes): a strategy
plugin holds the mechanism through the platform's base class, and a mistake there
must not silently weaken the noise while ε is still reported.

Pure math: no Flower, no I/O. Randomness comes from :mod:`dpfl.privacy.randomness`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dpfl.privacy.accountants import Accountant
from dpfl.privacy.adaptive_clipping import (
    AdaptiveClipping,
    check_adaptive_clipping_supported,
    check_count_noise,
    count_noise_multiplier,
    unclipped_bit,
)
from dpfl.privacy.clipping import clip_rows, per_tensor_median_clip, row_block
from dpfl.privacy.distributed_dp import DistributedDPParams, bounded_sum, decode, encode
from dpfl.flat import FlatTensors, Layout, flat_tensors, float64_norm
from dpfl.privacy.participation import CorrelatedMechanism, ParticipationSchema, check_schema_supported
from dpfl.privacy.randomness import Randomness, RandomStream
from dpfl.privacy.sampling import fixed_size_sample, poisson_sample

Tensors = Mapping[str, torch.Tensor]

NOISE_PLACEMENTS = ("server", "client")
# "flat" is the sound mechanism; "paper" the DP-FedPGN authors' code's (no formal guarantee).
CLIPPING_MODES = ("flat", "paper")
PAPER_MODE_WARNING = (
    "clipping=paper reproduces the DP-FedPGN authors' code's per-tensor, data-dependent clipping with "
    "fixed-size sampling: it carries NO formal differential-privacy guarantee, and epsilon is not valid"
)
REPRODUCIBLE_NOISE_WARNING = (
    "reproducible-noise derives the privacy noise and the client sample from the seed: anyone who knows "
    "or guesses the seed can remove the noise, so epsilon is NOT valid (for debugging and exact reproduction only)"
)
# A client-placement update is implausible past C + s(√d + t): a Gaussian share's
# norm exceeds s(√d + t) with probability at most exp(−t²/2) (≈ 2e-22 at t = 10).
PLAUSIBLE_NOISE_TAIL = 10.0
# Relative slack under which a received update counts as clipped (its norm is C).
CLIPPED_TOLERANCE = 1e-6


def split_noise_multiplier(total: float, *others: float) -> float:
    """σ_Δ such that a σ_Δ release and releases of the same sample with multipliers ``others`` cost one σ release.

    Gaussian releases of the same clients with multipliers σ_Δ and σ_o (noise std
    over sensitivity) are one Gaussian release of their concatenation with
    multiplier (σ_Δ⁻² + Σσ_o⁻²)^(−1/2); solving for σ_Δ gives (σ⁻² − Σσ_o⁻²)^(−1/2).
    """
    if not others:
        return total
    remaining = total**-2 - sum(other**-2 for other in others)
    if not remaining > 0:
        listed = ", ".join(f"{other:g}" for other in others)
        raise ValueError(f"the other releases' noise multipliers ({listed}) leave no part of the total {total:g}")
    return remaining**-0.5


def noise_share_std(update_noise_multiplier: float, clip_norm: float, num_clients: int) -> float:
    """One client's share under client placement, σ_Δ·C/√N: N shares sum to the update's σ_Δ·C."""
    return update_noise_multiplier * clip_norm / math.sqrt(num_clients)


# The train-config entries the mechanism sends; a strategy may not set or override them.
CLIP_NORM = "clip-norm"
CONTRIBUTE_UPDATE = "contribute-update"
CLIPPING = "clipping"
NOISE_MULTIPLIER = "noise-multiplier"
# σ_Δ ≥ σ: the update's own multiplier when other noisy releases share the round.
UPDATE_NOISE_MULTIPLIER = "update-noise-multiplier"
NOISE_PLACEMENT = "noise-placement"
NUM_CLIENTS = "num-clients"
SAMPLE_RATE = "sample-rate"
SAMPLE_SIZE = "sample-size"
DELTA = "delta"
REPRODUCIBLE_NOISE = "reproducible-noise"
REPORT_UNCLIPPED = "report-unclipped"
# Secure aggregation: the node's distributed noise share is sized from t, N, b and the values above.
AGGREGATION = "aggregation"
SECAGG_THRESHOLD = "secagg-threshold"
SECAGG_BITS = "secagg-bits"
INSTRUCTION_KEYS = frozenset(
    {CLIP_NORM, CONTRIBUTE_UPDATE, CLIPPING, NOISE_MULTIPLIER, UPDATE_NOISE_MULTIPLIER, NOISE_PLACEMENT,
     NUM_CLIENTS, SAMPLE_RATE, SAMPLE_SIZE, DELTA, REPRODUCIBLE_NOISE, REPORT_UNCLIPPED, AGGREGATION,
     SECAGG_THRESHOLD, SECAGG_BITS}
)  # fmt: skip
# The reply's entry holding an adaptive-clipping client's bit [‖u‖ ≤ C].
UNCLIPPED = "unclipped"


@dataclass(frozen=True)
class MechanismParams:
    """What defines one run's mechanism (all public)."""

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    num_clients: int
    delta: float
    noise_placement: str = "server"
    clipping: str = "flat"
    private: bool = True
    reproducible_noise: bool = False
    adaptive_clipping: AdaptiveClipping | None = None
    # Skip a round's update when fewer replies arrived (a noisy count; 0 = never skip).
    min_replies: int = 0
    reply_count_noise: float = 0.0
    # Who may take part when, and the noise that relies on it (dpfl.privacy.participation);
    # None: Poisson sampling and independent Gaussian noise.
    schema: ParticipationSchema | None = None
    # Secure aggregation with distributed Skellam noise (dpfl.privacy.distributed_dp); None: plain sums.
    secure_aggregation: DistributedDPParams | None = None

    def __post_init__(self) -> None:
        if self.secure_aggregation is not None and not (
            self.flat and self.noise_placement == "server" and self.adaptive_clipping is None
            and self.schema is None and not self.counts_replies
        ):  # fmt: skip
            raise ValueError("secure aggregation needs flat clipping at a fixed clip norm, Poisson sampling, no "
                             "min-replies and no client noise shares (its clients add Skellam noise instead)")  # fmt: skip
        if self.schema is not None:
            check_schema_supported(self.schema, self.noise_placement, self.clipping,
                                   self.adaptive_clipping is not None, self.min_replies)  # fmt: skip
        if self.counts_replies and self.flat and not self.reply_count_noise > self.noise_multiplier:
            raise ValueError(
                f"reply-count-noise must exceed the noise multiplier {self.noise_multiplier:g} when "
                f"min-replies is set, got {self.reply_count_noise:g}"
            )
        if self.adaptive_clipping is not None:
            check_adaptive_clipping_supported(self.noise_placement, self.clipping)
            check_count_noise(self.noise_multiplier, self.adaptive_clipping.count_noise_std)
        if self.flat:  # together, the other releases must leave the update a part of σ
            split_noise_multiplier(self.noise_multiplier, *self.other_release_multipliers())

    @property
    def counts_replies(self) -> bool:
        return self.min_replies > 0

    def other_release_multipliers(self) -> list[float]:
        """Multipliers of the round's releases beside the update: the reply count, adaptive clipping's count."""
        others = [self.reply_count_noise] if self.counts_replies else []
        if self.adaptive_clipping is not None:
            others.append(count_noise_multiplier(self.adaptive_clipping.count_noise_std))
        return others

    @property
    def update_noise_multiplier(self) -> float:
        """The multiplier of the update's own noise: σ, or σ_Δ when other noisy releases share the round."""
        if self.flat:
            return split_noise_multiplier(self.noise_multiplier, *self.other_release_multipliers())
        return self.noise_multiplier

    @property
    def expected_clients(self) -> float:
        if self.schema is not None:
            return self.schema.expected_clients(self.sample_rate, self.num_clients)
        return self.sample_rate * self.num_clients

    @property
    def sample_size(self) -> int:
        """The paper mode's fixed sample size, round(qN) and at least 1 (what a node's policy checks)."""
        return max(1, round(self.sample_rate * self.num_clients))

    @property
    def epsilon_valid(self) -> bool:
        """Whether the accountant's ε is a guarantee of this run as it runs."""
        return self.private and self.clipping == "flat" and not self.reproducible_noise

    @property
    def flat(self) -> bool:
        return self.private and self.clipping == "flat"

    @property
    def every_node_asked(self) -> bool:
        """Whether every node gets a message each round (its noise share is in every release)."""
        return self.secure_aggregation is not None or self.client_noise_std() > 0

    def client_noise_std(self, clip_norm: float | None = None) -> float:
        """Each client's share: σ_ΔC/√N (every client adds one each round, sampled or not).

        ``clip_norm`` is the round's C (default: the initial one).
        """
        if not self.flat or self.noise_placement != "client":
            return 0.0
        return noise_share_std(self.update_noise_multiplier, clip_norm or self.clip_norm, self.num_clients)

    def server_noise_std(self, shares: int, clip_norm: float | None = None) -> float:
        """Std of the noise the server adds when ``shares`` client shares arrived, at the round's C."""
        if not self.flat:
            return 0.0
        std = self.update_noise_multiplier * (clip_norm or self.clip_norm)
        if self.noise_placement == "server":
            return std
        return std * math.sqrt(max(0.0, 1.0 - shares / self.num_clients))


@dataclass
class _RoundState:
    """What the mechanism changes as the run goes; held where a strategy cannot rebind it."""

    # The round's C: fixed, or moved by adaptive clipping after every release.
    clip_norm: float
    # Adaptive clipping's public release of the last round: (its C, its noisy unclipped fraction).
    last_adaptive_release: tuple[float, float] | None = None
    # The round's sample (private: only the server may know who was sampled).
    sampled: frozenset[int] = frozenset()


class ClientLevelMechanism:
    """The server's half of the mechanism for one run, with its accountant.

    ``journal``, if given, is called with the accountant's state each time a round
    is recorded, before that round's noise is drawn: the server persists it there,
    so the ledger on disk is never behind what has been released. It is the one
    attribute that may be set after construction (the server sets it once the run
    folder exists); every other one is read-only.
    """

    _SETTABLE = frozenset({"journal", "private_journal"})

    def __init__(
        self,
        params: MechanismParams,
        accountant: Accountant,
        randomness: Randomness,
        journal: Callable[[dict], None] | None = None,
    ) -> None:
        if params.reproducible_noise != randomness.reproducible:
            raise ValueError("the mechanism's reproducible-noise flag must match its randomness")
        set_attribute = super().__setattr__
        set_attribute("_params", params)
        set_attribute("_accountant", accountant)
        set_attribute("_randomness", randomness)
        set_attribute("_state", _RoundState(clip_norm=params.clip_norm))
        set_attribute("journal", journal)
        set_attribute("private_journal", None)
        schema = params.schema
        correlated = None
        if schema is not None and schema.scheduled:
            correlated = CorrelatedMechanism(schema, randomness.key("correlated-noise"))
        set_attribute("_correlated", correlated)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._SETTABLE:
            raise AttributeError(
                f"the mechanism's {name!r} cannot be set: its parameters, randomness, accountant, clip norm "
                "and sample are fixed by the platform"
            )
        super().__setattr__(name, value)

    @property
    def params(self) -> MechanismParams:
        return self._params

    @property
    def accountant(self) -> Accountant:
        return self._accountant

    @property
    def randomness(self) -> Randomness:
        return self._randomness

    @property
    def clip_norm(self) -> float:
        return self._state.clip_norm

    @property
    def last_adaptive_release(self) -> tuple[float, float] | None:
        return self._state.last_adaptive_release

    def contributes(self, node: int) -> bool:
        """Whether ``node`` is in this round's sample (its reply carries an update, not only a share)."""
        return node in self._state.sampled

    @property
    def adaptive(self) -> bool:
        return self.params.flat and self.params.adaptive_clipping is not None

    # --- before the round -----------------------------------------------------------

    def budget_refusal(self, server_round: int, max_epsilon: float) -> str | None:
        """Why round ``server_round`` may not run under ``max_epsilon``, or None."""
        step = self._accounting_step(server_round)
        if not self.params.epsilon_valid or step is None:
            return None
        projected = self.accountant.epsilon_after_step(*step)
        if projected <= max_epsilon:
            return None
        return (
            f"round {server_round} would raise epsilon to {projected:.3f}, over the budget {max_epsilon:g} "
            f"(spent so far: {self.accountant.epsilon():.3f})"
        )

    def sample(self, nodes: Sequence[int], server_round: int) -> list[int]:
        """This round's clients: Poisson(q), or the paper mode's fixed-size sample (kept for the round)."""
        stream = self.randomness.stream("sampling", server_round)
        if self.params.private and self.params.clipping == "paper":
            sampled = fixed_size_sample(nodes, self.params.sample_size, stream)
        elif self._correlated is not None:
            sampled = self._correlated.sample(nodes, server_round, self.params.sample_rate, stream)
        else:
            sampled = poisson_sample(nodes, self.params.sample_rate, stream)
        self._state.sampled = frozenset(sampled)
        return sampled

    def recipients(self, nodes: Sequence[int], sampled: Sequence[int]) -> list[tuple[int, bool]]:
        """(node, contributes an update) for every node that gets a message this round.

        Under client placement every node adds its noise share, so every node is
        asked; only the sampled ones contribute their update.
        """
        chosen = set(sampled)
        if self.params.every_node_asked:
            return [(node, node in chosen) for node in nodes]
        return [(node, True) for node in nodes if node in chosen]

    def instructions(self, contribute_update: bool) -> dict[str, bool | int | float | str]:
        """What a client is told: the mechanism's public values, from which it derives what it does."""
        p = self.params
        return {
            CONTRIBUTE_UPDATE: contribute_update,
            CLIPPING: p.clipping,
            CLIP_NORM: self.clip_norm if p.private else 0.0,  # 0: no clipping
            NOISE_MULTIPLIER: p.noise_multiplier,
            UPDATE_NOISE_MULTIPLIER: p.update_noise_multiplier,
            NOISE_PLACEMENT: p.noise_placement,
            NUM_CLIENTS: p.num_clients,
            SAMPLE_RATE: p.sample_rate,
            SAMPLE_SIZE: p.sample_size,
            DELTA: p.delta,
            REPRODUCIBLE_NOISE: p.reproducible_noise,
            REPORT_UNCLIPPED: self.adaptive,
            AGGREGATION: "secagg" if p.secure_aggregation else "plain",
            SECAGG_THRESHOLD: p.secure_aggregation.threshold if p.secure_aggregation else 0,
            SECAGG_BITS: p.secure_aggregation.bits if p.secure_aggregation else 0,
        }

    def secure_round_seeds(self, server_round: int) -> tuple[bytes, bytes]:
        """The round's public seeds of secure aggregation: (the rotation's, the neighbourhood graph's).

        Public by design (every client needs them), drawn from the secure randomness so
        that no party chooses them: the rotation protects only against wrap-around."""
        return self.randomness.key("secagg-rotation", server_round), self.randomness.key("secagg-graph", server_round)

    # --- after the replies ------------------------------------------------------------

    def screen(self, update: Tensors, like: Tensors | Layout) -> str | None:
        """Why ``update`` must be dropped before aggregation, or None if it may be used.

        ``like``: the model's tensors, or their :class:`Layout` (taken once for a round's
        replies). An update that travelled as a flat vector of the same layout
        (:class:`dpfl.flat.FlatTensors`) has the model's names, shapes and dtypes
        by construction; any other is checked name by name.
        """
        layout = like if isinstance(like, Layout) else Layout(like)
        if not (isinstance(update, FlatTensors) and update.layout == layout):
            if update.keys() != layout.shapes.keys():
                missing, extra = sorted(layout.shapes.keys() - update.keys()), sorted(update.keys() - layout.shapes.keys())
                return f"tensor names differ from the model's (missing {missing[:3]}, unexpected {extra[:3]})"
            for name, shape in layout.shapes.items():
                if update[name].shape != shape:
                    return f"tensor {name!r} has shape {tuple(update[name].shape)}, the model's is {shape}"
                if update[name].dtype != layout.dtypes[name]:
                    return f"tensor {name!r} has dtype {update[name].dtype}, the model's is {layout.dtypes[name]}"
        # One pass: the norm in float64 is finite exactly when every value is (a float32 or
        # smaller value squared cannot overflow it; a float64 update that does is dropped too).
        norm = float64_norm(update, layout)
        if not math.isfinite(norm):
            return "the update has NaN or Inf values"
        share = self.params.client_noise_std(self.clip_norm)
        if share > 0:
            bound = self.clip_norm + share * (math.sqrt(layout.size) + PLAUSIBLE_NOISE_TAIL)
            if norm > bound:
                return f"the update's norm {norm:.4g} is implausible for C plus one noise share (bound {bound:.4g})"
        return None

    def screen_unclipped(self, value: Any) -> str | None:
        """Why an adaptive-clipping client's reported bit must be dropped (with its update), or None."""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
            return None
        return f"the reported {UNCLIPPED!r} bit must be 0 or 1, got {value!r}"

    def release(
        self,
        updates: Sequence[Tensors],
        like: Tensors,
        server_round: int,
        contributions: int | None = None,
        unclipped: Sequence[float] = (),
    ) -> dict[str, torch.Tensor] | None:
        """The released mean of the screened replies ``updates``, or None if the round's update is skipped.

        Accounts the round either way. Under client placement ``updates`` also holds
        the noise-only replies of the clients that were not sampled (each carries
        one noise share); ``contributions`` is then the number of sampled clients'
        updates among them (default: all). Under adaptive clipping ``unclipped``
        holds the bits of the same replies: their noisy fraction is released too
        (:attr:`last_adaptive_release`) and moves C for the next round. Computed in
        float64 and returned in the dtypes of ``like``.
        """
        p = self.params
        self._state.last_adaptive_release = None
        self.account_round(server_round)
        self._journal_correlated(server_round)
        if p.counts_replies and self.too_few_replies(len(updates) if contributions is None else contributions, server_round):
            return None
        # One float64 vector for the sum (dpfl.flat), named views of it only at the end;
        # the updates re-clipped and summed as [rows, d] matrices, a cache-sized block of rows at once.
        layout = Layout(like)
        total = torch.zeros(layout.size, dtype=torch.float64)
        rows = row_block(layout.size)
        for first in range(0, len(updates), rows):
            matrix = torch.stack([layout.flatten(update) for update in updates[first : first + rows]])
            if p.flat and p.noise_placement == "server":
                # Re-clip: the sensitivity bound holds, for what is summed, whatever a client sent.
                matrix, _ = clip_rows(matrix, self.clip_norm, layout.cast)
            total += matrix.double().sum(dim=0)
        std = p.server_noise_std(len(updates), self.clip_norm)
        if std > 0 and self._correlated is not None:
            total += self._correlated.noise(server_round, layout.sizes, std)
        elif std > 0:
            total += self.randomness.stream("server-noise", server_round).gaussian_segments(layout.sizes, std)
        if p.private:
            denominator = p.expected_clients if p.clipping == "flat" else p.sample_size
        else:
            denominator = max(1, len(updates))
        if self.adaptive:
            self._adapt_clip_norm(unclipped, server_round)
        return layout.unflatten(total / denominator)

    def account_round(self, server_round: int) -> None:
        """Spend the round in the accountant (and journal it): write-ahead, before its noise is
        drawn or, under secure aggregation, before the sum is unmasked. A crash can only over-count."""
        step = self._accounting_step(server_round)
        if self.params.epsilon_valid and step is not None:
            self.accountant.step(*step)
            if self.journal is not None:
                self.journal(self.accountant.state_dict())

    def release_secure_sum(
        self, total: np.ndarray | None, like: Tensors, rotation_seed: bytes, inputs: int
    ) -> dict[str, torch.Tensor] | None:
        """The released mean from secure aggregation's unmasked sum mod 2^b of ``inputs`` encoded
        updates (the round already accounted by :meth:`account_round`), or None when the round
        released no sum (too few survivors).

        Decoded, its norm bounded by what ``inputs`` honest clients can give
        (:func:`dpfl.privacy.distributed_dp.bounded_sum`: post-processing that caps what one
        hostile client's residues can do), and divided by the fixed qN. The noise is the
        clients' (at least t threshold-sized shares): the server adds none.
        """
        secure = self.params.secure_aggregation
        assert secure is not None, "release_secure_sum without secure aggregation"
        if total is None:
            return None
        layout = Layout(like)
        decoded = bounded_sum(decode(total, secure, rotation_seed), secure, inputs)
        return layout.unflatten(torch.from_numpy(decoded) / self.params.expected_clients)

    def _adapt_clip_norm(self, unclipped: Sequence[float], server_round: int) -> None:
        adaptive = self.params.adaptive_clipping
        assert adaptive is not None
        stream = self.randomness.stream("clip-count-noise", server_round)
        fraction = adaptive.noisy_unclipped_fraction(unclipped, self.params.expected_clients, stream)
        self._state.last_adaptive_release = (self.clip_norm, fraction)
        self._state.clip_norm = adaptive.next_clip_norm(self.clip_norm, fraction)

    def state_dict(self) -> dict[str, float]:
        """The mechanism's public state (C under adaptive clipping); never its randomness."""
        return {"clip-norm": self.clip_norm}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self._state.clip_norm = float(state["clip-norm"])

    def too_few_replies(self, contributions: int, server_round: int) -> bool:
        """Whether the (noisy, for a private strategy) count of contributions is below ``min_replies``."""
        count = float(contributions)
        if self.params.flat:
            count += float(self.randomness.stream("reply-count", server_round).gaussian((), self.params.reply_count_noise))
        return count < self.params.min_replies

    def privacy_spent(self) -> tuple[float, float]:
        """(ε, best RDP order) so far, or NaNs when ε is not a valid guarantee of this run."""
        if not self.params.epsilon_valid:
            return math.nan, math.nan
        return self.accountant.privacy_spent()

    def is_clipped(self, update: Tensors) -> bool:
        """Whether a received (server-placement) update sits at the clip bound: a server-side diagnostic."""
        return float64_norm(update) >= self.clip_norm * (1 - CLIPPED_TOLERANCE)

    # --- participation schemas and correlated noise (dpfl.privacy.participation) ------

    def _accounting_step(self, server_round: int) -> tuple[float, float] | None:
        """The (σ, q) the accountant records in ``server_round``: every round, or once per block of a schema."""
        schema = self.params.schema
        if schema is None:
            return self.params.noise_multiplier, self.params.sample_rate
        if not schema.records_step(server_round):
            return None
        return self.params.noise_multiplier, schema.accounting_rate(self.params.sample_rate)

    def _journal_correlated(self, server_round: int) -> None:
        """Write-ahead, like the ledger: the secret state goes to the server-private journal before the noise."""
        if self._correlated is None:
            return
        self._correlated.begin_round(server_round)
        if self.private_journal is not None:
            self.private_journal(self._correlated.private_state())

    @property
    def has_private_state(self) -> bool:
        """Whether the mechanism keeps a secret state a resume needs (a participation schema's)."""
        return self._correlated is not None

    def restore_private_state(self, state: Mapping[str, Any], completed_round: int) -> None:
        """Continue the schema's sampler and correlated noise after ``completed_round`` (ValueError if it cannot)."""
        assert self._correlated is not None, "restore_private_state without a participation schema"
        self._correlated.restore(state, completed_round)


@dataclass(frozen=True)
class ClientInstructions:
    """The client's reading of :meth:`ClientLevelMechanism.instructions`.

    Everything here is derived from the values a node's policy checks
    (:mod:`dpfl.privacy.node_policy`): the noise share from σ_Δ (never below the
    checked σ), C and N; there is no separate noise key a server could set to 0.
    """

    contribute_update: bool
    clipping: str
    clip_norm: float
    client_noise_std: float
    noise_multiplier: float
    sample_size: int
    reproducible_noise: bool
    report_unclipped: bool = False
    # Secure aggregation: (t, b), from which the node sizes its Skellam share; None: a plain sum.
    secure_sum: tuple[int, int] | None = None
    num_clients: int = 1

    @classmethod
    def flat(cls, clip_norm: float, client_noise_std: float = 0.0) -> ClientInstructions:
        """Flat clipping to ``clip_norm`` (0: none) and a noise share of ``client_noise_std``."""
        return cls(True, "flat", clip_norm, client_noise_std, 0.0, 1, False)

    def unclipped_report(self, norm: float) -> dict[str, int]:
        """What the client reports beside its update: {``UNCLIPPED``: [‖u‖ ≤ C]} if asked, else nothing."""
        return {UNCLIPPED: unclipped_bit(norm, self.clip_norm)} if self.report_unclipped else {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClientInstructions:
        """What the client does, derived from a train message's mechanism values; ValueError if malformed."""
        clipping, placement = str(config[CLIPPING]), str(config[NOISE_PLACEMENT])
        noise_multiplier, clip_norm = float(config[NOISE_MULTIPLIER]), float(config[CLIP_NORM])
        num_clients = int(config[NUM_CLIENTS])
        if clipping not in CLIPPING_MODES or placement not in NOISE_PLACEMENTS:
            raise ValueError(f"clipping {clipping!r} or noise placement {placement!r} is not one the mechanism knows")
        if not (noise_multiplier >= 0 and clip_norm >= 0 and num_clients >= 1):
            raise ValueError(f"noise multiplier {noise_multiplier:g}, clip norm {clip_norm:g} and {num_clients} clients "
                             "are not a mechanism")  # fmt: skip
        share = 0.0
        if placement == "client" and clipping == "flat" and clip_norm > 0:
            # σ_Δ is at least σ (other releases only take from σ): never below what the node checked.
            update_multiplier = max(noise_multiplier, float(config[UPDATE_NOISE_MULTIPLIER]))
            share = noise_share_std(update_multiplier, clip_norm, num_clients)
        return cls(
            contribute_update=bool(config[CONTRIBUTE_UPDATE]),
            clipping=clipping,
            clip_norm=clip_norm,
            client_noise_std=share,
            noise_multiplier=noise_multiplier,
            sample_size=int(config[SAMPLE_SIZE]),
            reproducible_noise=bool(config[REPRODUCIBLE_NOISE]),
            report_unclipped=bool(config[REPORT_UNCLIPPED]),
            secure_sum=(int(config[SECAGG_THRESHOLD]), int(config[SECAGG_BITS]))
            if str(config[AGGREGATION]) == "secagg" else None,
            num_clients=num_clients,
        )

    def distributed_params(self, size: int) -> DistributedDPParams:
        """Secure aggregation's mechanism for an update of ``size`` coordinates, from the checked values:
        the share is sized for t inputs at σ (never below the σ a node's policy checked); ValueError if
        the values are no mechanism."""
        assert self.secure_sum is not None, "distributed_params without secure aggregation"
        threshold, bits = self.secure_sum
        return DistributedDPParams(clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier, size=size,
                                   threshold=threshold, max_inputs=self.num_clients, bits=bits)  # fmt: skip


def privatise_update(
    private: Tensors, instructions: ClientInstructions, stream: RandomStream
) -> tuple[Tensors, float]:
    """The client's half: clip the private part and add its noise share; return it and ‖u‖
    (:func:`privatise_vector` on the update laid out as one vector)."""
    layout = Layout(private)
    return privatise_vector(layout.flatten(private), layout, instructions, stream)


def privatise_vector(
    vector: torch.Tensor, layout: Layout, instructions: ClientInstructions, stream: RandomStream
) -> tuple[Tensors, float]:
    """The client's half on its private part as one vector (``layout``'s): one norm, one
    scale, one noise draw; the result as named views for the reply, and ‖u‖
    (:func:`privatise_rows` on one row).

    ``clip_norm`` 0 means no clipping (a strategy without DP). A non-finite update is
    sent as zeros plus the share (:func:`dpfl.privacy.clipping.clip_vector`).
    """
    [(update, norm)] = privatise_rows(vector.unsqueeze(0), layout, [instructions], [stream])
    return update, norm


def privatise_rows(
    matrix: torch.Tensor,
    layout: Layout,
    instructions: Sequence[ClientInstructions],
    streams: Sequence[RandomStream],
) -> list[tuple[Tensors, float]]:
    """Several clients' halves at once, one client a row of ``matrix`` [n, d] (``layout``'s):
    each row clipped to its client's C with one float64 norm per row
    (:func:`dpfl.privacy.clipping.clip_rows`, all rows of one C as one matrix operation),
    then its client's noise share from its own ``streams`` entry. Each row's result and ‖u‖
    equal what that client alone would get."""
    results: list[tuple[Tensors, float] | None] = [None] * len(matrix)
    groups: dict[ClientInstructions, list[int]] = {}
    for row, own in enumerate(instructions):
        groups.setdefault(own, []).append(row)
    for own, rows in groups.items():
        if own.clipping == "paper" and own.clip_norm > 0:
            for row in rows:
                clipped, median_norm, norm = per_tensor_median_clip(layout.unflatten(matrix[row]))
                std = own.noise_multiplier * median_norm / math.sqrt(own.sample_size)
                results[row] = add_noise(clipped, std, streams[row]), norm
            continue
        part = matrix[rows] if len(rows) < len(matrix) else matrix
        if own.clip_norm > 0:
            clipped, norms = clip_rows(part, own.clip_norm, layout.cast)
            std = own.client_noise_std
        else:
            clipped, norms, std = part, torch.linalg.vector_norm(part.double(), dim=1), 0.0
        for index, row in enumerate(rows):
            # A row of the matrix (a reply's record snapshots it: dpfl.records.tensor_record).
            results[row] = flat_tensors(layout, _noised(clipped[index], std, streams[row], layout)), float(norms[index])
    return results  # type: ignore[return-value]


def encode_secure_update(
    update: Tensors | None, like: Tensors, params: DistributedDPParams, rotation_seed: bytes, stream: RandomStream
) -> np.ndarray:
    """The client's half under secure aggregation: its clipped private part (None: a node that was
    not sampled, a zero update) re-clipped to C in float64 (the reply's dtype may have rounded its
    norm up), rotated, rounded and noised with its Skellam share, as residues mod 2^b."""
    layout = Layout(like)
    vector = torch.zeros((1, layout.size), dtype=torch.float64)
    if update is not None:
        vector, _ = clip_rows(layout.flatten(update).double().unsqueeze(0), params.clip_norm)
    return encode(vector[0].numpy(), params, rotation_seed, stream)


def noise_share(like: Tensors, instructions: ClientInstructions, stream: RandomStream) -> Tensors:
    """A client that was not sampled: its noise share on a zero update."""
    layout = Layout(like)
    zeros = torch.zeros(layout.size, dtype=layout.dtype)
    return flat_tensors(layout, _noised(zeros, instructions.client_noise_std, stream, layout))


def add_noise(tensors: Tensors, std: float, stream: RandomStream) -> dict[str, torch.Tensor]:
    """``tensors`` + N(0, std²) per coordinate, added in float64, returned in their dtypes."""
    layout = Layout(tensors)
    return layout.unflatten(_noised(layout.flatten(tensors), std, stream, layout))


def _noised(vector: torch.Tensor, std: float, stream: RandomStream, layout: Layout) -> torch.Tensor:
    """``vector`` + N(0, std²) per coordinate, added in float64 and rounded as ``layout`` holds it.

    The draws are the named tensors' own draws in their order
    (:meth:`RandomStream.gaussian_segments`), so a flat update is noised exactly as its
    tensors were one by one.
    """
    if std == 0:
        return vector
    return layout.cast(vector.double() + stream.gaussian_segments(layout.sizes, std))
