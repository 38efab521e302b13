"""Transformers: explicit attention projections, Σ-weighted SVD of every linear layer,
and deployment with static weights on crossbars and attention products digital."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from dpfl.cim.device import CrossbarDevice
from dpfl.cim.model import calibrate, to_crossbars
from dpfl.cim.metrics import model_distortion
from dpfl.compression.covariance import collect_statistics
from dpfl.compression.pipeline import compress_model
from dpfl.compression.surgery import default_layers
from dpfl.cim.study import operations
from dpfl.task.attention import ExplicitAttention, explicit_attention
from dpfl.task.checkpoint import Checkpoint, ModelSpec

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.mark.parametrize("batch_first", [True, False])
def test_explicit_attention_equals_multihead_attention(batch_first):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=12, vdim=10).eval()
    explicit = ExplicitAttention.from_multihead(reference).eval()
    batch, target, source = 3, 5, 7
    shape = (lambda length, dim: (batch, length, dim)) if batch_first else (lambda length, dim: (length, batch, dim))
    query, key, value = torch.randn(shape(target, 16)), torch.randn(shape(source, 12)), torch.randn(shape(source, 10))
    padding = torch.zeros(batch, source, dtype=torch.bool)
    padding[1, -2:] = True
    causal = torch.randn(target, source)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": causal, "average_attn_weights": False}):
        expected, expected_weights = reference(query, key, value, **kwargs)
        output, weights = explicit(query, key, value, **kwargs)
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)


def vit() -> nn.Module:
    torch.manual_seed(0)
    return ModelSpec("vit", 10, 1, 8, 4).build().eval()


def test_the_vit_with_explicit_attention_computes_the_same_function():
    model = vit()
    images = torch.randn(6, 1, 8, 8)
    expected = model(images)
    assert explicit_attention(model) == 4
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-6)


def test_vit_svd_at_full_rank_keeps_the_outputs_and_lists_the_projections():
    model = vit()
    images = torch.randn(32, 1, 8, 8)
    expected = model(images)
    explicit_attention(model)
    layers = default_layers(model, "svd")  # all but the classifier (zero at initialisation)
    assert all(any(name.endswith(p) for name in layers) for p in PROJECTIONS)
    statistics = collect_statistics(model, [images], layers, 1)
    ranks = {name: (min(model.get_submodule(name).weight.shape),) for name in layers}
    record, results = compress_model(model, "svd", "sigma", ranks, statistics, (1, 8, 8))
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)
    reported = {result.name for result in results}
    assert {f"encoder.layers.encoder_layer_0.self_attention.{p}" for p in PROJECTIONS} <= reported
    assert all(result.sigma_rel_error < 1e-6 for result in results)
    # The checkpoint rebuilds the explicit, factorised structure.
    rebuilt = Checkpoint(ModelSpec("vit", 10, 1, 8, 4), "digits", model.state_dict(), record).build_model().eval()
    torch.testing.assert_close(rebuilt(images), model(images))


def test_vit_on_ideal_wires_equals_the_quantised_model_and_reports_nf_per_analog_layer():
    model = vit()
    explicit_attention(model)
    images = torch.randn(16, 1, 8, 8)
    device = CrossbarDevice(tile_size=64, r_wordline=0.0, r_bitline=0.0)
    statistics = calibrate(model, images, device, 8, torch.Generator().manual_seed(0))
    ideal_wires = to_crossbars(model, statistics, device, "mdm", "fast")
    quantised = to_crossbars(model, statistics, device, "mdm", "ideal")
    with torch.no_grad():
        torch.testing.assert_close(ideal_wires(images), quantised(images), rtol=1e-5, atol=1e-5)
    wired = dataclasses.replace(device, r_wordline=2.0, r_bitline=2.0)
    distortion = model_distortion(model, calibrate(model, images, wired, 8, torch.Generator().manual_seed(0)), wired, "naive")
    nf = {layer.name: layer.nf for layer in distortion.layers}
    assert all(nf[f"encoder.layers.encoder_layer_1.self_attention.{p}"] > 0 for p in PROJECTIONS)
    table = {row["operation"]: row["where"] for row in operations(model)}
    assert table["encoder.layers.encoder_layer_0.self_attention.q_proj"] == "analog"
    assert table["encoder.layers.encoder_layer_0.self_attention.scores"] == "digital"
    assert table["encoder.layers.encoder_layer_0.self_attention.values"] == "digital"
    assert table["conv_proj"] == "analog" and table["heads.head"] == "analog"
