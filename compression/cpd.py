"""CPD of a conv kernel 𝒲 (T × S × kh × kw): 𝒲[t,s,p,q] ≈ Σ_r A[t,r] B[s,r] C[p,r] D[q,r].

The Frobenius solution is TensorLy's ``parafac``. TensorLy has no weighted norm, so
the Σ-norm ALS (Kalle et al., NeurIPS 2025, arXiv:2511.04494; updates derived in
docs/compression.md, "Derivations") is written here: W̃ = A Kᵀ with K = B ⊙ C ⊙ D
(D × R, rows in the (s, p, q) order of ``weight.view(T, -1)``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import tensorly
import torch
from tensorly.decomposition import parafac

from dpfl.compression.sigma_norm import ALSTrace, alternating_descent, cholesky, sigma_objective, solve_spd

# For the update of patch mode m ∈ (s, p, q): the order that brings m to the front.
MODE_FIRST = ((0, 1, 2), (1, 0, 2), (2, 0, 1))


@dataclass
class CPD:
    output_factor: torch.Tensor  # A (T × R)
    input_factor: torch.Tensor  # B (S × R)
    vertical_factor: torch.Tensor  # C (kh × R)
    horizontal_factor: torch.Tensor  # D (kw × R)

    @property
    def patch_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_factor, self.vertical_factor, self.horizontal_factor

    def patch_matrix(self) -> torch.Tensor:
        """K = B ⊙ C ⊙ D, (S·kh·kw) × R."""
        return khatri_rao(*self.patch_factors).reshape(-1, self.output_factor.shape[1])

    def to_weight(self) -> torch.Tensor:
        return torch.einsum("tr,spqr->tspq", self.output_factor, khatri_rao(*self.patch_factors))


def khatri_rao(first: torch.Tensor, second: torch.Tensor, third: torch.Tensor) -> torch.Tensor:
    """Column-wise outer product, as (n₁, n₂, n₃, R)."""
    return torch.einsum("ar,br,cr->abcr", first, second, third)


def cpd_frobenius(kernel: torch.Tensor, rank: int, n_iter_max: int = 100, tol: float = 1e-8, seed: int = 0) -> CPD:
    """min ‖𝒲 − 𝒲̃‖_F at rank R by TensorLy's ALS (SVD initialisation)."""
    # A rank above a mode's size is expected here (R > kh): TensorLy then pads the SVD
    # initialisation with random columns and warns, which is noise for our callers.
    with tensorly.backend_context("numpy"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        weights, (a, b, c, d) = parafac(
            kernel.double().numpy(), rank, n_iter_max=n_iter_max, tol=tol, init="svd", random_state=seed
        )
    return CPD(torch.from_numpy(a * weights), torch.from_numpy(b), torch.from_numpy(c), torch.from_numpy(d))


def cpd_sigma_als(
    kernel: torch.Tensor,
    sigma: torch.Tensor,
    rank: int,
    init: CPD,
    max_iter: int = 50,
    tol: float = 1e-6,
    damping: float = 1e-9,
    cg_max_iter: int = 100,
) -> tuple[CPD, ALSTrace]:
    """min ‖(W − W̃)Σ^½‖_F at rank R by ALS from ``init`` (the Frobenius solution).

    A sweep updates A (closed form, A = WΣK (KᵀΣK)⁻¹), then B, C and D, each an SPD
    system H x = b with H[(i,r),(j,z)] = (AᵀA)[r,z] · Σ_{o,o'} O[o,r] Σ[(i,o),(j,o')] O[o',z]
    (O the Khatri–Rao product of the two other patch factors): C and D (kh·R, kw·R
    unknowns) exactly, B (S·R) by matrix-free CG when large. All steps carry the same
    small proximal damping, which keeps them well posed and monotone.
    """
    out_channels = kernel.shape[0]
    weight = kernel.double().reshape(out_channels, -1)
    weight_sigma = weight @ sigma
    dims = tuple(kernel.shape[1:])
    sigma6 = sigma.reshape(*dims, *dims)

    def output_step(state: CPD) -> CPD:
        patch = state.patch_matrix()
        gram = patch.T @ (sigma @ patch)
        lam = damping * float(torch.diagonal(gram).mean())
        rhs = weight_sigma @ patch + lam * state.output_factor
        output_factor = torch.cholesky_solve(rhs.T, cholesky(gram + lam * torch.eye(rank, dtype=gram.dtype))).T
        return CPD(output_factor, *state.patch_factors)

    def patch_step(state: CPD, mode: int) -> CPD:
        order = MODE_FIRST[mode]
        factors = state.patch_factors
        first, second = (factors[m] for m in order[1:])
        others = torch.einsum("ar,br->abr", first, second)  # O
        n = factors[mode].shape[0]
        sigma_m = sigma6.permute(*order, *(3 + m for m in order)).reshape(sigma.shape)
        output_gram = state.output_factor.T @ state.output_factor
        cross = (weight_sigma.T @ state.output_factor).reshape(*dims, rank).permute(*order, 3)

        def apply(x: torch.Tensor) -> torch.Tensor:
            patch = torch.einsum("jz,cdz->jcdz", x, others).reshape(-1, rank)
            image = ((sigma_m @ patch) @ output_gram).reshape(n, *others.shape)
            return torch.einsum("iabr,abr->ir", image, others)

        def explicit() -> torch.Tensor:
            blocks = torch.einsum("iabjcd,abr,cdz->irjz", sigma_m.reshape(n, *others.shape[:2], n, *others.shape[:2]), others, others)
            return (blocks * output_gram[None, :, None, :]).reshape(n * rank, n * rank)

        sigma_blocks = torch.einsum("iabicd->iabcd", sigma_m.reshape(n, *others.shape[:2], n, *others.shape[:2]))
        diagonal = torch.einsum("iabcd,abr,cdr->ir", sigma_blocks, others, others) * torch.diagonal(output_gram)
        updated = solve_spd(
            apply=apply,
            rhs=torch.einsum("iabr,abr->ir", cross, others),
            start=factors[mode],
            diagonal=diagonal,
            explicit=explicit,
            damping=damping,
            cg_max_iter=cg_max_iter,
        )
        new_factors = list(factors)
        new_factors[mode] = updated
        return CPD(state.output_factor, *new_factors)

    def sweep(state: CPD) -> CPD:
        state = output_step(state)
        for mode in range(3):
            state = patch_step(state, mode)
        return normalised(state)

    def objective(state: CPD) -> float:
        return sigma_objective(weight, state.to_weight().reshape(out_channels, -1), sigma)

    start = normalised(CPD(*(f.double() for f in (init.output_factor, *init.patch_factors))))
    return alternating_descent(start, sweep, objective, max_iter, tol)


def normalised(state: CPD) -> CPD:
    """Unit-norm columns for B, C, D with the scale moved into A: the same W̃, and
    factors on one scale, which the relative damping and the CG tolerance assume."""
    norms = [f.norm(dim=0).clamp_min(torch.finfo(f.dtype).tiny) for f in state.patch_factors]
    scale = norms[0] * norms[1] * norms[2]
    return CPD(state.output_factor * scale, *(f / n for f, n in zip(state.patch_factors, norms)))
