"""The noise factorisations a run may name (``--mechanism``), one class each: pure math.

Every mechanism releases, round after round, x_t + w_t with w the correlated noise
of a factorisation A = B·C of the prefix-sum workload (:mod:`dpfl.privacy.matrix_factorization`):
the releases are a post-processing of C·x + z, z ~ N(0, σ²C_clip² I), with C's rows
in the order their values are complete (a row is released once every round it sums
has run). ``gaussian`` is C = I, ``bandmf`` the b-banded Toeplitz C, ``tree`` the
binary tree's node matrix, ``blt`` a buffered linear Toeplitz C.

What the accountant is told, and why it holds for every C here. The server composes
one Gaussian step of noise multiplier σ per block of b = min-separation rounds
(:mod:`dpfl.privacy.participation`): after r rounds, ⌈r/b⌉ steps, i.e. one Gaussian
of sensitivity √⌈r/b⌉ at noise σ. Each factorisation is therefore normalised so that
the ℓ2 sensitivity of the rows released by round r, over every pattern of
participations at least b rounds apart within rounds 1 … r (at most ⌈r/b⌉ of them;
each moves its column by a vector of norm ≤ 1), is at most √⌈r/b⌉, at **every**
prefix r ≤ T: whoever stops reading at round r (or a run stopped by its budget) is
covered by what was accounted by then. Tested against a brute force over all
patterns on small T.

* ``bandmf`` (band b): columns b apart are orthogonal, sensitivity √k·‖c‖ with
  ‖c‖ = 1 (matrix_factorization's docstring). Its sensitivity argument needs the
  band, and so does amplified BandMF (Choquette-Choo et al., NeurIPS 2023), which
  lets cyclic Poisson sampling be accounted as a sampled Gaussian (q < 1).
* ``tree`` and ``blt`` are not banded: a client's participations interact across
  blocks, so amplification by sampling does **not** follow from that reduction. They
  are accounted with q = 1 (no amplification) under both ``min-sep`` and ``cyclic``
  (whose fixed groups are one of min-sep's patterns).

``tree``: binary-tree aggregation (Dwork et al. 2010; Chan et al. 2011; Kairouz et
al., ICML 2021), the simple dyadic estimator (a prefix sum adds the noisy nodes of
its binary decomposition; not Honaker's variance-weighted one, which mixes nodes
released later and costs a state). C's rows are the dyadic intervals [j·2^ℓ + 1,
(j + 1)·2^ℓ] complete by round T; round t's noise is the difference of consecutive
prefix noises, w_t = z(node of level v₂(t) ending at t) − Σ_{i<v₂(t)} z(node of
level i ending at t − 2^i), so every node's z is regenerated from the master key and
the stream keeps no state. The sensitivity of the nodes complete by round r is
bounded level by level: a level's nodes are disjoint intervals of 2^ℓ rounds, so a
node holds n_v ≤ min(⌈r/b⌉, ⌈2^ℓ/b⌉) participations and the level's complete nodes
hold Σ n_v ≤ min(⌈r/b⌉, ⌈⌊r/2^ℓ⌋2^ℓ/b⌉); Σ n_v² ≤ max n_v · Σ n_v (exact when b is a
power of two and the participations fill the tree).

``blt``: buffered linear Toeplitz (Dvijotham, McMahan et al., arXiv 2404.16706;
McMahan, Xu, Zhang, arXiv 2408.08868). C is Toeplitz with the rational generating
function C(x) = 1 + Σ_j ω_j x/(1 − θ_j x), ω_j ≥ 0, θ_j ∈ [0, 1): c_n = Σ_j ω_j θ_j^{n−1},
non-negative and non-increasing. w = C⁻¹z solves C·w = z one round at a time with
d buffers, w_t = z_t − Σ_j ω_j u_j, then u_j ← θ_j u_j + w_t: O(d·size) per round,
the buffers the secret state (rebuilt from the key on resume). Sensitivity: for a
lower-triangular Toeplitz C with non-negative, non-increasing coefficients, the
worst pattern in rounds 1 … r is 1, 1 + b, 1 + 2b, …: moving participations earlier
and closer (but ≥ b apart) adds rows to every pairwise inner product
Σ_u c_{u+δ}c_u and makes each term larger, so this pattern dominates every other one
term by term. The parameters (θ, ω) are optimised in float64 for the run's T and b
for the loss the banded one minimises, sens² · ‖A C⁻¹‖²_F with sens the normalised
per-participation sensitivity above (the maximum over prefixes r of
sens_r/√⌈r/b⌉), i.e. the expected total squared error of the T prefix sums at unit
noise multiplier; cached per (T, b, buffers).

Why by hand: JAX Privacy has BLTs and tree aggregation but needs JAX; TFF's tree
aggregation is unmaintained; each is a few vector operations here. No Flower, no I/O.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from functools import lru_cache

import numpy as np
from numpy.polynomial import polynomial
from scipy.signal import lfilter

from dpfl.privacy.matrix_factorization import (
    BandedNoise,
    Draw,
    NoiseStream,
    inverse_coefficients,
    optimal_banded_coefficients,
    toeplitz_matrix,
    total_squared_error,
)

# BLT buffers: 2408.08868 finds 3 to 5 buffers match the best Toeplitz factorisations; each costs one model-sized
# float64 vector of secret state.
BLT_BUFFERS = 4


class NoiseFactorisation(ABC):
    """A factorisation A = B·C of the T-round prefix-sum workload, normalised for the accountant (module doc)."""

    name: str

    def __init__(self, rounds: int, min_separation: int) -> None:
        self.rounds, self.min_separation = rounds, min_separation

    @abstractmethod
    def parameters(self) -> tuple[float, ...]:
        """The public numbers that fix C: a resume checks it continues the same factorisation."""

    @abstractmethod
    def strategy_matrix(self) -> np.ndarray:
        """C (rows × T), its rows in the order they are complete; small T only (tests)."""

    @abstractmethod
    def decoder(self) -> np.ndarray:
        """B (T × rows) with B·C = A: how the prefix sums are read from C·x + z."""

    @abstractmethod
    def released_rows(self, rounds: int) -> int:
        """How many rows of C are complete (released) after ``rounds`` rounds."""

    @abstractmethod
    def total_squared_error(self) -> float:
        """‖B‖²_F: the expected total squared error of the T prefix sums per unit noise std (C = I: T(T+1)/2)."""

    @abstractmethod
    def stream(self) -> NoiseStream:
        """A fresh generator of the per-round noise w (the differences of the prefix noise B·z), per unit std."""


class BandedFactorisation(NoiseFactorisation):
    """``bandmf`` (band b) and ``gaussian`` (band 1, C = I): :mod:`dpfl.privacy.matrix_factorization`."""

    def __init__(self, rounds: int, min_separation: int, band: int) -> None:
        super().__init__(rounds, min_separation)
        self.name = "gaussian" if band == 1 else "bandmf"
        self.coefficients = optimal_banded_coefficients(rounds, band)

    def parameters(self) -> tuple[float, ...]:
        return self.coefficients

    def strategy_matrix(self) -> np.ndarray:
        return toeplitz_matrix(self.coefficients, self.rounds)

    def decoder(self) -> np.ndarray:
        return toeplitz_matrix(np.cumsum(inverse_coefficients(self.coefficients, self.rounds)), self.rounds)

    def released_rows(self, rounds: int) -> int:
        return rounds

    def total_squared_error(self) -> float:
        return total_squared_error(self.coefficients, self.rounds)

    def stream(self) -> NoiseStream:
        return BandedNoise(self.coefficients)


# --- tree aggregation ----------------------------------------------------------------------------------------------


def _trailing_zeros(t: int) -> int:
    return (t & -t).bit_length() - 1


def tree_nodes(rounds: int) -> list[tuple[int, int]]:
    """The tree's nodes complete by round ``rounds``, as (level ℓ, last round e), in the order they complete."""
    return [(level, end) for end in range(1, rounds + 1) for level in range(_trailing_zeros(end) + 1)]


