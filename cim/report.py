"""The deployment study behind ``dpfl deploy``: distortion per layer for every mapping,
accuracy of the digital and analog models, NF against tile size, and plots.

A device with stochastic non-idealities is one draw of a population: the study
repeats programming (and read noise) over ``trials`` seeds and reports the mean of
accuracy, NF and output error with a 95% Student-t interval over trials.

NF is pooled at every level: the mean over all (read cycle, mapped column) pairs with
non-zero ideal current of a tile, a layer, or the whole model. Output error is the
relative L2 error of a layer's shift-added integer output against the exact integer
product; the model's is the mean over layers. Both are always reported together:
driving from the LSB side lowers NF but moves the MSB columns away from the drivers,
which can raise the weighted output error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import stdev

import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dpfl.cim.device import CrossbarDevice
from dpfl.cim.engine import CellLoss, Distortion, simulate_matmul
from dpfl.cim.mapping import MAPPINGS, map_matrix, quantise_weights
from dpfl.cim.model import DeviceGenerators, InputStatistics, mappable_layers, to_crossbars, weight_matrix
from dpfl.errors import UsageError

SWEEP_TILE_SIZES = (64, 128, 256, 512)


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
    layer: nn.Module, statistics: InputStatistics, device: CrossbarDevice, mapping: str,
    generators: DeviceGenerators, cell_loss: dict[int, CellLoss] | None = None,
) -> tuple[int, Distortion, tuple[float, float]]:
    q, _ = quantise_weights(weight_matrix(layer), device.weight_bits)
    tiles = map_matrix(q, device, mapping, statistics.row_density, generators.programming)
    analog, distortion = simulate_matmul(
        tiles, statistics.sample, q.shape[0], device, cell_loss=cell_loss, generator=generators.read
    )
    exact = statistics.sample.double() @ q.T.double()
    return len(tiles), distortion, relative_errors(analog, exact)


def model_distortion(
    model: nn.Module, statistics: dict[str, InputStatistics], device: CrossbarDevice, mapping: str,
    seed: int = 0,
) -> ModelDistortion:
    """NF, output error and gain-free output error (:func:`relative_errors`) of every
    layer on its sampled calibration inputs, on the device instance of ``seed`` (the
    same tiles ``to_crossbars`` programs with it); the model's errors are layer means."""
    generators = DeviceGenerators.from_seed(seed)
    pooled = Distortion()
    layers = []
    for name, layer in mappable_layers(model).items():
        tiles, distortion, (error, gain_free) = _layer_distortion(layer, statistics[name], device, mapping, generators)
        pooled.add(distortion)
        layers.append(LayerDistortion(name, tiles, distortion.nf, error, gain_free))
    mean_error = sum(layer.output_error for layer in layers) / len(layers)
    mean_gain_free = sum(layer.gain_free_error for layer in layers) / len(layers)
    return ModelDistortion(mapping, device.tile_size, pooled.nf, mean_error, mean_gain_free, layers)


