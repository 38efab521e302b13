"""Data-informed compression: the Σ-norm solvers, covariance, surgery and ``dpfl compress``."""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dpfl.compression import sigma_norm
from dpfl.compression.cost import count_macs
from dpfl.compression.covariance import (
    InputMoments,
    check_statistics,
    collect_statistics,
    load_statistics,
    save_statistics,
)
from dpfl.compression.cpd import cpd_frobenius, cpd_sigma_als
from dpfl.compression.pipeline import CompressionConfig, compress_model, output_error
from dpfl.compression.ranks import factorised_count, plan_ranks, ranks_for_ratio, weight_count
from dpfl.compression.sigma_norm import sigma_objective
from dpfl.compression.surgery import default_layers, load_factors, weight_shape
from dpfl.compression.svd import svd_frobenius, svd_sigma
from dpfl.compression.tucker2 import tucker2_frobenius, tucker2_sigma_als
from dpfl.errors import UsageError
from dpfl.task.checkpoint import Checkpoint, ModelSpec, checkpoint_dataset, load_checkpoint, save_checkpoint
from dpfl.task.factorised import factorised_structure
from dpfl.task.layers import input_rows

DOUBLE = torch.float64


def random_spd(dim: int, seed: int) -> torch.Tensor:
    """A covariance with a wide spectrum, like real layer inputs."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=DOUBLE))
    spectrum = torch.logspace(0, -3, dim, dtype=DOUBLE)
    return basis @ torch.diag(spectrum) @ basis.T


def low_rank_kernel(shape: tuple[int, ...], ranks: tuple[int, int], noise: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    out_channels, in_channels, kh, kw = shape
    core = torch.randn(ranks[0], ranks[1], kh, kw, generator=generator, dtype=DOUBLE)
    u_out = torch.randn(out_channels, ranks[0], generator=generator, dtype=DOUBLE)
    u_in = torch.randn(in_channels, ranks[1], generator=generator, dtype=DOUBLE)
    kernel = torch.einsum("ta,abpq,sb->tspq", u_out, core, u_in)
    return kernel + noise * kernel.norm() / kernel.numel() ** 0.5 * torch.randn(shape, generator=generator, dtype=DOUBLE)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def flat(kernel: torch.Tensor) -> torch.Tensor:
    return kernel.reshape(kernel.shape[0], -1)


# ---------------------------------------------------------------- Σ = I is the Frobenius norm


def test_tucker2_sigma_identity_equals_frobenius():
    kernel = low_rank_kernel((10, 8, 3, 3), (4, 3), noise=0.05, seed=0)
    frobenius = tucker2_frobenius(kernel, (4, 3), n_iter_max=500, tol=1e-14)
    identity = torch.eye(8 * 9, dtype=DOUBLE)
    result, trace = tucker2_sigma_als(kernel, identity, (4, 3), frobenius, max_iter=20, tol=1e-12)
    assert relative(result.to_weight(), frobenius.to_weight()) < 1e-6
    assert trace.objectives[-1] == pytest.approx(trace.objectives[0], rel=1e-8)


def test_cpd_sigma_identity_equals_frobenius():
    generator = torch.Generator().manual_seed(1)
    factors = [torch.randn(n, 4, generator=generator, dtype=DOUBLE) for n in (8, 6, 3, 3)]
    kernel = torch.einsum("tr,sr,pr,qr->tspq", *factors)
    kernel = kernel + 1e-3 * kernel.std() * torch.randn(kernel.shape, generator=generator, dtype=DOUBLE)
    frobenius = cpd_frobenius(kernel, 4, n_iter_max=2000, tol=1e-14)
    identity = torch.eye(6 * 9, dtype=DOUBLE)
    result, trace = cpd_sigma_als(kernel, identity, 4, frobenius, max_iter=20, tol=1e-12)
    assert relative(result.to_weight(), frobenius.to_weight()) < 1e-5
    assert trace.objectives[-1] == pytest.approx(trace.objectives[0], rel=1e-6)


def test_svd_sigma_identity_equals_frobenius():
    weight = torch.randn(12, 20, dtype=DOUBLE)
    sigma = svd_sigma(weight, torch.eye(20, dtype=DOUBLE), 5).to_weight()
    assert relative(sigma, svd_frobenius(weight, 5).to_weight()) < 1e-10


# ---------------------------------------------------------------- full rank is exact


def test_full_rank_reconstruction_is_exact():
    kernel = torch.randn(6, 5, 3, 3, dtype=DOUBLE)
    sigma = random_spd(5 * 9, seed=2)
    tucker, _ = tucker2_sigma_als(kernel, sigma, (6, 5), tucker2_frobenius(kernel, (6, 5)), max_iter=3)
    assert relative(tucker.to_weight(), kernel) < 1e-10
    weight = torch.randn(7, 11, dtype=DOUBLE)
    assert relative(svd_sigma(weight, random_spd(11, seed=3), 7).to_weight(), weight) < 1e-10
    # A tensor of CP rank 3 is recovered exactly at rank 3.
    exact = torch.einsum("tr,sr,pr,qr->tspq", *(torch.randn(n, 3, dtype=DOUBLE) for n in (6, 5, 3, 3)))
    cpd, _ = cpd_sigma_als(exact, sigma, 3, cpd_frobenius(exact, 3), max_iter=50, tol=1e-14)
    assert relative(cpd.to_weight(), exact) < 1e-6


# ---------------------------------------------------------------- Σ-ALS beats Frobenius, monotonically


@pytest.mark.parametrize("seed", [0, 1])
def test_tucker2_sigma_als_beats_frobenius_monotonically(seed):
    kernel = torch.randn(12, 10, 3, 3, dtype=DOUBLE, generator=torch.Generator().manual_seed(seed))
    sigma = random_spd(10 * 9, seed=seed)
    frobenius = tucker2_frobenius(kernel, (5, 4))
    result, trace = tucker2_sigma_als(kernel, sigma, (5, 4), frobenius, max_iter=40, tol=0)
    assert trace.stopped != "increase"
    assert all(later <= earlier for earlier, later in zip(trace.objectives, trace.objectives[1:]))
    sigma_error = sigma_objective(flat(kernel), flat(result.to_weight()), sigma)
    frobenius_error = sigma_objective(flat(kernel), flat(frobenius.to_weight()), sigma)
    assert sigma_error < 0.9 * frobenius_error


def test_tucker2_conjugate_gradient_path_is_monotone(monkeypatch):
    """The matrix-free CG solve (used for large layers) descends like the exact one."""
    kernel = torch.randn(12, 10, 3, 3, dtype=DOUBLE, generator=torch.Generator().manual_seed(4))
    sigma = random_spd(10 * 9, seed=4)
    frobenius = tucker2_frobenius(kernel, (5, 4))
    exact, exact_trace = tucker2_sigma_als(kernel, sigma, (5, 4), frobenius, max_iter=10, tol=0)
    monkeypatch.setattr(sigma_norm, "EXACT_SOLVE_MAX_UNKNOWNS", 0)
    iterative, trace = tucker2_sigma_als(kernel, sigma, (5, 4), frobenius, max_iter=10, tol=0, cg_max_iter=200)
    assert trace.stopped != "increase"
    assert all(later <= earlier for earlier, later in zip(trace.objectives, trace.objectives[1:]))
    assert trace.objectives[-1] == pytest.approx(exact_trace.objectives[-1], rel=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_cpd_sigma_als_beats_frobenius_monotonically(seed, monkeypatch):
    kernel = torch.randn(10, 8, 3, 3, dtype=DOUBLE, generator=torch.Generator().manual_seed(seed))
    sigma = random_spd(8 * 9, seed=seed)
    frobenius = cpd_frobenius(kernel, 12)
    if seed:  # the input factor by CG instead of the exact solve
        monkeypatch.setattr(sigma_norm, "EXACT_SOLVE_MAX_UNKNOWNS", 64)
    result, trace = cpd_sigma_als(kernel, sigma, 12, frobenius, max_iter=30, tol=0)
    assert trace.stopped != "increase"
    assert all(later <= earlier for earlier, later in zip(trace.objectives, trace.objectives[1:]))
    sigma_error = sigma_objective(flat(kernel), flat(result.to_weight()), sigma)
    assert sigma_error < 0.9 * sigma_objective(flat(kernel), flat(frobenius.to_weight()), sigma)


def test_linear_solution_is_the_closed_form_optimum():
    """[W Σ^½]_r Σ^-½ with the symmetric square root (the solver uses Cholesky)."""
    weight = torch.randn(9, 16, dtype=DOUBLE)
    sigma = random_spd(16, seed=5)
    values, vectors = torch.linalg.eigh(sigma)
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T
    left, singular, right = torch.linalg.svd(weight @ root)
    closed_form = (left[:, :4] * singular[:4]) @ right[:4] @ torch.linalg.inv(root)
    solution = svd_sigma(weight, sigma, 4).to_weight()
    assert relative(solution, closed_form) < 1e-8
    assert sigma_objective(weight, solution, sigma) < sigma_objective(weight, svd_frobenius(weight, 4).to_weight(), sigma)


# ---------------------------------------------------------------- the replacement layers compute W̃


@pytest.mark.parametrize("method", ["tucker2", "cpd"])
def test_factorised_conv_computes_the_approximated_kernel(method):
    conv = nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=True).double()
    kernel = conv.weight.detach()
    if method == "tucker2":
        ranks = (5, 4)
        result = tucker2_frobenius(kernel, ranks)
        factors = [result.input_factor.T, result.core, result.output_factor]
    else:
        ranks = (7,)
        result = cpd_frobenius(kernel, 7)
        factors = [result.input_factor.T, result.vertical_factor.T, result.horizontal_factor.T, result.output_factor]
    bias = torch.randn(8, dtype=DOUBLE)
    structure = factorised_structure(conv, method, ranks, bias=True).double()
    load_factors(structure, factors, bias)
    inputs = torch.randn(2, 6, 11, 13, dtype=DOUBLE)
    expected = F.conv2d(inputs, result.to_weight(), bias, conv.stride, conv.padding, conv.dilation)
    assert torch.allclose(structure(inputs), expected, atol=1e-10)


def test_factorised_linear_and_pointwise_conv_compute_the_low_rank_weight():
    linear = nn.Linear(10, 7).double()
    low_rank = svd_frobenius(linear.weight.detach(), 3)
    structure = factorised_structure(linear, "svd", (3,), bias=True).double()
    load_factors(structure, [low_rank.right, low_rank.left], linear.bias.detach())
    inputs = torch.randn(4, 10, dtype=DOUBLE)
    assert torch.allclose(structure(inputs), F.linear(inputs, low_rank.to_weight(), linear.bias), atol=1e-10)

    conv = nn.Conv2d(10, 7, 1, stride=2, bias=False).double()
    low_rank = svd_frobenius(flat(conv.weight.detach()), 3)
    structure = factorised_structure(conv, "svd", (3,), bias=False).double()
    load_factors(structure, [low_rank.right, low_rank.left], None)
    images = torch.randn(2, 10, 6, 6, dtype=DOUBLE)
    expected = F.conv2d(images, low_rank.to_weight().reshape(7, 10, 1, 1), stride=2)
    assert torch.allclose(structure(images), expected, atol=1e-10)


# ---------------------------------------------------------------- covariance


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_statistics_and_mac_passes_leave_the_model_as_they_found_it():
    """The forward hooks are removed and the training flag restored, even in train mode."""
    model = TwoConvs().train()
    images = torch.randn(3, 2, 7, 7, generator=torch.Generator().manual_seed(0))
    collect_statistics(model, [images], ["conv2", "fc"], max_batches=1)
    macs = count_macs(model, (2, 7, 7))
    assert model.training
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    # conv1: 7x7 outputs x 4 channels x (2·3·3); conv2: 4x4 x 6 x (4·3·3); fc: 3 x 6
    assert macs == {"conv1": 49 * 4 * 18, "conv2": 16 * 6 * 36, "fc": 18}


def test_a_data_set_that_does_not_fit_the_model_is_a_one_line_error():
    checkpoint = Checkpoint(ModelSpec("cnn", 5, 1, 8, 8), "digits", {})
    with pytest.raises(UsageError, match="dataset 'digits' has 1 channels and 10 classes; the model expects 1 and 5") as raised:
        checkpoint_dataset(checkpoint)
    assert "\n" not in str(raised.value)


def test_streaming_covariance_equals_the_batch_covariance(tmp_path):
    torch.manual_seed(0)
    model = TwoConvs()
    images = torch.randn(40, 2, 7, 7)
    loader = DataLoader(TensorDataset(images, torch.zeros(40)), batch_size=7)
    statistics = collect_statistics(model, loader, ["conv2", "fc"], max_batches=100)
    with torch.no_grad():
        hidden = torch.relu(model.conv1(images))
    patches = input_rows(model.conv2, hidden).double()
    assert statistics["conv2"].count == patches.shape[0]
    assert torch.allclose(statistics["conv2"].covariance, torch.cov(patches.T, correction=0), atol=1e-6)
    assert torch.allclose(statistics["conv2"].mean, patches.mean(dim=0), atol=1e-6)

    path = tmp_path / "cov.pt"
    save_statistics(path, statistics, {"dataset": "random"})
    loaded, source = load_statistics(path)
    assert source == {"dataset": "random"}
    assert torch.equal(loaded["conv2"].outer, statistics["conv2"].outer)
    check_statistics(loaded, model, ["conv2"], str(path))
    with pytest.raises(UsageError, match="no statistics for layer"):
        check_statistics(loaded, model, ["conv1"], str(path))
    other = TwoConvs()
    other.conv2 = nn.Conv2d(4, 6, 3, stride=1, padding=1)  # same weight shape, other geometry
    with pytest.raises(UsageError, match="recorded as"):
        check_statistics(loaded, other, ["conv2"], str(path))


# ---------------------------------------------------------------- ranks


def test_ranks_for_ratio_respect_the_budget():
    for method, shape in (("tucker2", (64, 32, 3, 3)), ("cpd", (64, 32, 3, 3)), ("svd", (40, 100))):
        for ratio in (0.5, 0.25, 0.1):
            ranks = ranks_for_ratio(method, shape, ratio)
            assert factorised_count(method, shape, ranks) <= ratio * weight_count(shape)
    layers = {"a": ("tucker2", (32, 32, 3, 3)), "b": ("tucker2", (64, 32, 3, 3))}
    compressed = sum(weight_count(shape) for _, shape in layers.values())
    model_parameters = compressed + 1000
    ranks = plan_ranks(layers, 0.5, "model", model_parameters, {})
    kept = 1000 + sum(factorised_count(method, shape, ranks[name]) for name, (method, shape) in layers.items())
    assert 0.45 * model_parameters < kept <= 0.5 * model_parameters
    assert plan_ranks(layers, 0.5, "model", model_parameters, {"a": (3, 2)})["a"] == (3, 2)


@pytest.mark.parametrize(
    "ratio, overrides, message",
    [
        (1.5, {}, "outside \\(0, 1\\)"),
        (0.0, {}, "outside \\(0, 1\\)"),
        (0.5, {"a": (33, 2)}, "rank 33 is outside 1..32"),
        (0.5, {"a": (3,)}, "takes 2 rank"),
        (0.5, {"zz": (3, 3)}, "not compressed here"),
        (0.001, {}, "unreachable"),
    ],
)
def test_bad_ratio_or_ranks_are_usage_errors(ratio, overrides, message):
    with pytest.raises(UsageError, match=message):
        plan_ranks({"a": ("tucker2", (32, 32, 3, 3))}, ratio, "model", 9216 + 500, overrides)


# ---------------------------------------------------------------- model level


def tiny_resnet() -> tuple[nn.Module, ModelSpec]:
    spec = ModelSpec(name="resnet10", num_classes=10, in_channels=1, image_size=8, width=4)
    torch.manual_seed(0)
    return spec.build().eval(), spec


@pytest.mark.parametrize("method, norm", [("tucker2", "sigma"), ("cpd", "sigma"), ("tucker2", "frobenius"), ("svd", "sigma")])
def test_compressed_model_round_trips_through_a_checkpoint(tmp_path, method, norm):
    model, spec = tiny_resnet()
    images = torch.randn(32, 1, 8, 8)
    layers = default_layers(model, method)
    assert "conv1" not in layers and "fc" not in layers
    statistics = collect_statistics(model, [(images,)], layers, max_batches=1)
    shapes = {name: (method, weight_shape(model.get_submodule(name))) for name in layers}
    ranks = plan_ranks(shapes, 0.5, "layer", 0, {})
    record, results = compress_model(model, method, norm, ranks, statistics, (1, 8, 8), CompressionConfig(max_iter=3))
    assert [r.name for r in results] == layers
    assert all(r.params_after < r.params_before for r in results)
    assert all(r.macs_after < r.macs_before for r in results)
    save_checkpoint(tmp_path / "c.pt", Checkpoint(spec, "digits", model.state_dict(), record))
    restored = load_checkpoint(tmp_path / "c.pt").build_model().eval()
    with torch.no_grad():
        assert torch.allclose(restored(images), model(images))


def layer_inputs(model: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each named layer receives when ``model`` runs on ``images``."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda _, args, name=name: captured.__setitem__(name, args[0]))
        for name in names
    ]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return captured


def compressed_layers(method: str, settings: CompressionConfig, norm: str = "sigma"):
    """Compress a small ResNet-10 through ``compress_model`` with statistics of a batch,
    and return per layer (its result, the original module, the replacement, its input on
    that batch): the original and the replacement can then be run on the very data the
    statistics describe. Its layers' inputs follow ReLUs, so their mean is far from 0.
    All in float64 (model and replacements alike), so that the measured output changes
    are exact to ~1e-12 even where the approximation is nearly exact."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(DOUBLE)
    try:
        model, _ = tiny_resnet()
        images = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        layers = default_layers(model, method)
        originals = {name: copy.deepcopy(model.get_submodule(name)) for name in layers}
        inputs = layer_inputs(model, layers, images)
        statistics = collect_statistics(model, [(images,)], layers, max_batches=1)
        shapes = {name: (method, weight_shape(model.get_submodule(name))) for name in layers}
        ranks = plan_ranks(shapes, 0.3, "layer", 0, {})
        _, results = compress_model(model, method, norm, ranks, statistics, (1, 8, 8), settings)
    finally:
        torch.set_default_dtype(default)
    return [(r, originals[r.name], model.get_submodule(r.name), inputs[r.name]) for r in results]


