"""Low-rank factorisation of a weight matrix W (T × D) ≈ U V, for linear and 1×1 conv layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpfl.compression.sigma_norm import best_rank_in_metric


@dataclass
class LowRank:
    """W̃ = left @ right; left (T × r), right (r × D)."""

    left: torch.Tensor
    right: torch.Tensor

    def to_weight(self) -> torch.Tensor:
        return self.left @ self.right


def svd_frobenius(weight: torch.Tensor, rank: int) -> LowRank:
    """Truncated SVD: the minimiser of ‖W − W̃‖_F at rank r (Eckart–Young)."""
    left, singular, right_t = torch.linalg.svd(weight, full_matrices=False)
    return LowRank(left[:, :rank] * singular[:rank], right_t[:rank])


def svd_sigma(weight: torch.Tensor, sigma: torch.Tensor, rank: int) -> LowRank:
    """The exact minimiser of ‖(W − W̃)Σ^½‖_F at rank r: [WL]_r L⁻¹ with Σ = LLᵀ."""
    left, right = best_rank_in_metric(weight @ sigma, sigma, rank)
    return LowRank(left, right)