def tile_current_loss(
    model: nn.Module, statistics: dict[str, InputStatistics], device: CrossbarDevice, layer_name: str,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Mean current lost per cell and read cycle in the first tile of ``layer_name``,
    for each mapping (the same weights and inputs, placed differently)."""
    layer = mappable_layers(model)[layer_name]
    losses = {}
    for mapping in MAPPINGS:
        loss = {0: CellLoss(torch.zeros(device.tile_size, device.tile_size, dtype=torch.float64))}
        _layer_distortion(layer, statistics[layer_name], device, mapping, DeviceGenerators.from_seed(seed), loss)
        losses[mapping] = loss[0].mean
    return losses


def accuracy(model: nn.Module, data: Dataset, batch_size: int = 128) -> float:
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for images, labels in DataLoader(data, batch_size=batch_size):
            correct += int((model(images).argmax(1) == labels).sum())
            total += labels.numel()
    return correct / total


@dataclass
class DeployReport:
    device: dict
    mapping: str
    mode: str
    accuracy: dict[str, float]  # analog entries: mean over trials
    distortion: dict[str, ModelDistortion]  # at the deployed tile size, by mapping (first trial)
    trials: dict[str, dict[str, Interval]]  # by mapping: accuracy, nf, output_error, gain_free_error over trials
    sweep: list[ModelDistortion]  # every swept tile size (SWEEP_TILE_SIZES by default) and mapping (first trial)
    heatmap_layer: str
    context: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def run_study(
    model: nn.Module, statistics: dict[str, InputStatistics], test_data: Dataset,
    device: CrossbarDevice, mapping: str, mode: str, seed: int, trials: int = 1,
    progress=lambda message: None, sweep_tile_sizes: tuple[int, ...] = SWEEP_TILE_SIZES,
) -> tuple[DeployReport, dict[str, torch.Tensor]]:
    """Everything ``dpfl deploy`` reports; also the per-cell loss maps for the heat map.
    ``sweep_tile_sizes``: the tile sizes of the NF sweep (each one costs a distortion pass).

    Trial ``t`` is the device instance of seed ``seed + t``: its tiles are programmed
    anew (programming noise, stuck cells, drift) and its read noise redrawn.
    """
    if not isinstance(trials, int) or trials < 1:
        raise UsageError(f"trials must be a positive integer, got {trials!r}")
    distortion, per_trial = {}, {}
    scores = {"digital": accuracy(model, test_data)}
    scores["quantised"] = accuracy(to_crossbars(model, statistics, device, mapping, "ideal", seed), test_data)
    for name in MAPPINGS:
        runs = []
        for trial in range(trials):
            progress(f"{name} mapping, trial {trial + 1}/{trials}: distortion per layer, tile {device.tile_size}")
            measured = model_distortion(model, statistics, device, name, seed + trial)
            progress(f"{name} mapping, trial {trial + 1}/{trials}: accuracy, analog ({mode})")
            analog = to_crossbars(model, statistics, device, name, mode, seed + trial)
            runs.append((measured, accuracy(analog, test_data)))
        distortion[name] = runs[0][0]
        per_trial[name] = {
            "accuracy": Interval.of([score for _, score in runs]),
            "nf": Interval.of([measured.nf for measured, _ in runs]),
            "output_error": Interval.of([measured.output_error for measured, _ in runs]),
            "gain_free_error": Interval.of([measured.gain_free_error for measured, _ in runs]),
        }
        scores[f"analog_{name}"] = per_trial[name]["accuracy"].mean
    sweep = []
    for size in sweep_tile_sizes:
        sized = dataclasses.replace(device, tile_size=size)
        for name in MAPPINGS:
            progress(f"NF sweep, tile {size}, {name} mapping")
            sweep.append(distortion[name] if size == device.tile_size else model_distortion(model, statistics, sized, name, seed))
    worst = max(distortion["naive"].layers, key=lambda layer: layer.nf)
    losses = tile_current_loss(model, statistics, device, worst.name, seed)
    report = DeployReport(device.as_dict(), mapping, mode, scores, distortion, per_trial, sweep, worst.name)
    return report, losses


def save_report(report: DeployReport, losses: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """Write report.json, nf_vs_tile.png and cell_loss.png into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "nf_vs_tile.png", out / "cell_loss.png"]
    paths[0].write_text(json.dumps(report.to_json(), indent=2))

    fig, (ax_nf, ax_err) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name in MAPPINGS:
        points = [entry for entry in report.sweep if entry.mapping == name]
        sizes = [entry.tile_size for entry in points]
        ax_nf.plot(sizes, [entry.nf for entry in points], marker="o", label=name)
        ax_err.plot(sizes, [entry.output_error for entry in points], marker="o", label=name)
    for ax, label in ((ax_nf, "non-ideality factor (NF)"), (ax_err, "relative output error")):
        ax.set_xscale("log", base=2)
        swept = sorted({entry.tile_size for entry in report.sweep})
        ax.set_xticks(swept, [str(size) for size in swept])
        ax.set_xlabel("tile size (rows = columns)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Parasitic distortion against tile size")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(MAPPINGS), figsize=(4.5 * len(MAPPINGS), 4.2))
    top = max(float(loss.max()) for loss in losses.values()) * 1e9 or 1.0
    for ax, name in zip(axes, MAPPINGS):
        image = ax.imshow(losses[name].numpy() * 1e9, cmap="magma", vmin=0, vmax=top)
        ax.set_title(f"{name}")
        ax.set_xlabel("column (drivers at 0)")
        ax.set_ylabel("row (sense amplifiers below)")
    fig.colorbar(image, ax=axes, label="mean current lost per read cycle (nA)")
    fig.suptitle(f"Per-cell current loss, first tile of {report.heatmap_layer}")
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths


__all__ = [
    "SWEEP_TILE_SIZES", "DeployReport", "Interval", "ModelDistortion", "accuracy", "model_distortion", "relative_errors",
    "run_study", "save_report",
]
