"""Participation schemas and correlated noise: who may take part when, and the noise that relies on it.

``poisson`` (the default): every round samples each client with probability q,
independently; every round is one Poisson-subsampled Gaussian (today's mechanism).

``cyclic``, with a minimum separation b: the clients (sorted by node id) fall into b
fixed groups by rank mod b; round t samples group (t − 1) mod b by Poisson(q). A
client can only take part every b-th round. ``min-sep``: a client that took part in
round s is not eligible before round s + b; each eligible client is sampled with
probability q. Either way a client takes part at most k = ⌈T/b⌉ times in T rounds,
any two at least b apart, and the server's sampler (:class:`CorrelatedMechanism`)
enforces it: it is the server's own state, never the clients'.

Noise: ``gaussian`` (independent, C = I), ``bandmf`` (the b-banded Toeplitz
factorisation of :mod:`dpfl.privacy.matrix_factorization`, band = b, optimised
for the run's T), ``tree`` (binary-tree aggregation) or ``blt`` (a buffered linear
Toeplitz factorisation), the last two in :mod:`dpfl.privacy.factorizations`. Each
is normalised so that the participations of one client in the first r rounds
(at most ⌈r/b⌉, b apart) move the released C·x by at most √⌈r/b⌉·C_clip, at every r
(for bandmf: columns b apart are orthogonal and have unit norm). The rounds b apart,
every block of b rounds [1 … b], [b+1 … 2b], … holds at most one participation per
client, so the accountant records one step per block, at its first round, before
that round's noise (write-ahead):

* ``cyclic``: the step is the Poisson-subsampled Gaussian (σ, q). This is amplified
  BandMF (Choquette-Choo et al., NeurIPS 2023, Thm. 4): with b-banded C and
  Poisson sampling within the b fixed groups, the mechanism is a post-processing of
  DP-SGD with ⌈T/b⌉ Poisson-sampled Gaussian steps, which every accountant
  composes (dp-accounting's PLD and Opacus's RDP and PRV alike).
  Only for banded C (``gaussian``, ``bandmf``): ``tree`` and ``blt`` are not banded,
  so under ``cyclic`` they are accounted as ``min-sep`` is (q = 1).
* ``min-sep``: who is eligible depends on earlier samples, so no amplification is
  claimed: the step is (σ, q = 1). ⌈r/b⌉ such steps compose to one Gaussian of
  sensitivity √⌈r/b⌉ at noise σ, the (k, b)-participation sensitivity of
  Choquette-Choo et al. (ICML 2023), unamplified, which bounds every mechanism's.

With the ``gaussian`` noise and a schema, the same holds with C = I (band 1).

Secret state. The correlated noise of round t depends on every earlier z, so the
mechanism keeps a master key (from the OS's CSPRNG, or the seed under
``--reproducible-noise``) from which z_t (the tree: every node's z) is regenerated; with the ``min-sep``
sampler's last-participation rounds, that is :meth:`CorrelatedMechanism.private_state`,
which the server keeps in a server-private file and never in a checkpoint. A resume
regenerates z_1 … z_r from the key and replays the recursion (bandmf's past noise,
blt's buffers; the tree keeps nothing but the key), so it continues the same
correlated stream.

Pure math: no Flower, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dpfl.errors import UsageError
from dpfl.privacy.factorizations import NoiseFactorisation, factorisation_for
from dpfl.privacy.matrix_factorization import max_participations
from dpfl.privacy.names import NOISE_MECHANISMS, PARTICIPATIONS
from dpfl.privacy.randomness import RandomStream, derived_stream

PRIVATE_STATE_FORMAT = "dpfl-correlated-noise-state-v1"


@dataclass(frozen=True)
class ParticipationSchema:
    """The public description of a run's participation and noise (everything here is public)."""

    participation: str
    min_separation: int
    rounds: int
    mechanism: str = "gaussian"

    def __post_init__(self) -> None:
        if self.participation not in PARTICIPATIONS:
            raise ValueError(f"participation must be one of {', '.join(PARTICIPATIONS)}, got {self.participation!r}")
        if self.mechanism not in NOISE_MECHANISMS:
            raise ValueError(f"mechanism must be one of {', '.join(NOISE_MECHANISMS)}, got {self.mechanism!r}")
        if self.correlated and self.participation == "poisson":
            raise ValueError(f"mechanism {self.mechanism} needs a participation schema: participation cyclic or "
                             "min-sep with a min-separation")  # fmt: skip
        if self.participation != "poisson" and not 1 <= self.min_separation <= self.rounds:
            raise ValueError(f"min-separation must be between 1 and the {self.rounds} rounds of the run, "
                             f"got {self.min_separation}")  # fmt: skip

    @property
    def scheduled(self) -> bool:
        """Whether a schema (not Poisson sampling of every client each round) decides who takes part."""
        return self.participation != "poisson"

    @property
    def correlated(self) -> bool:
        """Whether the noise is correlated across rounds (a factorisation other than C = I)."""
        return self.mechanism != "gaussian"

    @property
    def amplified(self) -> bool:
        """Whether a step may be accounted as Poisson-sampled: cyclic groups with a banded C (module doc)."""
        return self.participation == "cyclic" and self.mechanism in ("gaussian", "bandmf")

    @property
    def factorisation(self) -> NoiseFactorisation:
        """C, optimised for this run's T and min-separation, normalised for the accountant (cached)."""
        return factorisation_for(self.mechanism, self.rounds, self.min_separation)

    @property
    def max_participations(self) -> int:
        return max_participations(self.rounds, self.min_separation) if self.scheduled else self.rounds

    def expected_clients(self, sample_rate: float, num_clients: int) -> float:
        """The public, fixed denominator of a round's mean: its expected number of sampled clients.

        ``cyclic``: q·N/b (the groups' mean size). ``min-sep``: in steady state a
        client waits b − 1 rounds, then a geometric 1/q: a cycle of b − 1 + 1/q rounds,
        so q·N/(1 + q(b − 1)) per round.
        """
        if self.participation == "cyclic":
            return sample_rate * num_clients / self.min_separation
        if self.participation == "min-sep":
            return sample_rate * num_clients / (1 + sample_rate * (self.min_separation - 1))
        return sample_rate * num_clients

    def accounting_rate(self, sample_rate: float) -> float:
        """The sample rate the accountant is told per step: q (Poisson; cyclic with a banded C) or 1 (min-sep,
        and tree or blt under cyclic: no amplification)."""
        return sample_rate if not self.scheduled or self.amplified else 1.0

    def accounted_steps(self, rounds: int) -> int:
        """How many steps ``rounds`` rounds record: one per round (Poisson), one per block of b (schemas)."""
        return math.ceil(rounds / self.min_separation) if self.scheduled else rounds

    def records_step(self, server_round: int) -> bool:
        """Whether round ``server_round`` opens a block (and records the block's step)."""
        return not self.scheduled or (server_round - 1) % self.min_separation == 0

    def check_federation(self, num_clients: int) -> None:
        """Refuse a schema the sampler cannot satisfy with ``num_clients`` clients (ValueError, one line)."""
        if self.participation == "cyclic" and num_clients < self.min_separation:
            raise ValueError(f"participation cyclic with min-separation {self.min_separation} needs at least that "
                             f"many clients (one group each), got {num_clients}")  # fmt: skip


