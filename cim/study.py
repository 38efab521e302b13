"""The deployment study behind ``dpfl deploy``: distortion per layer for every mapping
(:mod:`dpfl.cim.metrics`), accuracy of the digital and analog models, NF against tile
size, and the report's files (plots: :mod:`dpfl.cim.plots`). :func:`cim_study`, shared
by ``dpfl deploy`` and a node's deployment, first calibrates every mappable layer on
a few images, then runs :func:`run_study`.

A device with stochastic non-idealities is one draw of a population: the study
repeats programming (and read noise) over ``trials`` seeds and reports the mean of
accuracy, NF and output error with a 95% Student-t interval over trials.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits
from torch import nn
from torch.utils.data import Dataset, Subset

from dpfl.cim.device import CrossbarDevice
from dpfl.cim.metrics import Interval, ModelDistortion, model_distortion, tile_current_loss
from dpfl.cim.model import (
    LayerCalibration, calibrate, mappable_layers, resolve_mode, set_bias_correction, to_crossbars,
)
from dpfl.cim.names import MAPPINGS
from dpfl.cim.plots import plot_cell_loss, plot_distortion_sweep
from dpfl.errors import UsageError
from dpfl.progress import Progress, no_progress
from dpfl.task.attention import ExplicitAttention, explicit_attention
from dpfl.task.checkpoint import checkpoint_dataset, load_checkpoint
from dpfl.task.evaluation import accuracy

SWEEP_TILE_SIZES = (64, 128, 256, 512)
# The analog models draw read noise per forward pass, so the batch size fixes which
# draws each test image gets; this one keeps the study's numbers as they were.
EVAL_BATCH_SIZE = 128


@dataclass
class PrecisionResult:
    """The study at one weight precision: accuracy with and without weight bias
    correction (:func:`dpfl.cim.model.set_bias_correction`), and distortion, by mapping."""

    weight_bits: int
    cells_per_weight: int
    # quantised, quantised_corrected, analog_<mapping>, analog_<mapping>_corrected (analog: mean over trials)
    accuracy: dict[str, float]
    # by mapping: accuracy, accuracy_corrected, nf, output_error, gain_free_error over trials
    trials: dict[str, dict[str, Interval]]
    distortion: dict[str, ModelDistortion]  # by mapping (first trial)


@dataclass
class DeployReport:
    device: dict
    mapping: str
    mode: str
    accuracy: dict[str, float]  # digital, and the device's own precision's PrecisionResult.accuracy
    distortion: dict[str, ModelDistortion]  # at the deployed tile size and precision, by mapping (first trial)
    trials: dict[str, dict[str, Interval]]  # the device's own precision's PrecisionResult.trials
    sweep: list[ModelDistortion]  # every swept tile size (with the device's own) and mapping (first trial)
    heatmap_layer: str
    precisions: list[PrecisionResult] = field(default_factory=list)  # every precision studied, the device's own included
    context: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def precision_devices(device: CrossbarDevice, weight_bits: tuple[int, ...] = ()) -> list[CrossbarDevice]:
    """The device at its own precision and at each of ``weight_bits`` (ascending, no
    repeats); a precision the device cannot hold (the tile does not fit the slices, the
    ADC cannot tell the column sums apart) is a one-line UsageError naming what it holds."""
    devices = []
    for bits in sorted({*weight_bits, device.weight_bits}):
        if not isinstance(bits, int) or isinstance(bits, bool) or bits < 1:
            raise UsageError(f"weight bits must be positive integers, got {bits!r}")
        at_bits = dataclasses.replace(device, weight_bits=bits)
        at_bits.check_precision()
        devices.append(at_bits)
    return devices


def _precision_study(
    model: nn.Module, statistics: dict[str, LayerCalibration], test_data: Dataset, device: CrossbarDevice,
    mode: str, seed: int, trials: int, progress: Progress, mappings: tuple[str, ...],
) -> PrecisionResult:
    """Accuracy (without and with weight bias correction), NF and output errors of each
    of ``mappings`` on ``trials`` device instances; the distortion is read through each
    analog model's own tiles (:func:`dpfl.cim.metrics.model_distortion`)."""
    bits = f"w{device.weight_bits}"
    quantised = to_crossbars(model, statistics, device, mappings[0], "ideal", seed)
    scores = {"quantised": accuracy(quantised, test_data, EVAL_BATCH_SIZE, progress, f"accuracy, {bits} on ideal crossbars")}
    scores["quantised_corrected"] = accuracy(set_bias_correction(quantised, True), test_data, EVAL_BATCH_SIZE, progress,
                                             f"accuracy, {bits} on ideal crossbars, bias corrected")  # fmt: skip
    distortion, per_trial = {}, {}
    instances_stage, instances = f"{bits}: mappings and device instances, tile {device.tile_size}", len(mappings) * trials
    for index, name in enumerate(mappings):
        runs = []
        for trial in range(trials):
            progress(instances_stage, index * trials + trial, instances)
            analog = to_crossbars(model, statistics, device, name, mode, seed + trial)
            measured = model_distortion(model, statistics, device, name, seed + trial, analog)
            stage = f"accuracy, {bits} analog ({mode}), {name} mapping, device instance {trial + 1}/{trials}"
            plain = accuracy(analog, test_data, EVAL_BATCH_SIZE, progress, stage)
            corrected = accuracy(set_bias_correction(analog, True), test_data, EVAL_BATCH_SIZE, progress,
                                 f"{stage}, bias corrected")  # fmt: skip
            runs.append((measured, plain, corrected))
        distortion[name] = runs[0][0]
        per_trial[name] = {
            "accuracy": Interval.of([plain for _, plain, _ in runs]),
            "accuracy_corrected": Interval.of([corrected for _, _, corrected in runs]),
            "nf": Interval.of([measured.nf for measured, _, _ in runs]),
            "output_error": Interval.of([measured.output_error for measured, _, _ in runs]),
            "gain_free_error": Interval.of([measured.gain_free_error for measured, _, _ in runs]),
        }
        scores[f"analog_{name}"] = per_trial[name]["accuracy"].mean
        scores[f"analog_{name}_corrected"] = per_trial[name]["accuracy_corrected"].mean
    progress(instances_stage, instances, instances)
    return PrecisionResult(device.weight_bits, device.cells_per_weight, scores, per_trial, distortion)


