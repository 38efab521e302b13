"""Tucker-2 of a conv kernel 𝒲 (T × S × kh × kw): 𝒲 ≈ 𝒢 ×₁ U_T ×₂ U_S.

The Frobenius solution is TensorLy's ``partial_tucker`` (HOOI on the two channel
modes). TensorLy has no weighted norm, so the Σ-norm ALS (Kalle et al., NeurIPS 2025,
arXiv:2511.04494) is written here, in the notation of docs/compression.md
("Derivations"): W (T × D) is the kernel flattened like ``weight.view(T, -1)``,
D = S·k with k = kh·kw, P = U_S ⊗ I_k, and W̃ = U_T Ĝ Pᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorly
import torch
from tensorly.decomposition import partial_tucker

from dpfl.compression.sigma_norm import (
    ALSTrace,
    alternating_descent,
    best_rank_in_metric,
    sigma_objective,
    solve_spd,
)


@dataclass
class Tucker2:
    output_factor: torch.Tensor  # U_T (T × r_T)
    core: torch.Tensor  # 𝒢 (r_T × r_S × kh × kw)
    input_factor: torch.Tensor  # U_S (S × r_S)

    def to_weight(self) -> torch.Tensor:
        return torch.einsum("ta,abpq,sb->tspq", self.output_factor, self.core, self.input_factor)


def tucker2_frobenius(kernel: torch.Tensor, ranks: tuple[int, int], n_iter_max: int = 100, tol: float = 1e-6) -> Tucker2:
    """min ‖𝒲 − 𝒲̃‖_F at ranks (r_T, r_S) by TensorLy's HOOI (SVD initialisation)."""
    # TensorLy's numpy backend is its default: no global backend switch is needed.
    with tensorly.backend_context("numpy"):
        (core, (output_factor, input_factor)), _ = partial_tucker(
            kernel.double().numpy(), rank=list(ranks), modes=[0, 1], n_iter_max=n_iter_max, tol=tol, init="svd"
        )
    return Tucker2(torch.from_numpy(output_factor), torch.from_numpy(core), torch.from_numpy(input_factor))


def tucker2_sigma_als(
    kernel: torch.Tensor,
    sigma: torch.Tensor,
    ranks: tuple[int, int],
    init: Tucker2,
    max_iter: int = 50,
    tol: float = 1e-6,
    damping: float = 1e-9,
    cg_max_iter: int = 100,
) -> tuple[Tucker2, ALSTrace]:
    """min ‖(W − W̃)Σ^½‖_F at ranks (r_T, r_S) by ALS from ``init`` (the Frobenius solution).

    A sweep has two block steps, each an exact minimisation:
    * U_S given X = U_T Ĝ: the SPD system of docs/compression.md (size S·r_S), solved
      exactly when small and by matrix-free CG otherwise;
    * U_T and Ĝ jointly given span(U_S): X = [WΣP Q⁻¹]_{r_T} in the Q = PᵀΣP metric,
      one weighted truncated SVD. Doing both at once (rather than U_T, then Ĝ, as in the
      authors' code, github.com/alpkll/Parafac_Sigma ``Tucker_Sigma.py``) is the exact
      block minimiser, so it descends at least as far.
    """
    out_channels, in_channels, kh, kw = kernel.shape
    rank_out, rank_in = ranks
    k = kh * kw
    weight = kernel.double().reshape(out_channels, in_channels * k)
    sigma4 = sigma.reshape(in_channels, k, in_channels, k)
    weight_sigma = (weight @ sigma).reshape(out_channels, in_channels, k)

    def sigma_p(input_factor: torch.Tensor) -> torch.Tensor:
        """ΣP, as (S, k, r_S, k)."""
        return torch.einsum("sxty,tb->sxby", sigma4, input_factor)

    def output_and_core(input_factor: torch.Tensor) -> Tucker2:
        input_factor, _ = torch.linalg.qr(input_factor)  # only span(U_S) matters here
        sp = sigma_p(input_factor)
        gram = torch.einsum("sb,sxcy->bxcy", input_factor, sp).reshape(rank_in * k, rank_in * k)
        cross = weight @ sp.reshape(in_channels * k, rank_in * k)
        output_factor, core = best_rank_in_metric(cross, gram, rank_out)
        return Tucker2(output_factor, core.reshape(rank_out, rank_in, kh, kw), input_factor)

    def input_step(state: Tucker2) -> torch.Tensor:
        mixed = (state.output_factor @ state.core.reshape(rank_out, -1)).reshape(out_channels, rank_in, k)  # 𝒜
        core_gram = torch.einsum("tbx,tcy->bxcy", mixed, mixed)
        rhs = torch.einsum("tbx,tsx->sb", mixed, weight_sigma)
        return solve_spd(
            apply=lambda u: torch.einsum("sxcy,bxcy->sb", sigma_p(u), core_gram),
            rhs=rhs,
            start=state.input_factor,
            diagonal=torch.einsum("sxsy,bxby->sb", sigma4, core_gram),
            explicit=lambda: torch.einsum("sxty,bxcy->sbtc", sigma4, core_gram).reshape(
                in_channels * rank_in, in_channels * rank_in
            ),
            damping=damping,
            cg_max_iter=cg_max_iter,
        )

    def objective(state: Tucker2) -> float:
        return sigma_objective(weight, state.to_weight().reshape(out_channels, -1), sigma)

    start = Tucker2(init.output_factor.double(), init.core.double(), init.input_factor.double())
    return alternating_descent(
        start, lambda state: output_and_core(input_step(state)), objective, max_iter, tol
    )
