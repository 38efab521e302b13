"""Formula-driven synthetic images: made-up characters of random pen strokes.

Formula-driven supervised learning (Kataoka et al., ACCV 2020 for fractals, CVPR 2022
for contours) pretrains a model on categories defined by a formula and a seed, so the
data set carries no one's data and is code rather than a download. Here a category
is a made-up character: one to three cubic Bézier strokes with random control points,
the kind of shape handwriting is made of. Its instances vary as handwriting does: the
control points move a little, the character is rotated and sheared, the pen width
changes. Each instance is size-normalised into the canvas (as the NIST digits behind
scikit-learn's were), drawn on a binary grid and block-averaged to the model's input
size (``dpfl.task.rendering``). No real image, font or glyph is involved; Pillow
draws the wide lines.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from dpfl.task.rendering import SyntheticConfig, block_mean, fit_to_canvas

MAX_STROKES = 3
# Control points are drawn in the centre 70% of the unit square, and each instance
# moves them by this standard deviation (the intra-category variation).
CONTROL_LOW, CONTROL_HIGH = 0.15, 0.85
CONTROL_JITTER = 0.06
# Largest rotation (radians, about 14 degrees) and shear of an instance.
MAX_ROTATION = 0.25
MAX_SHEAR = 0.2
# Pen widths in pixels of the render canvas (32x32 for digits: 3-5 px, a pen's width there).
PEN_WIDTHS = (3, 6)
POINTS_PER_STROKE = 60


def bezier(control: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Points of the cubic Bézier curves ``control`` (..., 4, 2) at parameters ``t`` (m,): (..., m, 2)."""
    t = t[:, None]
    weights = [(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3]
    return sum(w * control[..., i, None, :] for i, w in enumerate(weights))


def _draw(strokes: np.ndarray, pen_width: int, render_size: int) -> np.ndarray:
    """Binary canvas of ``strokes`` (n_strokes, m, 2), scaled to fill it with the aspect ratio kept."""
    # Keep a pen's half-width and one pixel clear of the edge.
    pixels = fit_to_canvas(strokes.reshape(1, -1, 2), render_size, 1 + pen_width / 2).reshape(strokes.shape)
    image = Image.new("L", (render_size, render_size), 0)
    draw = ImageDraw.Draw(image)
    for stroke in pixels:
        draw.line([tuple(point) for point in stroke], fill=255, width=pen_width, joint="curve")
    return np.asarray(image, dtype=np.float32) / 255.0


def generate_strokes(config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, size, size) float32 in [0, 1], labels (N,) int64), N = categories x instances."""
    rng = np.random.default_rng(config.seed)
    t = np.linspace(0.0, 1.0, POINTS_PER_STROKE)
    canvases, labels = [], []
    for category in range(config.categories):
        n_strokes = int(rng.integers(1, MAX_STROKES + 1))
        control = rng.uniform(CONTROL_LOW, CONTROL_HIGH, size=(n_strokes, 4, 2))
        for _ in range(config.instances):
            angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
            shear = rng.uniform(-MAX_SHEAR, MAX_SHEAR)
            rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            transform = rotation @ np.array([[1.0, shear], [0.0, 1.0]])
            pen_width = int(rng.integers(*PEN_WIDTHS))
            moved = control + rng.normal(0.0, CONTROL_JITTER, size=control.shape)
            canvases.append(_draw(bezier(moved, t) @ transform.T, pen_width, config.render_size))
            labels.append(category)
    return block_mean(np.stack(canvases), config.image_size), np.asarray(labels, dtype=np.int64)
