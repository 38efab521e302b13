"""What the synthetic image generators share: their configuration, fitting a shape to
the canvas, and the sensor model.

scikit-learn's digits were made by drawing each digit as a 32x32 binary bitmap and
counting the set pixels in 4x4 blocks; rendering synthetic images the same way (a
binary canvas, block-averaged to the model's input size) gives them the target
data's grey levels and blur.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines a synthetic data set (part of the pretraining cache key)."""

    categories: int = 100
    instances: int = 80
    image_size: int = 8
    render_size: int = 32
    seed: int = 0


def fit_to_canvas(points: np.ndarray, render_size: int, margin: float) -> np.ndarray:
    """Pixel coordinates of the points (n, m, 2) of n shapes, each scaled on its own so
    that its longer side spans the canvas but ``margin`` pixels at each end, centred,
    with its aspect ratio kept (the size normalisation the NIST digits went through)."""
    low = points.min(axis=1, keepdims=True)
    extent = points.max(axis=1, keepdims=True) - low
    span = extent.max(axis=2, keepdims=True) + 1e-9
    centred = (points - low) / span - 0.5 * (extent / span - 1)
    return centred * (render_size - 2 * margin) + margin


def block_mean(canvas: np.ndarray, image_size: int) -> np.ndarray:
    """(n, r, r) binary canvases averaged in (r / image_size)-pixel blocks: (n, image_size, image_size) in [0, 1]."""
    n, render_size = canvas.shape[0], canvas.shape[1]
    if render_size == image_size:
        return canvas
    if render_size % image_size:
        raise ValueError(f"render size {render_size} is not a multiple of image size {image_size}")
    block = render_size // image_size
    return canvas.reshape(n, image_size, block, image_size, block).mean(axis=(2, 4))