class CorrelatedMechanism:
    """The server's sampler under a schema and its correlated noise, with their secret state.

    ``master_key`` (32 bytes) keys every round's fresh Gaussian z_t; whoever holds it
    can regenerate the noise. ``reproducible`` only records whether it came from the
    seed, so that a resume can check it is continuing the same kind of run.
    """

    def __init__(self, schema: ParticipationSchema, master_key: bytes) -> None:
        self.schema = schema
        self._master_key = master_key
        self._noise = schema.factorisation.stream()
        # min-sep: each node's last round (private: who took part when).
        self._last_round: dict[int, int] = {}
        self._nodes: tuple[int, ...] = ()
        # After a resume: the rounds whose noise must be regenerated before the next one.
        self._replay_through = 0
        # The last round whose noise may have been drawn (the private state is written before it is).
        self.round = 0

    # --- sampling ------------------------------------------------------------------

    def eligible(self, nodes: Sequence[int], server_round: int) -> list[int]:
        """The nodes the schema lets take part in ``server_round``."""
        ordered = sorted(nodes)
        if self._nodes and tuple(ordered) != self._nodes:
            raise UsageError(
                f"the federation's nodes changed ({len(ordered)} now, {len(self._nodes)} before): the participation "
                "schema's groups and past rounds are per node id, so the run cannot go on with other nodes (Flower's "
                "simulation engine gives its nodes new ids in every process: a run under a schema that must be resumable "
                "runs on the in-process engine)"
            )
        self._nodes = tuple(ordered)
        b = self.schema.min_separation
        if self.schema.participation == "cyclic":
            group = (server_round - 1) % b
            return [node for rank, node in enumerate(ordered) if rank % b == group]
        return [node for node in ordered if server_round - self._last_round.get(node, -b) >= b]

    def sample(self, nodes: Sequence[int], server_round: int, sample_rate: float, stream: RandomStream) -> list[int]:
        """Poisson(q) among the eligible nodes; remembered for the schema."""
        eligible = self.eligible(nodes, server_round)
        sampled = [node for node, kept in zip(eligible, stream.bernoulli(len(eligible), sample_rate)) if kept]
        for node in sampled:
            self._last_round[node] = server_round
        return sampled

    # --- noise -----------------------------------------------------------------------

    def _unit_noise(self, server_round: int, sizes: Sequence[int]) -> np.ndarray:
        """w_t/std: the factorisation's noise from fresh Gaussians (std 1) keyed by the master key."""

        def draw(*label: str | int) -> np.ndarray:
            return derived_stream(self._master_key, *label).gaussian_segments(sizes, 1.0).numpy()

        return self._noise.round_noise(server_round, draw)

    def noise(self, server_round: int, sizes: Sequence[int], std: float) -> torch.Tensor:
        """The correlated noise of ``server_round`` (the next round), std·(C⁻¹z)_t, in float64."""
        if server_round != self.round:
            raise ValueError(f"the private state was written for round {self.round}, not {server_round}")
        for past in range(1, self._replay_through + 1):
            self._unit_noise(past, sizes)
        self._replay_through = 0
        return torch.from_numpy(std * self._unit_noise(server_round, sizes))

    def begin_round(self, server_round: int) -> None:
        """Mark ``server_round``'s noise as (about to be) drawn: call before the private state is written."""
        if server_round != self.round + 1:
            raise ValueError(f"round {server_round} follows round {self.round + 1}'s noise")
        self.round = server_round

    # --- the secret state ------------------------------------------------------------

    def private_state(self) -> dict:
        """What a resume needs, as secret as the noise: the master key, the round, the sampler's past."""
        return {"format": PRIVATE_STATE_FORMAT, "master-key": self._master_key.hex(), "round": self.round,
                "nodes": list(self._nodes), "last-round": {str(n): r for n, r in self._last_round.items()},
                "coefficients": list(self.schema.factorisation.parameters())}  # fmt: skip

    def restore(self, state: Mapping, completed_round: int) -> None:
        """Continue after ``completed_round`` (the last checkpoint) from the private ``state``.

        Regenerates z_1 … z_r from the master key and replays the recursion (at the
        next draw, which knows the model's layout), so the next round's noise is what
        an uninterrupted run would draw. ValueError (one
        line) when the state does not continue this checkpoint.
        """
        if state.get("format") != PRIVATE_STATE_FORMAT or [float(c) for c in state["coefficients"]] != list(
            self.schema.factorisation.parameters()
        ):
            raise ValueError("the correlated-noise state is not this run's (another format or factorisation)")
        saved = int(state["round"])
        if saved > completed_round:
            raise ValueError(
                f"round {saved}'s correlated noise was drawn after the last checkpoint (round {completed_round}); "
                "running it again would draw a second noise on the same correlated state"
            )
        if saved < completed_round:
            raise ValueError(f"the correlated-noise state stops at round {saved}, before the checkpoint's {completed_round}")
        self._master_key = bytes.fromhex(state["master-key"])
        self._nodes = tuple(int(n) for n in state["nodes"])
        self._last_round = {int(n): int(r) for n, r in state["last-round"].items()}
        self._noise = self.schema.factorisation.stream()
        # The replay needs the model's layout, which the first noise draw brings.
        self._replay_through = completed_round if self._noise.keeps_state else 0
        self.round = completed_round


