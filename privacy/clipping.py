"""Flat L2 clipping of a model update given as named tensors."""

from __future__ import annotations

from collections.abc import Mapping

import torch

Tensors = Mapping[str, torch.Tensor]


def global_l2_norm(tensors: Tensors) -> float:
    """L2 norm of all tensors taken together, as if flattened into one vector."""
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors.values()])))


def flat_clip(tensors: Tensors, clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale ``tensors`` by min(1, C/‖u‖) and return them with ‖u‖ before clipping.

    One norm over the whole update (not per layer), so the update's L2 sensitivity
    is exactly C.
    """
    norm = global_l2_norm(tensors)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {name: t * scale for name, t in tensors.items()}, norm