def run_study(
    model: nn.Module, statistics: dict[str, LayerCalibration], test_data: Dataset,
    device: CrossbarDevice, mapping: str, mode: str, seed: int, trials: int = 1,
    progress: Progress = no_progress, sweep_tile_sizes: tuple[int, ...] = SWEEP_TILE_SIZES,
    weight_bits: tuple[int, ...] = (), mappings: tuple[str, ...] = MAPPINGS,
) -> tuple[DeployReport, dict[str, torch.Tensor]]:
    """Everything ``dpfl deploy`` reports; also the per-cell loss maps for the heat map.
    ``mappings``: those to study (each costs an analog model per trial and precision),
    naive, the baseline whose most distorted layer the heat map shows, among them.
    ``sweep_tile_sizes``: the tile sizes of the NF sweep beside the device's own (each
    costs a distortion pass per mapping). ``weight_bits``: precisions to study beside
    the device's own (:func:`precision_devices`); the per-layer distortion, the sweep
    and the heat map are at the device's own.

    Trial ``t`` is the device instance of seed ``seed + t``: its tiles are programmed
    anew (programming noise, stuck cells, drift) and its read noise redrawn. ``mode``
    may be "auto" (:func:`dpfl.cim.model.resolve_mode`); the report holds the mode run.
    """
    if not isinstance(trials, int) or trials < 1:
        raise UsageError(f"trials must be a positive integer, got {trials!r}")
    if "naive" not in mappings or not set(mappings) <= set(MAPPINGS):
        raise ValueError(f"the mappings studied must be among {MAPPINGS} and include naive, got {mappings}")
    devices = precision_devices(device, weight_bits)
    mode = resolve_mode(mode, device)
    digital = accuracy(model, test_data, EVAL_BATCH_SIZE, progress, "accuracy, digital model")
    precisions = [_precision_study(model, statistics, test_data, at_bits, mode, seed, trials, progress, mappings)
                  for at_bits in devices]  # fmt: skip
    own = next(result for result in precisions if result.weight_bits == device.weight_bits)
    sweep, sweep_stage = [], "NF sweep over tile sizes and mappings"
    sizes = sorted({*sweep_tile_sizes, device.tile_size})
    for size in sizes:
        sized = dataclasses.replace(device, tile_size=size)
        for name in mappings:
            progress(sweep_stage, len(sweep), len(sizes) * len(mappings))
            sweep.append(own.distortion[name] if size == device.tile_size else model_distortion(model, statistics, sized, name, seed))
    progress(sweep_stage, len(sweep), len(sweep))
    worst = max(own.distortion["naive"].layers, key=lambda layer: layer.nf)
    progress(f"per-cell current loss of {worst.name} (heat map)", 0, 1)
    losses = tile_current_loss(model, statistics, device, worst.name, seed, mappings)
    progress(f"per-cell current loss of {worst.name} (heat map)", 1, 1)
    report = DeployReport(device.as_dict(), mapping, mode, {"digital": digital, **own.accuracy}, own.distortion,
                          own.trials, sweep, worst.name, precisions)  # fmt: skip
    return report, losses


