"""Formula-driven synthetic images: iterated-function-system fractals (FractalDB-style).

Kataoka et al. (ACCV 2020, "Pre-training without Natural Images") pretrain vision
models to tell apart fractal categories, each one an iterated function system (IFS)
of a few random affine maps, rendered by the chaos game. No real image is involved,
so a model pretrained on them carries no one's data, and the data set is a formula
plus a seed rather than a download. No maintained library generates IFS fractals
as tensors, hence this small generator (numpy only, vectorised over images).

Rendering follows the sensor model of the target data (``dpfl.task.rendering``): the
points are drawn on a ``render_size`` binary grid and block-averaged down to
``image_size``.
"""

from __future__ import annotations

import numpy as np

from dpfl.task.rendering import SyntheticConfig, block_mean, fit_to_canvas

# FractalDB keeps an IFS only if its attractor fills enough of the canvas; too
# thin (a line or a point) or too full (a blob) a category is hard to tell apart.
MIN_FILL, MAX_FILL = 0.08, 0.5
FILL_CHECK_SIZE = 32
# Chaos-game iterations per image, and the first ones dropped (the transient before
# the orbit reaches the attractor).
POINTS_PER_IMAGE = 1200
TRANSIENT = 20
# Largest spectral norm of a map: below 1 even after the ±10% instance jitter.
MAX_CONTRACTION = 0.9


def sample_ifs(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One IFS: 2-4 contractive affine maps (A, b) and the chaos game's map probabilities.

    As in FractalDB, the map parameters are uniform in [-1, 1] and each map is chosen
    with probability proportional to |det A|; maps that are not contractions are
    redrawn, so the attractor exists.
    """
    n_maps = int(rng.integers(2, 5))
    mats, shifts = [], []
    while len(mats) < n_maps:
        params = rng.uniform(-1.0, 1.0, size=6)
        a = params[:4].reshape(2, 2)
        if np.linalg.norm(a, 2) < MAX_CONTRACTION:
            mats.append(a)
            shifts.append(params[4:])
    mats_arr, shifts_arr = np.stack(mats), np.stack(shifts)
    dets = np.abs(np.linalg.det(mats_arr)) + 1e-3
    return mats_arr, shifts_arr, dets / dets.sum()


def chaos_game(mats: np.ndarray, shifts: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Points of the attractors, (n_images, POINTS_PER_IMAGE, 2): one random orbit per image.

    ``mats`` (n_images, n_maps, 2, 2) are each image's maps; ``shifts`` and ``probs``
    are shared.
    """
    n_images = mats.shape[0]
    point = np.zeros((n_images, 2))
    out = np.empty((n_images, POINTS_PER_IMAGE, 2))
    choices = rng.choice(len(probs), size=(TRANSIENT + POINTS_PER_IMAGE, n_images), p=probs)
    index = np.arange(n_images)
    for step, chosen in enumerate(choices):
        point = np.einsum("nij,nj->ni", mats[index, chosen], point) + shifts[chosen]
        if step >= TRANSIENT:
            out[:, step - TRANSIENT] = point
    return out


def rasterise(points: np.ndarray, render_size: int, image_size: int) -> np.ndarray:
    """Binary canvas of the points (scaled to fit), block-averaged to ``image_size``; in [0, 1]."""
    n = points.shape[0]
    pixels = np.clip(fit_to_canvas(points, render_size, margin=1).astype(int), 0, render_size - 1)
    canvas = np.zeros((n, render_size, render_size), dtype=np.float32)
    rows = np.repeat(np.arange(n), points.shape[1])
    canvas[rows, pixels[..., 1].ravel(), pixels[..., 0].ravel()] = 1.0
    return block_mean(canvas, image_size)


def _fill_rate(mats: np.ndarray, shifts: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> float:
    canvas = rasterise(chaos_game(mats[None], shifts, probs, rng), FILL_CHECK_SIZE, FILL_CHECK_SIZE)
    return float(canvas.mean())


def generate_fractals(config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, size, size) float32 in [0, 1], labels (N,) int64), N = categories x instances.

    Instances of a category are its IFS with each map's parameters jittered by up to
    ±10% (FractalDB's intra-category variation) and a random horizontal flip.
    """
    rng = np.random.default_rng(config.seed)
    images, labels = [], []
    for category in range(config.categories):
        while True:
            mats, shifts, probs = sample_ifs(rng)
            if MIN_FILL <= _fill_rate(mats, shifts, probs, rng) <= MAX_FILL:
                break
        n = config.instances
        jitter = rng.uniform(0.9, 1.1, size=(n, len(probs), 1, 1))
        points = chaos_game(mats[None] * jitter, shifts, probs, rng)
        flip = rng.random(n) < 0.5
        points[flip, :, 0] *= -1
        images.append(rasterise(points, config.render_size, config.image_size))
        labels.append(np.full(n, category, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)
