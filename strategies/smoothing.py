"""Implicit Laplacian smoothing (DP-LSSGD, Wang et al. 2019), pure math.

Solves (I + σ·L) v_s = v for each flattened tensor, L the periodic 1-D graph
Laplacian (first row [2, −1, 0, …, 0, −1]). L is circulant, so the solve is a
division in the Fourier domain: v_s = ifft(fft(v) / (1 + σ·(2 − 2cos(2πk/n)))).
The operator damps high frequencies (and so the noise), keeps the mean, and is
the same for every tensor shape, unlike the one explicit step of the DP-FedPGN
authors' code (github.com/junkangLiu0/DP-FedPGN at 6203180), whose sign differs
between 1-D and conv tensors.
"""

from __future__ import annotations

import math

import torch

# The declared option of every Laplacian-smoothed strategy: σ of (I + σL)⁻¹.
SMOOTHING_OPTIONS = {"ls-sigma": 1.0}


def laplacian_smooth(tensor: torch.Tensor, sigma: float) -> torch.Tensor:
    n = tensor.numel()
    if sigma == 0 or n < 3:
        return tensor
    flat = tensor.reshape(-1).double()
    eigenvalues = 2 - 2 * torch.cos(2 * math.pi * torch.arange(n, dtype=torch.float64) / n)
    smoothed = torch.fft.ifft(torch.fft.fft(flat) / (1 + sigma * eigenvalues)).real
    return smoothed.reshape(tensor.shape).to(tensor.dtype)


class LaplacianSmoothedRelease:
    """Mixin for a strategy: its released mean update is smoothed tensor by tensor.

    Smoothing reads only the released (already noised) mean, so it is post-processing
    and costs no privacy. List it before the strategy's class, and declare
    :data:`SMOOTHING_OPTIONS` among the strategy's options.
    """

    option_values: dict

    def transform_update(self, server_round: int, mean_delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sigma = float(self.option_values["ls-sigma"])
        return {name: laplacian_smooth(t, sigma) for name, t in mean_delta.items()}