def save_report(report: DeployReport, losses: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """Write report.json, nf_vs_tile.png and cell_loss.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "nf_vs_tile.png", out / "cell_loss.png"]
    paths[0].write_text(json.dumps(report.to_json(), indent=2))
    plot_distortion_sweep(report.sweep, paths[1])
    plot_cell_loss(losses, report.heatmap_layer, paths[2])
    return paths


__all__ = ["EVAL_BATCH_SIZE", "SWEEP_TILE_SIZES", "DeployReport", "PrecisionResult", "precision_devices", "run_study",
           "save_report"]


@contextmanager
def single_threaded():
    """Run torch and BLAS on one thread inside, restoring both after. The simulation is
    many small operations (per tile, per block of rows), which threads barely speed up
    on free cores, while on shared cores their spinning workers slow it down: measured
    with the other core busy, the 128x128 fixed point took 11-24 ms per input on two
    torch threads against 2 ms on one, and the direct transfer elimination 0.35-3.1 s
    on two OpenBLAS threads against 0.17 s on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


# Training images whose activations set each layer's input scale and bit density.
CALIBRATION_IMAGES = 64
# Input vectors per layer on which NF and output error are measured by circuit solves.
REPORT_VECTORS = 16


def cim_study(
    model: nn.Module, calibration_data: Dataset, test_data: Dataset, device: CrossbarDevice,
    mapping: str, mode: str, seed: int, trials: int = 1, progress: Progress = no_progress,
    sweep_tile_sizes: tuple[int, ...] = SWEEP_TILE_SIZES, weight_bits: tuple[int, ...] = (),
    mappings: tuple[str, ...] = MAPPINGS,
) -> tuple[DeployReport, dict[str, torch.Tensor]]:
    """Everything ``dpfl deploy`` reports for ``model`` on ``device`` (and at each of
    ``weight_bits``, :func:`run_study`), and the per-cell loss maps of its heat map;
    ``calibration_data`` must not overlap ``test_data``.

    Attention is first given explicit projection layers (in place), so every static
    weight matrix goes onto crossbars; the attention products stay digital. Runs on
    one thread (:func:`single_threaded`).
    """
    precision_devices(device, weight_bits)  # a precision the device cannot hold fails before any work
    with single_threaded():
        explicit_attention(model)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        count = min(CALIBRATION_IMAGES, len(calibration_data))
        calibration = torch.stack([calibration_data[i][0] for i in range(count)])
        progress("calibrating the mappable layers", 0, 1)
        statistics = calibrate(model.eval(), calibration, device, REPORT_VECTORS, generator)
        progress("calibrating the mappable layers", 1, 1)
        report, losses = run_study(model, statistics, test_data, device, mapping, mode, seed, trials, progress,
                                   sweep_tile_sizes, weight_bits, mappings)  # fmt: skip
        report.context = {"test_images": len(test_data), "calibration_images": count,
                          "report_vectors_per_layer": REPORT_VECTORS, "operations": operations(model)}  # fmt: skip
        return report, losses


def operations(model: nn.Module) -> list[dict[str, str]]:
    """Every operation that holds weights or multiplies activations, and where it runs:
    Conv2d/Linear weights on crossbars (analog); attention's score and value products
    (activations times activations), normalisation and embeddings in the digital periphery."""
    analog = mappable_layers(model)
    rows = []
    for name, module in model.named_modules():
        if name in analog:
            rows.append({"operation": name, "kind": type(module).__name__, "where": "analog"})
        elif isinstance(module, ExplicitAttention):
            rows.append({"operation": f"{name}.scores", "kind": "Q·Kᵀ (attention scores)", "where": "digital"})
            rows.append({"operation": f"{name}.values", "kind": "softmax·V (attention values)", "where": "digital"})
        elif list(module.parameters(recurse=False)):
            rows.append({"operation": name or "<model>", "kind": type(module).__name__, "where": "digital"})
    return rows


def deploy_checkpoint(
    checkpoint_path: str | Path, out: str | Path, device: CrossbarDevice, mapping: str, mode: str, seed: int,
    trials: int = 1, samples: int | None = None, dataset: str | None = None, data_dir: str | None = None,
    compressed: bool = False, progress: Progress = no_progress, weight_bits: tuple[int, ...] = (),
) -> tuple[DeployReport, list[Path]]:
    """The study of ``dpfl deploy``: the model of ``checkpoint_path`` on ``device`` (and at
    each of ``weight_bits``), tested on the first ``samples`` test images of ``dataset``
    (default: the checkpoint's), its report written into ``out``; returns the report and
    the files written."""
    if samples is not None and samples < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    if trials < 1:
        raise UsageError(f"--trials must be >= 1, got {trials}")
    precision_devices(device, weight_bits)
    checkpoint = load_checkpoint(checkpoint_path)
    if compressed and not checkpoint.compression:
        raise UsageError(f"--compressed: checkpoint {str(checkpoint_path)!r} holds no compression record (not a dpfl compress output)")
    data = checkpoint_dataset(checkpoint, dataset, data_dir)
    model = checkpoint.build_model().eval()
    test = data.test if samples is None else Subset(data.test, range(min(samples, len(data.test))))
    report, losses = cim_study(model, data.train, test, device, mapping, mode, seed, trials, progress,
                               weight_bits=weight_bits)  # fmt: skip
    report.context.update(checkpoint=str(checkpoint_path), model=checkpoint.spec.name, dataset=data.name,
                          compressed=bool(checkpoint.compression))  # fmt: skip
    return report, save_report(report, losses, Path(out))