def accounted_shape(schema: ParticipationSchema | None, sample_rate: float, rounds: int) -> tuple[float, int]:
    """(the sample rate the accountant is told, its number of steps) for ``rounds`` rounds: what calibration
    and ``dpfl privacy`` compose."""
    if schema is None:
        return sample_rate, rounds
    return schema.accounting_rate(sample_rate), schema.accounted_steps(rounds)


def check_schema_supported(schema: ParticipationSchema, noise_placement: str, clipping: str, adaptive: bool,
                           min_replies: int) -> None:  # fmt: skip
    """Refuse (ValueError, one line) what a schema or correlated noise cannot run with, naming what can."""
    if schema.scheduled and clipping != "flat":
        raise ValueError(f"participation {schema.participation} needs clipping flat (the paper mode has no guarantee "
                         "to schedule), got clipping " + clipping)  # fmt: skip
    if not schema.correlated:
        return
    name = schema.mechanism
    if noise_placement != "server":
        raise ValueError(f"mechanism {name} adds its correlated noise on the server (noise-placement server): a "
                         "client's share would need the past noise of every round, which no client keeps")  # fmt: skip
    if adaptive or min_replies:
        raise ValueError(f"mechanism {name} needs a fixed clip norm and no min-replies: adaptive clipping and the "
                         "noisy reply count are per-round releases outside the factorisation (use mechanism gaussian)")  # fmt: skip
