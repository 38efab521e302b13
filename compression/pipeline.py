"""Compress a model in place: decompose each chosen layer, swap in the factorised
structure, and report ranks, costs and errors per layer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dpfl.compression.cost import count_macs, macs_under
from dpfl.compression.covariance import InputMoments, collect_statistics
from dpfl.compression.cpd import cpd_frobenius, cpd_sigma_als
from dpfl.compression.ranks import factorised_count, weight_count
from dpfl.compression.sigma_norm import ALSTrace, regularise
from dpfl.compression.surgery import load_factors, weight_shape
from dpfl.compression.svd import svd_frobenius, svd_sigma
from dpfl.compression.tucker2 import tucker2_frobenius, tucker2_sigma_als
from dpfl.progress import Progress, no_progress, tracked
from dpfl.task.evaluation import accuracy
from dpfl.task.factorised import compression_record, factorised_structure, layer_record, replace_module
from dpfl.task.models import count_parameters



@dataclass(frozen=True)
class CompressionConfig:
    """Knobs of the Σ-norm solvers."""

    # ALS sweeps, and the relative decrease below which a sweep ends them. Measured on
    # a digits ResNet: the first sweep removes ~90% of the Frobenius solution's Σ-error,
    # later sweeps under 1% each.
    max_iter: int = 30
    tol: float = 1e-3
    cg_max_iter: int = 20  # CG steps per input-factor update (warm-started across sweeps)
    ridge: float = 1e-6  # Σ + ridge·(tr Σ/D)·I, see sigma_norm.regularise
    # Σ-norm only: minimise over the bias as well, i.e. use the centred covariance and
    # set b̃ = b + (W − W̃)μ, which removes the mean output shift (docs/compression.md, "Method").
    # False: the uncentred second moment E[xxᵀ] and the original bias.
    center: bool = True
    seed: int = 0  # TensorLy's CPD initialisation


@dataclass
class Decomposition:
    factors: list[torch.Tensor]  # one weight per module of the replacement, in order
    approximation: torch.Tensor  # W̃ as a (T × D) matrix
    trace: ALSTrace | None  # None for the Frobenius norm and the closed-form SVD
    frobenius_seconds: float
    sigma_seconds: float


@dataclass
class LayerResult:
    name: str
    method: str
    shape: list[int]
    ranks: list[int]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    sigma_rel_error: float | None  # √(E‖Δy‖² / tr(W Σ Wᵀ)), Σ the input covariance
    frobenius_rel_error: float  # ‖W − W̃‖_F / ‖W‖_F
    sweeps: int
    stopped: str
    frobenius_seconds: float
    sigma_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def decompose(weight: torch.Tensor, method: str, ranks: tuple[int, ...], sigma: torch.Tensor | None, config: CompressionConfig) -> Decomposition:
    """Factor one layer's weight; ``sigma`` None means the Frobenius norm."""
    out_features = weight.shape[0]
    weight = weight.double()
    matrix = weight.reshape(out_features, -1)
    als = {"max_iter": config.max_iter, "tol": config.tol, "cg_max_iter": config.cg_max_iter}
    trace = None
    started = time.perf_counter()
    if method == "svd":
        low_rank = svd_frobenius(matrix, ranks[0]) if sigma is None else svd_sigma(matrix, sigma, ranks[0])
        seconds = time.perf_counter() - started
        timing = (seconds, 0.0) if sigma is None else (0.0, seconds)
        return Decomposition([low_rank.right, low_rank.left], low_rank.to_weight(), None, *timing)
    if method == "tucker2":
        result = tucker2_frobenius(weight, ranks)
        frobenius_seconds = time.perf_counter() - started
        if sigma is not None:
            result, trace = tucker2_sigma_als(weight, sigma, ranks, result, **als)
        factors = [result.input_factor.T, result.core, result.output_factor]
    else:
        result = cpd_frobenius(weight, ranks[0], seed=config.seed)
        frobenius_seconds = time.perf_counter() - started
        if sigma is not None:
            result, trace = cpd_sigma_als(weight, sigma, ranks[0], result, **als)
        factors = [result.input_factor.T, result.vertical_factor.T, result.horizontal_factor.T, result.output_factor]
    sigma_seconds = time.perf_counter() - started - frobenius_seconds
    return Decomposition(factors, result.to_weight().reshape(out_features, -1), trace, frobenius_seconds, sigma_seconds)


def output_error(
    weight: torch.Tensor, approximation: torch.Tensor, bias_shift: torch.Tensor, statistics: InputMoments
) -> float:
    """√(E‖Δy‖² / tr(WΣWᵀ)): the output change's mean square over the data, relative to
    the output variance. E‖Δy‖² = tr(EΣEᵀ) + ‖Eμ − Δb‖², E = W − W̃, Δb = b̃ − b."""
    diff = weight - approximation
    covariance, mean = statistics.covariance, statistics.mean
    shift = diff @ mean - bias_shift
    change = ((diff @ covariance) * diff).sum() + shift @ shift
    variance = ((weight @ covariance) * weight).sum()
    return float(torch.sqrt(change / variance)) if variance > 0 else float("nan")


