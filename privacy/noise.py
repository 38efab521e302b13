"""Gaussian noise for client-level DP on the sum of clipped updates.

The mechanism is sum + N(0, (σC)² I), then division by the *expected* number of
sampled clients qN (a fixed denominator: dividing by the realised count would
leak it). With ``placement="client"`` each sampled client adds its share
N(0, σ²C²/(qN)); under Poisson sampling fewer than qN clients may report, so the
server tops the sum up to variance σ²C² (more reports only add noise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

NOISE_PLACEMENTS = ("server", "client")


def client_noise_std(noise_multiplier: float, clip_norm: float, expected_clients: float) -> float:
    """Per-client share of the noise: σC/√(qN)."""
    return noise_multiplier * clip_norm / math.sqrt(expected_clients)


def server_noise_std(
    noise_multiplier: float, clip_norm: float, placement: str, reported: int, expected_clients: float
) -> float:
    """Std of the noise the server adds to the sum of ``reported`` updates."""
    if placement == "server":
        return noise_multiplier * clip_norm
    shortfall = max(0.0, 1.0 - reported / expected_clients)
    return noise_multiplier * clip_norm * math.sqrt(shortfall)


def add_gaussian_noise(
    tensors: Mapping[str, torch.Tensor], std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    if std == 0:
        return dict(tensors)
    return {
        name: t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype)
        for name, t in tensors.items()
    }


def noisy_mean(
    clipped_sum: Mapping[str, torch.Tensor],
    *,
    noise_multiplier: float,
    clip_norm: float,
    placement: str,
    reported: int,
    expected_clients: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """(Σ clipped updates + server noise) / qN: the released mean update."""
    std = server_noise_std(noise_multiplier, clip_norm, placement, reported, expected_clients)
    noisy = add_gaussian_noise(clipped_sum, std, generator)
    return {name: t / expected_clients for name, t in noisy.items()}
