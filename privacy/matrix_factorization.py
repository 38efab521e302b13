"""Banded matrix-factorisation mechanisms (DP-FTRL) for the prefix-sum workload: pure math.

Training releases, round after round, the noisy sums x_t of the clients' clipped
updates; the model after round t is a prefix sum of them, so the workload is the
T×T lower-triangular matrix of ones A. A factorisation A = B·C releases C·x + z,
z ~ N(0, σ²C_clip² I), and reconstructs B(Cx + z) = Ax + Bz: equivalently, round t
releases x_t + w_t with the *correlated* noise w = C⁻¹z (Denisov et al., NeurIPS
2022; Choquette-Choo et al., ICML 2023). C = I is the independent Gaussian.

Which C. dpfl uses a lower-triangular, b-banded Toeplitz C: coefficients
c_0 = 1, c_1 … c_{b−1} on the diagonals, zero below the b-th (McKenna, "Scaling up
the banded matrix factorization mechanism", 2024; Choquette-Choo et al., "Amplified
banded matrix factorization", NeurIPS 2023). Two things follow:

* Noise in O(b·d) per round: w_t = (z_t − Σ_{j=1}^{b−1} c_j w_{t−j}) / c_0, so the
  mechanism's secret state is the last b−1 noise vectors (:class:`BandedNoise`).
* Sensitivity: column i of C is nonzero in rows i … i+b−1 only, so the columns of
  two participations at least b rounds apart are orthogonal. Under (k, b)
  participation (at most k participations, each ≥ b rounds after the last) the
  sensitivity is at most √k·‖c‖₂, exactly that when b divides T
  (:func:`banded_sensitivity`, tested against brute force). The coefficients are normalised to ‖c‖₂ = 1, so one participation moves
  the release C·x by at most C_clip, exactly as one Gaussian round does.

The loss minimised (in float64, :func:`optimal_banded_coefficients`) is the expected
total squared error of all T prefix sums per unit of sensitivity,

    L(c) = sens(C)² · ‖A C⁻¹‖²_F = k ‖c‖² Σ_{n<T} (T − n) s_n²,

s = the prefix sums of the coefficients of C⁻¹ (A C⁻¹ is Toeplitz too); the factor
k is the same for every band under a given schema and does not move the optimum.
It is the "mean squared error" objective of JAX Privacy's banded optimiser,
restricted to Toeplitz C. Optimised with L-BFGS on an analytic gradient, started
from the square-root factorisation's coefficients, and cached per (T, b).

Why by hand: JAX Privacy (which has this) needs JAX, and pfl's FTRL mechanism is
tied to its own simulator; the computation here is a few vector operations.
No Flower, no I/O.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from scipy.signal import lfilter


def prefix_workload(rounds: int) -> np.ndarray:
    """A: the T×T lower-triangular matrix of ones (the model after round t sums rounds 1 … t)."""
    return np.tril(np.ones((rounds, rounds)))


def toeplitz_matrix(coefficients: Sequence[float], rounds: int) -> np.ndarray:
    """The T×T lower-triangular Toeplitz matrix with ``coefficients`` on its first diagonals."""
    c = np.zeros(rounds)
    kept = np.asarray(coefficients, dtype=np.float64)[:rounds]
    c[: len(kept)] = kept
    index = np.subtract.outer(np.arange(rounds), np.arange(rounds))
    return np.where(index >= 0, c[np.clip(index, 0, None)], 0.0)


def inverse_coefficients(coefficients: Sequence[float], rounds: int) -> np.ndarray:
    """The first ``rounds`` coefficients of C⁻¹ (lower-triangular Toeplitz too): 1/C(z) as a power series."""
    impulse = np.zeros(rounds)
    impulse[0] = 1.0
    return lfilter([1.0], np.asarray(coefficients, dtype=np.float64), impulse)


def _weights(rounds: int) -> np.ndarray:
    """‖L(s)‖²_F = Σ_n (T − n) s_n² for a lower-triangular Toeplitz L(s): diagonal n appears T − n times."""
    return np.arange(rounds, 0, -1, dtype=np.float64)


def total_squared_error(coefficients: Sequence[float], rounds: int) -> float:
    """L(c)/k = ‖c‖² ‖A C⁻¹‖²_F: the expected total squared error of the T prefix sums at unit noise
    multiplier, per participation (the module doc). C = I gives T(T+1)/2."""
    c = np.asarray(coefficients, dtype=np.float64)
    s = np.cumsum(inverse_coefficients(c, rounds))
    return float(np.dot(c, c) * np.dot(_weights(rounds), s * s))


def _loss_and_gradient(free: np.ndarray, rounds: int) -> tuple[float, np.ndarray]:
    """L and ∂L/∂c_j (j ≥ 1) with c_0 = 1: ∂r/∂c_j = −z^j r², so ∂s_n/∂c_j = −Σ_{m≤n} (r*r)_{m−j}."""
    c = np.concatenate([[1.0], free])
    r = inverse_coefficients(c, rounds)
    s = np.cumsum(r)
    w = _weights(rounds)
    norm, error = float(np.dot(c, c)), float(np.dot(w, s * s))
    rr = np.convolve(r, r)[:rounds]
    tail = np.cumsum((2 * norm * w * s)[::-1])[::-1]  # G_m = Σ_{n ≥ m} ∂L/∂s_n
    gradient = np.array([2 * c[j] * error - np.dot(rr[: rounds - j], tail[j:]) for j in range(1, len(c))])
    return norm * error, gradient


@lru_cache(maxsize=32)
def optimal_banded_coefficients(rounds: int, band: int) -> tuple[float, ...]:
    """The b-banded Toeplitz C minimising :func:`total_squared_error` for T = ``rounds``, with ‖c‖₂ = 1.

    ``band`` 1 is the identity (the independent Gaussian). Cached per shape: the
    server and ``dpfl privacy`` ask for the same (T, b).
    """
    if not 1 <= band <= rounds:
        raise ValueError(f"the band must be between 1 and the {rounds} rounds, got {band}")
    if band == 1:
        return (1.0,)
    from scipy.optimize import minimize

    # The square-root factorisation C = A^{1/2}: c_n = binom(2n, n)/4ⁿ, truncated to the band.
    start = np.cumprod([1.0, *[(2 * n - 1) / (2 * n) for n in range(1, band)]])
    found = minimize(_loss_and_gradient, start[1:], args=(rounds,), jac=True, method="L-BFGS-B",
                     options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})  # fmt: skip
    best = np.concatenate([[1.0], found.x])
    if total_squared_error(best, rounds) > total_squared_error(start, rounds):  # never worse than the start
        best = start
    return tuple(float(v) for v in best / np.linalg.norm(best))


def max_participations(rounds: int, min_separation: int) -> int:
    """k = ⌈T/b⌉: the most rounds one client can take part in when any two are ≥ b apart."""
    return math.ceil(rounds / min_separation)


def banded_sensitivity(coefficients: Sequence[float], rounds: int, min_separation: int) -> float:
    """The ℓ2 sensitivity of C·x over T rounds under (k, b) participation, k = ⌈T/b⌉, for a Toeplitz C of
    band ≤ b.

    Each participation moves C·x along its own column (by a vector of norm ≤ 1, the
    clipped update over C_clip); columns ≥ b apart have disjoint supports, so the
    moves are orthogonal and their squared norms add. A column's norm only shrinks
    towards the end (the last rows cut it), so rounds 1, 1 + b, 1 + 2b, … are the
    worst pattern. At most √k·‖c‖₂, which is what the accountant is told.
    """
    c = np.asarray(coefficients, dtype=np.float64)
    if len(c) > min_separation:
        raise ValueError(f"a band of {len(c)} needs participations at least that many rounds apart, "
                         f"got a minimum separation of {min_separation}")  # fmt: skip
    squares = np.cumsum(c * c)
    starts = np.arange(0, rounds, min_separation)
    return math.sqrt(float(sum(squares[min(len(c), rounds - start) - 1] for start in starts)))


# draw(*label): the fresh N(0, 1) vector (the model's layout) of ``label`` under the run's master key.
Draw = Callable[..., np.ndarray]


class NoiseStream(ABC):
    """A factorisation's correlated noise (per unit noise std), round after round, from fresh Gaussians.

    The fresh vectors come from ``draw`` (keyed by the run's master key), so the
    stream can be regenerated; ``keeps_state`` says whether it has a state beyond the
    key (past noise, buffers) that a resume rebuilds by replaying every past round.
    """

    keeps_state: bool

    @abstractmethod
    def round_noise(self, server_round: int, draw: Draw) -> np.ndarray:
        """w_t/std for round ``server_round`` (1, 2, … in order)."""


class BandedNoise(NoiseStream):
    """The correlated noise w = C⁻¹z of a banded Toeplitz C, one round at a time.

    ``history`` holds the last b−1 noise vectors (most recent last): the secret
    state, as secret as the noise itself (whoever holds it can remove the
    correlated part of every later round's noise).
    """

    def __init__(self, coefficients: Sequence[float], history: Sequence[np.ndarray] = ()) -> None:
        self.coefficients = tuple(float(v) for v in coefficients)
        if not self.coefficients or self.coefficients[0] == 0:
            raise ValueError("a banded factorisation needs a nonzero leading coefficient")
        if len(history) > self.band - 1:
            raise ValueError(f"a band of {self.band} keeps {self.band - 1} past noise vectors, got {len(history)}")
        self.history = [np.asarray(w, dtype=np.float64) for w in history]

    @property
    def band(self) -> int:
        return len(self.coefficients)

    @property
    def keeps_state(self) -> bool:  # type: ignore[override]
        return self.band > 1

    def round_noise(self, server_round: int, draw: Draw) -> np.ndarray:
        return self.next(draw("correlated-noise", server_round))

    def next(self, z: np.ndarray) -> np.ndarray:
        """w_t from the round's fresh Gaussian z_t: (z_t − Σ_j c_j w_{t−j}) / c_0; remembered for later rounds."""
        w = np.array(z, dtype=np.float64)
        for lag, past in enumerate(reversed(self.history), start=1):
            w -= self.coefficients[lag] * past
        w /= self.coefficients[0]
        if self.band > 1:
            self.history = [*self.history, w][-(self.band - 1) :]
        return w