def as_rows(outputs: torch.Tensor) -> torch.Tensor:
    """A layer's outputs as one row per output vector: (N, T, H, W) → (N·H·W, T)."""
    return outputs.movedim(1, -1).reshape(-1, outputs.shape[1])


@pytest.mark.parametrize("method", ["tucker2", "cpd"])
def test_sigma_compression_keeps_each_layers_mean_output_on_its_data(method):
    """Centred Σ-norm: b̃ = b + (W − W̃)μ makes the replacement's mean output on the
    calibration data equal the original's (W̃μ + b̃ = Wμ + b). The correction b̃ − b is
    a third of the output's spread or more wherever W̃ is not (nearly) exact, so a wrong
    sign or a dropped term moves the mean by that much."""
    for result, original, replacement, inputs in compressed_layers(method, CompressionConfig(max_iter=3)):
        with torch.no_grad():
            before, after = as_rows(original(inputs)), as_rows(replacement(inputs))
        bias = original.bias if original.bias is not None else torch.zeros_like(replacement[-1].bias)
        correction = (replacement[-1].bias - bias).norm()
        spread = (before - before.mean(dim=0)).square().sum(dim=1).mean().sqrt()
        assert correction > 0.3 * spread or result.sigma_rel_error < 1e-4, result.name
        assert (after.mean(dim=0) - before.mean(dim=0)).norm() < 1e-9 * spread, result.name


