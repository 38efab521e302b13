"""Distortion of a model mapped onto crossbars, and intervals over device instances.

NF is pooled at every level: the mean over all (read cycle, mapped column) pairs with
non-zero ideal current of a tile, a layer, or the whole model. Output error is the
relative L2 error of a layer's shift-added integer output against the exact integer
product; the model's is the mean over layers. Both are always reported together:
driving from the LSB side lowers NF but moves the MSB columns away from the drivers,
which can raise the weighted output error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import stdev

import torch
from scipy import stats
from torch import nn

from dpfl.cim.device import CrossbarDevice
from dpfl.cim.engine import Distortion, cell_current_loss, simulate_matmul
from dpfl.cim.mapping import map_matrix, quantise_weights
from dpfl.cim.model import CrossbarLayer, DeviceGenerators, LayerCalibration, crossbar_layers, mappable_layers, weight_matrix
from dpfl.cim.names import MAPPINGS


@dataclass
class LayerDistortion:
    name: str
    tiles: int
    nf: float
    output_error: float
    gain_free_error: float


@dataclass
class ModelDistortion:
    mapping: str
    tile_size: int
    nf: float
    output_error: float
    gain_free_error: float
    layers: list[LayerDistortion] = field(default_factory=list)


@dataclass
class Interval:
    """Mean over trials and the half-width of its 95% Student-t interval (None: one trial)."""

    mean: float
    half_width: float | None
    values: list[float]

    @classmethod
    def of(cls, values: list[float]) -> "Interval":
        mean = sum(values) / len(values)
        if len(values) < 2:
            return cls(mean, None, list(values))
        spread = stdev(values) / math.sqrt(len(values))
        return cls(mean, float(stats.t.ppf(0.975, len(values) - 1) * spread), list(values))

    def __str__(self) -> str:
        return f"{self.mean:.4f}" if self.half_width is None else f"{self.mean:.4f} ± {self.half_width:.4f}"


def relative_errors(analog: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """Relative L2 error of ``analog`` outputs against ``exact`` ones, as measured and
    after the best common gain g = <analog, exact> / <analog, analog>: the part of the
    distortion a normalisation layer (GroupNorm after every convolution) cannot divide out."""
    if not exact.any():
        return 0.0, 0.0
    norm = exact.norm()
    power = float((analog * analog).sum())
    gain = float((analog * exact).sum()) / power if power > 0 else 0.0
    return float((analog - exact).norm() / norm), float((gain * analog - exact).norm() / norm)


def _layer_distortion(
    layer: nn.Module, statistics: LayerCalibration, device: CrossbarDevice, mapping: str,
    generators: DeviceGenerators, crossbar: CrossbarLayer | None = None,
) -> tuple[int, Distortion, tuple[float, float]]:
    if crossbar is not None and crossbar.transfers is not None:
        q, tiles, transfers = crossbar.q, crossbar.tiles, crossbar.transfers
    else:
        q, _ = quantise_weights(weight_matrix(layer), device.weight_bits)
        tiles = map_matrix(q, device, mapping, statistics.row_density, generators.programming)
        transfers = None
    analog, distortion = simulate_matmul(
        tiles, statistics.sample, q.shape[0], device, generator=generators.read, transfers=transfers
    )
    exact = statistics.sample.double() @ q.T.double()
    return len(tiles), distortion, relative_errors(analog, exact)


def model_distortion(
    model: nn.Module, statistics: dict[str, LayerCalibration], device: CrossbarDevice, mapping: str,
    seed: int = 0, analog: nn.Module | None = None,
) -> ModelDistortion:
    """NF, output error and gain-free output error (:func:`relative_errors`) of every
    layer on its sampled calibration inputs, on the device instance of ``seed`` (the
    same tiles ``to_crossbars`` programs with it); the model's errors are layer means.

    ``analog``, the ``to_crossbars`` model of this device, mapping and seed, lends its
    tiles and, in exact mode, their transfer matrices: the reads are then products
    with matrices already built (equal to solving each read, to the solver's float32
    rounding) instead of programming and solving the layers again."""
    generators = DeviceGenerators.from_seed(seed)
    crossbars = {} if analog is None else crossbar_layers(analog)
    pooled = Distortion()
    layers = []
    for name, layer in mappable_layers(model).items():
        tiles, distortion, (error, gain_free) = _layer_distortion(
            layer, statistics[name], device, mapping, generators, crossbars.get(name)
        )
        pooled.add(distortion)
        layers.append(LayerDistortion(name, tiles, distortion.nf, error, gain_free))
    mean_error = sum(layer.output_error for layer in layers) / len(layers)
    mean_gain_free = sum(layer.gain_free_error for layer in layers) / len(layers)
    return ModelDistortion(mapping, device.tile_size, pooled.nf, mean_error, mean_gain_free, layers)


def tile_current_loss(
    model: nn.Module, statistics: dict[str, LayerCalibration], device: CrossbarDevice, layer_name: str,
    seed: int = 0, mappings: tuple[str, ...] = MAPPINGS,
) -> dict[str, torch.Tensor]:
    """Mean current lost per cell and read cycle in the first tile of ``layer_name``,
    for each of ``mappings`` (the same weights and inputs, placed differently)."""
    layer = mappable_layers(model)[layer_name]
    q, _ = quantise_weights(weight_matrix(layer), device.weight_bits)
    layer_statistics = statistics[layer_name]
    losses = {}
    for mapping in mappings:
        generators = DeviceGenerators.from_seed(seed)
        tile = map_matrix(q, device, mapping, layer_statistics.row_density, generators.programming)[0]
        losses[mapping] = cell_current_loss(tile, layer_statistics.sample, device, generators.read).mean
    return losses


__all__ = [
    "Interval", "LayerDistortion", "ModelDistortion", "model_distortion", "relative_errors", "tile_current_loss",
]
