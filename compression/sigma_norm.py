"""Linear algebra of the Σ-weighted norm, shared by the SVD, Tucker-2 and CPD solvers.

A layer maps an input x (a feature vector, or a conv patch flattened in the order of
``weight.view(T, -1)`` and ``F.unfold``) to Wx. Replacing W by W̃ changes the output by
an expected squared amount

    f(W̃) = E‖(W − W̃)x‖² = tr((W − W̃) Σ (W − W̃)ᵀ),   Σ = E[xxᵀ] (or the covariance).

Every function here works in torch float64; Σ must be symmetric positive definite
(see :func:`regularise`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, cg

# SPD systems up to this many unknowns are solved exactly (Cholesky); larger ones by
# conjugate gradients, matrix-free. 2048 unknowns: an explicit matrix of 32 MB.
EXACT_SOLVE_MAX_UNKNOWNS = 2048

State = TypeVar("State")


def regularise(sigma: torch.Tensor, ridge: float) -> torch.Tensor:
    """Σ + ridge·(tr Σ / D)·I: positive definite even when some inputs never vary
    (dead channels, zero padding), and scale-free so one ridge fits every layer."""
    dim = sigma.shape[0]
    scale = torch.trace(sigma) / dim
    if scale <= 0:
        scale = torch.ones((), dtype=sigma.dtype)
    return sigma + ridge * scale * torch.eye(dim, dtype=sigma.dtype)


def sigma_objective(weight: torch.Tensor, approximation: torch.Tensor, sigma: torch.Tensor) -> float:
    """f = tr((W − W̃) Σ (W − W̃)ᵀ)."""
    diff = weight - approximation
    return float(((diff @ sigma) * diff).sum())


def cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor, adding the smallest diagonal jitter that makes it succeed:
    Gram matrices built from nearly collinear factors can be PD only in exact arithmetic."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return factor
    scale = float(torch.diagonal(matrix).abs().mean()) or 1.0
    for exponent in range(-12, 0):
        jittered = matrix + (10.0**exponent) * scale * torch.eye(matrix.shape[0], dtype=matrix.dtype)
        factor, info = torch.linalg.cholesky_ex(jittered)
        if int(info) == 0:
            return factor
    raise torch.linalg.LinAlgError("matrix is not positive definite even with jitter")


def best_rank_in_metric(
    cross: torch.Tensor, gram: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise tr((X − X*) Q (X − X*)ᵀ) over X of rank ≤ ``rank``, X* = C Q⁻¹.

    ``cross`` is C (m × n), ``gram`` is the SPD Q (n × n). With Q = LLᵀ the problem is
    ‖(X − X*)L‖_F, solved by Eckart–Young: X = [C L⁻ᵀ]_r L⁻¹. Returns (U, V) with X = U V,
    U (m × r) orthonormal. For a linear layer, C = WΣ and Q = Σ give the Σ-norm optimum
    [WL]_r L⁻¹; for Tucker-2, C = WΣP and Q = PᵀΣP give output factor and core jointly.
    """
    chol = cholesky(gram)
    whitened = torch.linalg.solve_triangular(chol, cross.T, upper=False).T  # C L⁻ᵀ
    left, singular, right_t = torch.linalg.svd(whitened, full_matrices=False)
    left, singular, right_t = left[:, :rank], singular[:rank], right_t[:rank]
    # (S_r V_rᵀ) L⁻¹, computed as a triangular solve with Lᵀ.
    right = torch.linalg.solve_triangular(chol.T, (singular[:, None] * right_t).T, upper=True).T
    return left, right


def solve_spd(
    apply: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    start: torch.Tensor,
    diagonal: torch.Tensor,
    explicit: Callable[[], torch.Tensor],
    damping: float,
    cg_max_iter: int,
) -> torch.Tensor:
    """Minimise ½xᵀHx − bᵀx + ½λ‖x − x₀‖² for SPD H given as ``apply`` (x ↦ Hx).

    The proximal term (λ = ``damping`` × mean diagonal of H, x₀ = ``start``, the current
    iterate) keeps the ALS block step well posed when factors become nearly collinear,
    and the step still never increases the objective: f(x) + λ‖x − x₀‖² ≤ f(x₀).
    Small systems are built with ``explicit`` (H as an n × n matrix) and solved exactly;
    large ones run Jacobi-preconditioned CG (scipy) from x₀: CG lowers the quadratic at
    every step, so a truncated solve is still a descent step, and later sweeps continue
    where this one stopped.
    """
    shape = rhs.shape
    n = rhs.numel()
    lam = damping * float(diagonal.mean())
    rhs = rhs + lam * start
    if n <= EXACT_SOLVE_MAX_UNKNOWNS:
        matrix = explicit() + lam * torch.eye(n, dtype=rhs.dtype)
        return torch.cholesky_solve(rhs.reshape(n, 1), cholesky(matrix)).reshape(shape)

    def matvec(vector: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float64).reshape(shape))
        return (apply(x) + lam * x).reshape(-1).numpy()

    inverse_diagonal = (1.0 / (diagonal.reshape(-1) + lam).clamp_min(torch.finfo(torch.float64).tiny)).numpy()
    operator = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    preconditioner = LinearOperator((n, n), matvec=lambda v: inverse_diagonal * v.reshape(-1), dtype=np.float64)
    solution, _ = cg(
        operator,
        rhs.reshape(-1).numpy(),
        x0=start.reshape(-1).numpy(),
        rtol=1e-10,
        maxiter=cg_max_iter,
        M=preconditioner,
    )
    return torch.from_numpy(solution).reshape(shape)


@dataclass
class ALSTrace:
    """Objective at the initialisation and after each accepted sweep, and why ALS stopped."""

    objectives: list[float] = field(default_factory=list)
    # "converged" (relative decrease below tol), "max_iter", or "increase" (a sweep
    # would have raised the objective, by round-off; the previous iterate was kept).
    stopped: str = "max_iter"

    @property
    def sweeps(self) -> int:
        return len(self.objectives) - 1


def alternating_descent(
    state: State,
    sweep: Callable[[State], State],
    objective: Callable[[State], float],
    max_iter: int,
    tol: float,
) -> tuple[State, ALSTrace]:
    """Run ``sweep`` until the relative decrease of ``objective`` falls below ``tol``.

    Each block update is an exact (or descent) minimisation, so the objective cannot
    rise in exact arithmetic; if round-off makes it rise, the previous iterate is
    returned, so the result is never worse than the initialisation.
    """
    current = objective(state)
    trace = ALSTrace(objectives=[current])
    for _ in range(max_iter):
        candidate = sweep(state)
        value = objective(candidate)
        if value > current:
            trace.stopped = "increase"
            return state, trace
        trace.objectives.append(value)
        state, previous, current = candidate, current, value
        if previous - current <= tol * previous:
            trace.stopped = "converged"
            return state, trace
    return state, trace
