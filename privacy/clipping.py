"""Flat L2 clipping of a model update, as one vector or as named tensors."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from dpfl.flat import Layout

Tensors = Mapping[str, torch.Tensor]

# How many float64 bytes of rows :func:`clip_rows` takes at once: a block that stays in the
# cache is clipped several times faster than one large matrix streamed through memory.
ROW_BLOCK_BYTES = 1 << 24
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
    (:class:`dpfl.flat.Layout`), returned as named views of it.
    """
    layout = Layout(tensors)
    clipped, norm = clip_vector(layout.flatten(tensors), clip_norm, layout.cast)
    return layout.unflatten(clipped), norm


def clip_vector(
    vector: torch.Tensor, clip_norm: float, cast: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, float]:
    """``vector`` scaled by min(1, C/‖u‖) (just under C/‖u‖ when it clips), and ‖u‖ before
    clipping (:func:`clip_rows` on one row).

    The norm and the scale are computed in float64 and the result, rounded as it will
    be held (``cast``, by default to the vector's own dtype), is checked again:
    ‖clip(u)‖ ≤ C holds exactly for what is returned, not only up to float32 rounding.
    A non-finite update (NaN or Inf anywhere) is replaced by zeros: ``min(1, C/nan)``
    would be 1 and let it through unclipped.
    """
    clipped, norms = clip_rows(vector.unsqueeze(0), clip_norm, cast)
    return clipped[0], float(norms[0])


def clip_rows(
    matrix: torch.Tensor, clip_norm: float, cast: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``matrix`` [n, d] clipped as :func:`clip_vector` clips one update, and the
    rows' float64 norms before clipping: one norm per row, one scaling of a block of rows
    (a cohort's or a round's updates at once), each row on its own.

    A row whose norm is within C is returned as it is; one that is not finite becomes
    zeros; any other is scaled by (just under) C/‖u‖ in float64, rounded by ``cast`` (default:
    to the matrix's dtype) and its norm checked again, shrinking its scale until it holds. The
    float64 work runs in one reused buffer of :func:`row_block` rows: a fresh float64 copy
    of every block costs more in page faults than the arithmetic.
    """
    count, size = matrix.shape
    block = row_block(size)
    work = torch.empty(min(count, block), size, dtype=torch.float64)
    norms = torch.empty(count, dtype=torch.float64)
    clipped: torch.Tensor | None = None  # made when a first row changes
    for first in range(0, count, block):
        rows = slice(first, first + block)
        wide = work[: len(matrix[rows])].copy_(matrix[rows])
        norms[rows] = block_norms = torch.linalg.vector_norm(wide, dim=1)
        finite = torch.isfinite(block_norms)
        # A scale one step under C/‖u‖: rounding back to the held dtype (at most a few ulps
        # up) then stays within C, where the exact C/‖u‖ needs a second try for about half
        # of the rows (the result differs from it by a relative 2⁻²², far below float32's).
        scales = torch.where(block_norms > clip_norm, clip_norm / block_norms * _SHRINK, 1.0).masked_fill_(~finite, 0.0)
        if bool((scales == 1.0).all()):
            if clipped is not None:
                clipped[rows] = matrix[rows]
            continue
        if clipped is None:
            clipped = torch.empty_like(matrix)
            clipped[:first] = matrix[:first]
        # Scale 1 leaves a row as it is (its values already round to themselves).
        target = clipped[rows]
        _store(target, wide.mul_(scales[:, None]), cast)
        if not bool(finite.all()):
            target.masked_fill_(~finite[:, None], 0.0)
        # Should rounding still land a hair above C, shrink those rows again and retry.
        over = ((torch.linalg.vector_norm(wide.copy_(target), dim=1) > clip_norm) & (scales < 1.0)).nonzero().flatten()
        while len(over):
            scales[over] *= _SHRINK
            scaled = matrix[rows][over].double() * scales[over, None]
            target[over] = cast(scaled) if cast is not None else scaled.to(matrix.dtype)
            over = over[torch.linalg.vector_norm(target[over].double(), dim=1) > clip_norm]
    return (matrix if clipped is None else clipped), norms


def _store(target: torch.Tensor, scaled: torch.Tensor, cast: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """``target`` = ``scaled`` rounded as it is held (``cast``, else to ``target``'s dtype)."""
    target.copy_(scaled if cast is None else cast(scaled))


def row_block(size: int) -> int:
    """How many rows of ``size`` values to clip (or sum) at once: :data:`ROW_BLOCK_BYTES` of float64."""
    return max(1, ROW_BLOCK_BYTES // (8 * max(1, size)))


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