@pytest.mark.parametrize(
    "method, norm, center", [("tucker2", "sigma", True), ("cpd", "sigma", True), ("tucker2", "sigma", False), ("tucker2", "frobenius", True)]
)
def test_reported_output_error_is_the_output_change_measured_on_the_data(method, norm, center):
    """``sigma_rel_error`` = √(E‖ỹ − y‖² / E‖y − ȳ‖²) with the expectations taken over the
    output vectors of the data the statistics came from, measured by running the
    original layer and its replacement (bias correction included) on that data."""
    for result, original, replacement, inputs in compressed_layers(method, CompressionConfig(max_iter=3, center=center), norm):
        with torch.no_grad():
            before, after = as_rows(original(inputs)), as_rows(replacement(inputs))
        change = (after - before).square().sum(dim=1).mean()
        variance = (before - before.mean(dim=0)).square().sum(dim=1).mean()
        assert result.sigma_rel_error == pytest.approx(float((change / variance).sqrt()), rel=1e-6), result.name


def test_output_error_matches_a_monte_carlo_estimate():
    """output_error for any W̃ and bias shift Δb, against the sample mean of ‖ỹ − y‖² over
    x ~ N(μ, Σ), ỹ − y = (W̃ − W)x + Δb, relative to E‖W(x − μ)‖² = tr(WΣWᵀ)."""
    generator = torch.Generator().manual_seed(6)
    dim, out = 12, 5
    sigma, mean = random_spd(dim, seed=6), torch.randn(dim, generator=generator, dtype=DOUBLE)
    statistics = InputMoments({"kind": "linear", "dim": dim}, 1, mean, sigma + torch.outer(mean, mean))
    weight = torch.randn(out, dim, generator=generator, dtype=DOUBLE)
    approximation = weight + 0.3 * torch.randn(out, dim, generator=generator, dtype=DOUBLE)
    bias_shift = torch.randn(out, generator=generator, dtype=DOUBLE)
    normal = torch.randn(200_000, dim, generator=generator, dtype=DOUBLE)
    samples = mean + normal @ torch.linalg.cholesky(sigma).T
    change = (samples @ (approximation - weight).T + bias_shift).square().sum(dim=1).mean()
    variance = ((samples - mean) @ weight.T).square().sum(dim=1).mean()
    estimate = float((change / variance).sqrt())
    assert output_error(weight, approximation, bias_shift, statistics) == pytest.approx(estimate, rel=1e-2)
    # The bias shift matters here: without it the error differs well beyond the tolerance.
    assert output_error(weight, approximation, torch.zeros(out, dtype=DOUBLE), statistics) != pytest.approx(estimate, rel=0.1)


