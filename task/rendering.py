"""The sensor model shared by the synthetic image generators.

scikit-learn's digits were made by drawing each digit as a 32x32 binary bitmap and
counting the set pixels in 4x4 blocks; rendering synthetic images the same way (a
binary canvas, block-averaged to the model's input size) gives them the target
data's grey levels and blur.
"""

from __future__ import annotations

import numpy as np


def block_mean(canvas: np.ndarray, image_size: int) -> np.ndarray:
    """(n, r, r) binary canvases averaged in (r / image_size)-pixel blocks: (n, image_size, image_size) in [0, 1]."""
    n, render_size = canvas.shape[0], canvas.shape[1]
    if render_size == image_size:
        return canvas
    if render_size % image_size:
        raise ValueError(f"render size {render_size} is not a multiple of image size {image_size}")
    block = render_size // image_size
    return canvas.reshape(n, image_size, block, image_size, block).mean(axis=(2, 4))
