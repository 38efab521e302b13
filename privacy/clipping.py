"""Flat L2 clipping of a model update, as one vector or as named tensors."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from dpfl.privacy.flat import Layout

Tensors = Mapping[str, torch.Tensor]

# How much a scale is shrunk per try when rounding back to the update's dtype
# lands a hair above the bound (float32 rounding: at most a few ulps).
_SHRINK = 1 - 2.0**-22


def global_l2_norm(tensors: Tensors | Iterable[torch.Tensor]) -> float:
    """L2 norm of all tensors taken together, as if flattened into one vector, in float64."""
    norms = [torch.linalg.vector_norm(t.double()) for t in (tensors.values() if isinstance(tensors, Mapping) else tensors)]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def flat_clip(tensors: Tensors, clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale ``tensors`` by min(1, C/‖u‖) and return them with ‖u‖ before clipping.

    One norm over the whole update (not per layer), so the update's L2 sensitivity
    is C: :func:`clip_vector` on the update laid out as one vector
    (:class:`dpfl.privacy.flat.Layout`), returned as named views of it.
    """
    layout = Layout(tensors)
    clipped, norm = clip_vector(layout.flatten(tensors), clip_norm, layout.cast)
    return layout.unflatten(clipped), norm


def clip_vector(
    vector: torch.Tensor, clip_norm: float, cast: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, float]:
    """``vector`` scaled by min(1, C/‖u‖), and ‖u‖ before clipping.

    The norm and the scale are computed in float64 and the result, rounded as it will
    be held (``cast``, by default to the vector's own dtype), is checked again:
    ‖clip(u)‖ ≤ C holds exactly for what is returned, not only up to float32 rounding.
    A non-finite update (NaN or Inf anywhere) is replaced by zeros: ``min(1, C/nan)``
    would be 1 and let it through unclipped.
    """
    cast = cast or (lambda scaled: scaled.to(vector.dtype))
    norm = float(torch.linalg.vector_norm(vector.double()))
    if not math.isfinite(norm):
        return torch.zeros_like(vector), norm
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    while True:
        clipped = vector if scale == 1.0 else cast(vector.double() * scale)
        if scale == 1.0 or float(torch.linalg.vector_norm(clipped.double())) <= clip_norm:
            return clipped, norm
        scale *= _SHRINK


def per_tensor_median_clip(tensors: Tensors) -> tuple[dict[str, torch.Tensor], float, float]:
    """The DP-FedPGN authors' code's clipping, kept to reproduce its numbers.

    Each tensor is clipped to C_i, the median of this client's per-tensor norms.
    C_i depends on the client's data and the sensitivity is √L·C_i for L tensors,
    so this has no formal DP guarantee. Returns (clipped, C_i, global norm before).
    """
    norms = {name: float(torch.linalg.vector_norm(t.double())) for name, t in tensors.items()}
    clip_norm = float(np.median(list(norms.values())))
    clipped = {
        name: t * (min(1.0, clip_norm / norms[name]) if norms[name] > 0 else 1.0) for name, t in tensors.items()
    }
    return clipped, clip_norm, global_l2_norm(tensors)