def compress_model(
    model: nn.Module,
    method: str,
    norm: str,
    ranks: dict[str, tuple[int, ...]],
    statistics: dict[str, InputMoments] | None,
    input_shape: tuple[int, ...],
    config: CompressionConfig = CompressionConfig(),
    progress: Progress = no_progress,
) -> tuple[dict[str, Any], list[LayerResult]]:
    """Factorise the layers in ``ranks`` (name → ranks) in place.

    Returns the checkpoint's ``compression`` record and one result per layer.
    ``statistics`` (per layer) is required for the Σ-norm; with the Frobenius norm it
    is only used to report the output error.
    """
    if norm == "sigma" and statistics is None:
        raise ValueError("the Σ-norm needs input statistics")
    macs_before = count_macs(model, input_shape)
    records, results = {}, []
    for name, layer_ranks in tracked(list(ranks.items()), f"compressing layers ({method}, {norm} norm)", progress):
        module = model.get_submodule(name)
        weight = module.weight.detach().double()
        matrix = weight.reshape(weight.shape[0], -1)
        bias = module.bias.detach().double() if module.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
        stats = statistics[name] if statistics is not None else None
        sigma = None
        if norm == "sigma":
            sigma = regularise(stats.covariance if config.center else stats.second_moment, config.ridge)
        result = decompose(weight, method, layer_ranks, sigma, config)
        corrects_bias = norm == "sigma" and config.center
        new_bias = bias + (matrix - result.approximation) @ stats.mean if corrects_bias else bias
        has_bias = module.bias is not None or corrects_bias
        structure = factorised_structure(module, method, layer_ranks, has_bias)
        load_factors(structure, result.factors, new_bias if has_bias else None)
        replace_module(model, name, structure)
        records[name] = layer_record(method, layer_ranks, has_bias)
        shape = weight_shape(module)
        results.append(
            LayerResult(
                name=name,
                method=method,
                shape=list(shape),
                ranks=list(layer_ranks),
                params_before=weight_count(shape) + (module.bias is not None) * shape[0],
                params_after=factorised_count(method, shape, layer_ranks) + has_bias * shape[0],
                macs_before=macs_under(macs_before, name),
                macs_after=0,
                sigma_rel_error=output_error(matrix, result.approximation, new_bias - bias, stats) if stats else None,
                frobenius_rel_error=float((matrix - result.approximation).norm() / matrix.norm()),
                sweeps=result.trace.sweeps if result.trace else 0,
                stopped=result.trace.stopped if result.trace else "closed form",
                frobenius_seconds=result.frobenius_seconds,
                sigma_seconds=result.sigma_seconds,
            )
        )
    macs_after = count_macs(model, input_shape)
    for layer in results:
        layer.macs_after = macs_under(macs_after, layer.name)
    return compression_record(model, method, norm, records), results


@dataclass
class CompressionRun:
    """One compression of a model on a data set: what ``dpfl compress`` reports and a
    federated node's deployment writes."""

    record: dict[str, Any]  # the checkpoint's ``compression`` record
    layers: list[LayerResult]
    statistics: dict[str, InputMoments]
    covariance_seconds: float
    compression_seconds: float
    parameters_before: int
    parameters_after: int
    accuracy_before: float
    accuracy_after: float

    def report(self) -> dict[str, Any]:
        """The part of ``compression_report.json`` every compression shares."""
        return {
            "method": self.record["method"],
            "norm": self.record["norm"],
            "parameters": {"before": self.parameters_before, "after": self.parameters_after,
                           "ratio": self.parameters_after / self.parameters_before},  # fmt: skip
            "accuracy": {"before": self.accuracy_before, "after": self.accuracy_after},
            "covariance_seconds": self.covariance_seconds,
            "compression_seconds": self.compression_seconds,
            "layers": [layer.as_dict() for layer in self.layers],
        }


def compress_on_data(
    model: nn.Module,
    train_data: Dataset,
    test_data: Dataset,
    input_shape: tuple[int, ...],
    method: str,
    norm: str,
    ranks: dict[str, tuple[int, ...]],
    statistics: dict[str, InputMoments] | None = None,
    batches: int = 20,
    batch_size: int = 64,
    config: CompressionConfig = CompressionConfig(),
    eval_batch_size: int = 256,
    progress: Progress = no_progress,
) -> CompressionRun:
    """Collect the input statistics of the layers in ``ranks`` on ``train_data`` (unless
    given), compress ``model`` in place and measure accuracy on ``test_data`` before and after."""
    covariance_seconds = 0.0
    if statistics is None:
        loader = DataLoader(train_data, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(config.seed))  # fmt: skip
        started = time.perf_counter()
        progress("input statistics of the layers (covariance pass)", 0, 1)
        statistics = collect_statistics(model, loader, list(ranks), batches)
        progress("input statistics of the layers (covariance pass)", 1, 1)
        covariance_seconds = time.perf_counter() - started
    parameters_before = count_parameters(model)
    accuracy_before = accuracy(model, test_data, eval_batch_size, progress, "accuracy before compression")
    started = time.perf_counter()
    record, layers = compress_model(model, method, norm, ranks, statistics, input_shape, config, progress)
    compression_seconds = time.perf_counter() - started
    accuracy_after = accuracy(model, test_data, eval_batch_size, progress, "accuracy after compression")
    return CompressionRun(
        record, layers, statistics, covariance_seconds, compression_seconds,
        parameters_before, count_parameters(model), accuracy_before, accuracy_after,
    )  # fmt: skip
