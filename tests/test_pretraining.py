"""Synthetic fractal and pen-stroke data, and the cached public pretraining built on them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dpfl.errors import UsageError
from dpfl.task.checkpoint import ModelSpec
from dpfl.task.fractals import generate_fractals
from dpfl.task.pretraining import PretrainConfig, initialise, pretrained_weights
from dpfl.task.rendering import SyntheticConfig, block_mean
from dpfl.task.strokes import generate_strokes

TINY = PretrainConfig(data=SyntheticConfig(categories=4, instances=6), epochs=1, batch_size=8)
SPEC = ModelSpec("vit", 10, 1, 8, 4)


def test_fractals_are_deterministic_images_of_distinct_categories():
    config = SyntheticConfig(categories=5, instances=10, seed=3)
    images, labels = generate_fractals(config)
    assert images.shape == (50, 8, 8) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1 and images.mean() > 0.02
    assert np.array_equal(labels, np.repeat(np.arange(5), 10))
    again, _ = generate_fractals(config)
    assert np.array_equal(images, again)
    other, _ = generate_fractals(dataclasses.replace(config, seed=4))
    assert not np.array_equal(images, other)
    # Instances of a category are closer to their own category's mean than to the others'.
    means = images.reshape(5, 10, -1).mean(axis=1)
    distances = ((images.reshape(50, 1, -1) - means[None]) ** 2).sum(axis=2)
    assert (distances.argmin(axis=1) == labels).mean() > 0.6


def test_strokes_are_deterministic_size_normalised_characters_of_distinct_categories():
    config = SyntheticConfig(categories=5, instances=10, seed=3)
    images, labels = generate_strokes(config)
    assert images.shape == (50, 8, 8) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1
    assert np.array_equal(labels, np.repeat(np.arange(5), 10))
    again, _ = generate_strokes(config)
    assert np.array_equal(images, again)
    other, _ = generate_strokes(dataclasses.replace(config, seed=4))
    assert not np.array_equal(images, other)
    # Size-normalised as the digits were: every character spans the canvas along its longer side.
    rows, cols = images.max(axis=2) > 0, images.max(axis=1) > 0
    extent = np.maximum(rows.sum(axis=1), cols.sum(axis=1))
    assert extent.min() >= 7
    means = images.reshape(5, 10, -1).mean(axis=1)
    distances = ((images.reshape(50, 1, -1) - means[None]) ** 2).sum(axis=2)
    assert (distances.argmin(axis=1) == labels).mean() > 0.6


def test_block_mean_counts_set_pixels_per_block():
    canvas = np.zeros((1, 8, 8), dtype=np.float32)
    canvas[0, :4, :4] = 1.0
    canvas[0, 4, 4] = 1.0
    assert np.array_equal(block_mean(canvas, 2)[0], [[1.0, 0.0], [0.0, 1 / 16]])
    assert block_mean(canvas, 8) is canvas
    with pytest.raises(ValueError, match="render size 8 is not a multiple of image size 3"):
        block_mean(canvas, 3)


@pytest.mark.parametrize("dataset", ["fractal", "strokes"])
def test_pretrained_weights_are_cached_by_content_hash(tmp_path, monkeypatch, dataset):
    monkeypatch.setenv("DPFL_CACHE_DIR", str(tmp_path))
    weights, path, seconds = pretrained_weights(SPEC, dataset, TINY)
    assert seconds > 0 and path.is_file() and path.is_relative_to(tmp_path)
    assert not any(key.startswith("heads.") for key in weights)  # the head is the target task's
    cached, same_path, cached_seconds = pretrained_weights(SPEC, dataset, TINY)
    assert same_path == path and cached_seconds == 0.0
    assert all(torch.equal(cached[k], weights[k]) for k in weights)
    _, other_path, _ = pretrained_weights(SPEC, dataset, dataclasses.replace(TINY, seed=1))
    assert other_path != path
    other_dataset = {"fractal": "strokes", "strokes": "fractal"}[dataset]
    other_weights, other_dataset_path, _ = pretrained_weights(SPEC, other_dataset, TINY)
    assert other_dataset_path != path and not torch.equal(other_weights["conv_proj.weight"], weights["conv_proj.weight"])
    model = SPEC.build()
    model.load_state_dict(weights, strict=False)
    random_init = SPEC.build()
    assert not torch.equal(model.conv_proj.weight, random_init.conv_proj.weight)


def test_initialise_none_keeps_the_random_init_and_rejects_unknown_names():
    torch.manual_seed(0)
    model = SPEC.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert initialise(model, SPEC, "none") == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UsageError, match="unknown pretraining 'imagenet'; choose one of none, fractal, strokes"):
        initialise(model, SPEC, "imagenet")