def tree_sensitivity_bound(rounds: int, min_separation: int) -> float:
    """An upper bound on the sensitivity of the tree's nodes complete by round r = ``rounds`` (unit node
    weights) under participations ≥ b apart: √(Σ_ℓ max n_v · Σ n_v), the module doc's level-by-level bound."""
    k, b = math.ceil(rounds / min_separation), min_separation
    total = 0
    for level in range(rounds.bit_length()):
        width = 1 << level
        covered = (rounds // width) * width
        if covered:
            total += min(k, math.ceil(width / b)) * min(k, math.ceil(covered / b))
    return math.sqrt(total)


@lru_cache(maxsize=32)
def tree_scale(rounds: int, min_separation: int) -> float:
    """s: the node weight 1/s makes every prefix's sensitivity ≤ √⌈r/b⌉ (max over r ≤ T of bound_r/√⌈r/b⌉)."""
    return max(tree_sensitivity_bound(r, min_separation) / math.sqrt(math.ceil(r / min_separation))
               for r in range(1, rounds + 1))  # fmt: skip


class TreeNoise(NoiseStream):
    """The tree's per-round noise: the new node's z minus the nodes the previous prefix used (no state)."""

    keeps_state = False

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def round_noise(self, server_round: int, draw: Draw) -> np.ndarray:
        top = _trailing_zeros(server_round)
        w = np.array(draw("tree-node", top, server_round), dtype=np.float64)
        for level in range(top):
            w -= draw("tree-node", level, server_round - (1 << level))
        return self.scale * w


class TreeFactorisation(NoiseFactorisation):
    name = "tree"

    def __init__(self, rounds: int, min_separation: int) -> None:
        super().__init__(rounds, min_separation)
        self.scale = tree_scale(rounds, min_separation)

    def parameters(self) -> tuple[float, ...]:
        return (self.scale,)

    def strategy_matrix(self) -> np.ndarray:
        nodes = tree_nodes(self.rounds)
        strategy = np.zeros((len(nodes), self.rounds))
        for row, (level, end) in enumerate(nodes):
            strategy[row, end - (1 << level) : end] = 1.0 / self.scale
        return strategy

    def decoder(self) -> np.ndarray:
        row_of = {node: row for row, node in enumerate(tree_nodes(self.rounds))}
        decoder = np.zeros((self.rounds, len(row_of)))
        for t in range(1, self.rounds + 1):
            end = 0
            for level in reversed(range(t.bit_length())):  # the binary decomposition of t, high bits first
                if t >> level & 1:
                    end += 1 << level
                    decoder[t - 1, row_of[(level, end)]] = self.scale
        return decoder

    def released_rows(self, rounds: int) -> int:
        return sum(_trailing_zeros(end) + 1 for end in range(1, rounds + 1))

    def total_squared_error(self) -> float:
        return self.scale**2 * sum(t.bit_count() for t in range(1, self.rounds + 1))

    def stream(self) -> NoiseStream:
        return TreeNoise(self.scale)


# --- buffered linear Toeplitz ----------------------------------------------------------------------------------------


def _blt_polynomials(thetas: np.ndarray, omegas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, Q), increasing powers, with C(x) = P(x)/Q(x) = 1 + Σ_j ω_j x/(1 − θ_j x)."""
    factors = [np.array([1.0, -theta]) for theta in thetas]
    q = np.array([1.0])
    for factor in factors:
        q = polynomial.polymul(q, factor)
    p = np.zeros(len(thetas) + 1)
    p[: len(q)] += q
    for j, omega in enumerate(omegas):
        term = np.array([0.0, omega])
        for i, factor in enumerate(factors):
            if i != j:
                term = polynomial.polymul(term, factor)
        p[: len(term)] += term
    return p, q


def blt_coefficients(thetas: np.ndarray, omegas: np.ndarray, rounds: int) -> np.ndarray:
    """c_0 … c_{T−1}: 1, then Σ_j ω_j θ_j^{n−1}."""
    impulse = np.zeros(rounds)
    impulse[0] = 1.0
    return lfilter(*_blt_polynomials(thetas, omegas), impulse)


def toeplitz_prefix_sensitivities(thetas: np.ndarray, omegas: np.ndarray, rounds: int, min_separation: int) -> np.ndarray:
    """sens_r for r = 1 … T of the BLT C (unnormalised): the norm of the rows ≤ r of C·1_{1, 1+b, 1+2b, …},
    the worst pattern for non-negative, non-increasing Toeplitz coefficients (module doc)."""
    comb = np.zeros(rounds)
    comb[::min_separation] = 1.0
    moved = lfilter(*_blt_polynomials(thetas, omegas), comb)
    return np.sqrt(np.cumsum(moved * moved))


def blt_scale(thetas: np.ndarray, omegas: np.ndarray, rounds: int, min_separation: int) -> float:
    """s = max_r sens_r/√⌈r/b⌉: dividing C by s makes every prefix's sensitivity ≤ √⌈r/b⌉."""
    blocks = np.ceil(np.arange(1, rounds + 1) / min_separation)
    return float(np.max(toeplitz_prefix_sensitivities(thetas, omegas, rounds, min_separation) / np.sqrt(blocks)))


def blt_loss(thetas: np.ndarray, omegas: np.ndarray, rounds: int, min_separation: int) -> float:
    """sens² · ‖A C⁻¹‖²_F of the normalised C (module doc): s² Σ_n (T − n) S_n², S the prefix sums of C⁻¹'s
    coefficients."""
    p, q = _blt_polynomials(thetas, omegas)
    impulse = np.zeros(rounds)
    impulse[0] = 1.0
    s = np.cumsum(lfilter(q, p, impulse))
    weights = np.arange(rounds, 0, -1, dtype=np.float64)
    return blt_scale(thetas, omegas, rounds, min_separation) ** 2 * float(np.dot(weights, s * s))


@lru_cache(maxsize=32)
def optimal_blt_parameters(rounds: int, min_separation: int, buffers: int = BLT_BUFFERS) -> tuple[tuple[float, ...], ...]:
    """(θ, ω) minimising :func:`blt_loss` for T = ``rounds`` and b = ``min_separation``: L-BFGS-B (numerical
    gradient: the maximum over prefixes is only piecewise smooth) from two starts, θ spread over the
    time scales 1 … T. ω_j ∈ [0, 1/d] keeps c_1 = Σω ≤ c_0 = 1 (non-increasing)."""
    from scipy.optimize import minimize

    def loss(x: np.ndarray) -> float:
        return blt_loss(x[:buffers], x[buffers:], rounds, min_separation)

    thetas = 1.0 - float(rounds) ** (-np.arange(1, buffers + 1) / buffers)
    bounds = [(0.0, 1.0 - 1e-9)] * buffers + [(0.0, 1.0 / buffers)] * buffers
    best = None
    for weight in (0.5, 0.1):
        start = np.concatenate([thetas, np.full(buffers, weight / buffers)])
        found = minimize(loss, start, method="L-BFGS-B", bounds=bounds, options={"maxiter": 500})
        candidate = found.x if found.fun <= loss(start) else start
        if best is None or loss(candidate) < loss(best):
            best = candidate
    return tuple(float(v) for v in best[:buffers]), tuple(float(v) for v in best[buffers:])


class BltNoise(NoiseStream):
    """w = s·C⁻¹z for C(x) = 1 + Σ_j ω_j x/(1 − θ_j x): w'_t = z_t − Σ_j ω_j u_j, u_j ← θ_j u_j + w'_t.

    The buffers u_j are the secret state (as secret as the noise)."""

    keeps_state = True

    def __init__(self, thetas: tuple[float, ...], omegas: tuple[float, ...], scale: float) -> None:
        self.thetas, self.omegas, self.scale = thetas, omegas, scale
        self.buffers: list[np.ndarray] = []

    def round_noise(self, server_round: int, draw: Draw) -> np.ndarray:
        w = np.array(draw("correlated-noise", server_round), dtype=np.float64)
        for omega, buffer in zip(self.omegas, self.buffers):
            w -= omega * buffer
        if not self.buffers:
            self.buffers = [np.zeros_like(w) for _ in self.thetas]
        for j, theta in enumerate(self.thetas):
            self.buffers[j] *= theta
            self.buffers[j] += w
        return self.scale * w


class BltFactorisation(NoiseFactorisation):
    name = "blt"

    def __init__(self, rounds: int, min_separation: int) -> None:
        super().__init__(rounds, min_separation)
        thetas, omegas = optimal_blt_parameters(rounds, min_separation)
        self.thetas, self.omegas = thetas, omegas
        self.scale = blt_scale(np.array(thetas), np.array(omegas), rounds, min_separation)

    def parameters(self) -> tuple[float, ...]:
        return (*self.thetas, *self.omegas, self.scale)

    def normalised_coefficients(self) -> np.ndarray:
        """The normalised C's coefficients c_n/s."""
        return blt_coefficients(np.array(self.thetas), np.array(self.omegas), self.rounds) / self.scale

    def strategy_matrix(self) -> np.ndarray:
        return toeplitz_matrix(self.normalised_coefficients(), self.rounds)

    def decoder(self) -> np.ndarray:
        return toeplitz_matrix(np.cumsum(inverse_coefficients(self.normalised_coefficients(), self.rounds)), self.rounds)

    def released_rows(self, rounds: int) -> int:
        return rounds

    def total_squared_error(self) -> float:
        return blt_loss(np.array(self.thetas), np.array(self.omegas), self.rounds, self.min_separation)

    def stream(self) -> NoiseStream:
        return BltNoise(self.thetas, self.omegas, self.scale)


@lru_cache(maxsize=32)
def factorisation_for(mechanism: str, rounds: int, min_separation: int) -> NoiseFactorisation:
    """The run's factorisation (cached per shape: the server and ``dpfl privacy`` ask for the same one)."""
    if mechanism == "gaussian":
        return BandedFactorisation(rounds, min_separation, 1)
    if mechanism == "bandmf":
        return BandedFactorisation(rounds, min_separation, min_separation)
    if mechanism == "tree":
        return TreeFactorisation(rounds, min_separation)
    if mechanism == "blt":
        return BltFactorisation(rounds, min_separation)
    raise ValueError(f"no factorisation for mechanism {mechanism!r}")