# ---------------------------------------------------------------- the dpfl compress command


def run_compress(argv: list[str]) -> int:
    """``dpfl compress`` in-process: its own parser, so the test needs no registration."""
    from dpfl.cli import compress

    parser = argparse.ArgumentParser()
    compress.register(parser.add_subparsers())
    args = parser.parse_args(["compress", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A GroupNorm ResNet-10 trained for a few epochs on digits (plain torch loop)."""
    from dpfl.task.data import load_dataset

    torch.manual_seed(0)
    data = load_dataset("digits")
    spec = ModelSpec(name="resnet10", num_classes=10, in_channels=1, image_size=data.image_size, width=8)
    model = spec.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for images, labels in DataLoader(data.train, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    path = tmp_path_factory.mktemp("model") / "final_model.pt"
    save_checkpoint(path, Checkpoint(spec, "digits", model.state_dict()))
    return path


QUICK = ["--batches", "4", "--max-iter", "3"]


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors_and_overwrite_nothing(trained_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert run_compress(["--checkpoint", str(trained_checkpoint), "--ratio", "0.5", "--out", str(out), *QUICK]) == 0
    saved = {p.name: p.read_bytes() for p in out.iterdir()}
    base = ["--checkpoint", str(trained_checkpoint), "--out", str(out), *QUICK]
    # A statistics file from a model of another width: its layers do not match.
    other_spec = ModelSpec(name="resnet10", num_classes=10, in_channels=1, image_size=8, width=4)
    other = other_spec.build()
    save_statistics(tmp_path / "other.pt", collect_statistics(other, [(torch.randn(4, 1, 8, 8),)], ["layer1.0.conv1"], 1), {})
    # A checkpoint whose weights are not those of the model it names.
    mismatched = tmp_path / "mismatched.pt"
    save_checkpoint(mismatched, Checkpoint(ModelSpec("resnet18", 10, 1, 8, 8), "digits", load_checkpoint(trained_checkpoint).state_dict))
    for argv, message in (
        (["--ratio", "1.5"], "ratio 1.5 is outside (0, 1)"),
        (["--ratio", "0.5", "--rank", "layer1.0.conv1=9,2"], "rank 9 is outside 1..8"),
        (["--ratio", "0.5", "--covariance", str(tmp_path / "other.pt")], "no statistics for layer"),
        (["--ratio", "0.5", "--method", "cpd", "--layers", "fc"], "cannot be compressed by cpd"),
    ):
        with pytest.raises(UsageError) as error:
            run_compress([*base, *argv])
        assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(UsageError, match="does not match its model 'resnet18'"):
        run_compress(["--checkpoint", str(mismatched), "--ratio", "0.5", "--out", str(out), *QUICK])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == saved


@pytest.mark.slow
def test_dpfl_compress_end_to_end(trained_checkpoint, tmp_path):
    """Through the real console command: report written, model loads and evaluates."""
    from dpfl.task.data import load_dataset
    from dpfl.task.evaluation import accuracy

    out = tmp_path / "compressed"
    command = [
        sys.executable, "-m", "dpfl.cli", "compress", "--checkpoint", str(trained_checkpoint),
        "--dataset", "digits", "--method", "tucker2", "--norm", "sigma", "--ratio", "0.5",
        "--finetune-epochs", "1", "--out", str(out), *QUICK,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "layer4.0.conv2" in result.stdout
    report = json.loads((out / "compression_report.json").read_text())
    assert report["parameters"]["ratio"] <= 0.5
    assert {layer["name"] for layer in report["layers"]} >= {"layer1.0.conv1", "layer4.0.conv2"}
    assert all(layer["sigma_rel_error"] >= 0 for layer in report["layers"])
    assert report["accuracy"]["before"] > 0.8
    checkpoint = load_checkpoint(out / "compressed_model.pt")
    assert checkpoint.compression["method"] == "tucker2"
    model = checkpoint.build_model()
    assert accuracy(model, load_dataset("digits").test) == pytest.approx(report["accuracy"]["after_finetune"])
    # The statistics this run saved compress the same model again, here by CPD.
    again = tmp_path / "again"
    argv = ["--checkpoint", str(trained_checkpoint), "--method", "cpd", "--ratio", "0.5", "--out", str(again), *QUICK]
    assert run_compress([*argv, "--covariance", str(out / "covariance.pt")]) == 0
    assert json.loads((again / "compression_report.json").read_text())["covariance"]["source"]["dataset"] == "digits"
    bad = subprocess.run([*command[:4], "--checkpoint", str(trained_checkpoint), "--ratio", "2", "--out", str(again)],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip() == "dpfl compress: error: ratio 2.0 is outside (0, 1): it is the fraction of parameters kept"
