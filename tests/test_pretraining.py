"""Synthetic fractal data and the cached public pretraining built on it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dpfl.errors import UsageError
from dpfl.task.checkpoint import ModelSpec
from dpfl.task.fractals import FractalConfig, generate_fractals
from dpfl.task.pretraining import PretrainConfig, initialise, pretrained_weights

TINY = PretrainConfig(fractals=FractalConfig(categories=4, instances=6), epochs=1, batch_size=8)
SPEC = ModelSpec("vit", 10, 1, 8, 4)


def test_fractals_are_deterministic_images_of_distinct_categories():
    config = FractalConfig(categories=5, instances=10, seed=3)
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


def test_pretrained_weights_are_cached_by_content_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("DPFL_CACHE_DIR", str(tmp_path))
    weights, path, seconds = pretrained_weights(SPEC, TINY)
    assert seconds > 0 and path.is_file() and path.is_relative_to(tmp_path)
    assert not any(key.startswith("heads.") for key in weights)  # the head is the target task's
    cached, same_path, cached_seconds = pretrained_weights(SPEC, TINY)
    assert same_path == path and cached_seconds == 0.0
    assert all(torch.equal(cached[k], weights[k]) for k in weights)
    _, other_path, _ = pretrained_weights(SPEC, dataclasses.replace(TINY, seed=1))
    assert other_path != path
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
    with pytest.raises(UsageError, match="unknown pretraining 'imagenet'"):
        initialise(model, SPEC, "imagenet")
