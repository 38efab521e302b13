"""Benchmark of the simulated CIM device (not a test): python benchmarks/cim.py

Sections (``--sections``, default all):

* ``solver``: per input vector, fast fixed point vs exact sparse nodal solve, on random
  30%-dense tiles of 128x128 and 256x256 (goal: fast <= 5 ms at 256x256, float32).
* ``mapping``: a GroupNorm ResNet-10 trained here on digits; every tile size and
  mapping (naive, MDM, sw-MDM): model NF, output error and accuracy with 95%
  intervals over ``--trials`` device instances, on the ideal-cell device and on a
  PCM-like noisy one (``NOISY``). Writes accuracy against tile size per mapping.
* ``drift``: accuracy against time since programming, with and without global drift
  compensation. Writes accuracy against drift time.
* ``solver`` also times the transfer matrix of one full tile (the column currents per
  driven row, all the exact mode needs) by one fixed-point solve per row against the
  direct block elimination, with default and with RRAM cells.
* ``speed``: exact mode (transfer matrices) on all test images at 128x128, every
  mapping (goal: naive and MDM <= 60 s on 2 cores), against building the transfer
  matrices by fixed-point solves only (the previous exact mode) and against solving
  every distinct read (the one before), extrapolated from a few images; and with an
  8-bit ADC (every bit-plane read through the transfer matrices).
* ``fidelity``: fast mode against exact mode on the ResNet-10: share of the exact
  mode's logit distortion the fast mode reproduces, and top-1 agreement.

Every ratio is against a baseline measured in the same run. Run it niced on a shared
machine: ``OMP_NUM_THREADS=1 nice -n 10 python benchmarks/cim.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.utils.data import Subset

from dpfl.cim.circuit import NodalSolver, solve_fixed_point
from dpfl.cim.device import CrossbarDevice
from dpfl.cim.engine import simulate_matmul, transfer_matrix
from dpfl.cim.mapping import map_matrix, quantise_weights
from dpfl.cim.names import MAPPINGS
from dpfl.cim.model import DeviceGenerators, calibrate, mappable_layers, to_crossbars, weight_matrix
from dpfl.cim.metrics import Interval, model_distortion
from dpfl.cim.plots import pyplot
from dpfl.cim.study import EVAL_BATCH_SIZE, SWEEP_TILE_SIZES
from dpfl.task.checkpoint import ModelSpec
from dpfl.task.data import load_dataset
from dpfl.task.evaluation import accuracy

# A PCM-like device (sources in docs/cim.md): programming noise 4% of the target
# (aihwkit's PCM fit at G_max), nu = 0.05 ± 0.01 one day after programming with
# global compensation, 0.5% stuck cells each way. No read noise: in exact mode it
# makes every read of every image a circuit solve, out of reach for 360 images.
NOISY = dict(
    programming_noise=0.04, drift_nu=0.05, drift_nu_std=0.01, drift_time=86400.0,
    drift_compensation=True, stuck_on_rate=0.005, stuck_off_rate=0.005,
)
DRIFT_TIMES = (60.0, 3600.0, 86400.0, 30 * 86400.0, 365 * 86400.0)


def train(spec: ModelSpec, data, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = spec.build()
    images, labels = data.train.tensors
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(images), 64):
            batch = order[start : start + 64]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimiser.step()
    return model.eval()


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def solver_speed(batch: int, repeats: int) -> None:
    device = CrossbarDevice()
    rng = np.random.default_rng(0)
    print(f"{'tile':>5} {'fast f32 ms/vec':>16} {'fast f64 ms/vec':>16} {'exact ms/vec':>13} "
          f"{'exact factor s':>15} {'exact/fast':>11} {'max rel diff':>13}")
    for size in (128, 256):
        conductance = np.where(rng.random((size, size)) < 0.3, device.g_on, device.g_off)
        voltages = np.where(rng.random((batch, size)) < 0.5, device.read_voltage, 0.0)
        g32, v32 = torch.tensor(conductance, dtype=torch.float32), torch.tensor(voltages, dtype=torch.float32)
        g64, v64 = torch.tensor(conductance), torch.tensor(voltages)
        solve = lambda g, v: solve_fixed_point(g, v, device.r_wordline, device.r_bitline)  # noqa: E731
        fast32 = best_of(repeats, lambda: solve(g32, v32)) / batch
        fast64 = best_of(repeats, lambda: solve(g64, v64)) / batch
        started = time.perf_counter()
        nodal = NodalSolver(conductance, device.r_wordline, device.r_bitline)
        factor = time.perf_counter() - started
        exact = best_of(repeats, lambda: nodal.cell_currents(voltages)) / batch
        reference = nodal.cell_currents(voltages).sum(1)
        difference = np.abs(solve(g32, v32).sum(1).double().numpy() - reference).max() / np.abs(reference).max()
        print(f"{size:>5} {fast32 * 1e3:>16.2f} {fast64 * 1e3:>16.2f} {exact * 1e3:>13.2f} {factor:>15.2f} "
              f"{exact / fast32:>11.2f} {difference:>13.1e}", flush=True)


def transfer_speed(repeats: int) -> None:
    """Transfer matrix of one full tile of random 8-bit weights: fixed point per row
    (float32, as the exact mode runs it) against the direct elimination (float64)."""
    print(f"\n{'tile':>5} {'cells':>22} {'fixed point s':>14} {'direct s':>9} {'ratio':>6} {'max rel diff':>13}")
    cells = {"100k/10M ohm, 1 ohm": dict(), "RRAM 6k/900k, 2.46 ohm": dict(r_on=6e3, r_off=9e5, r_wordline=2.46, r_bitline=2.46)}
    for size in (128, 256):
        for label, fields in cells.items():
            device = CrossbarDevice(tile_size=size, **fields)
            weights = torch.distributions.Laplace(0.0, 1.0).sample((device.outputs_per_tile, size)).double()
            tile = map_matrix(quantise_weights(weights, device.weight_bits)[0], device, "naive")[0]
            fixed = best_of(repeats, lambda: transfer_matrix(tile, device, method="fixed-point"))
            direct = best_of(repeats, lambda: transfer_matrix(tile, device, method="direct"))
            reference = transfer_matrix(tile, device, method="direct")
            difference = float((transfer_matrix(tile, device, method="fixed-point") - reference).abs().max()
                               / reference.abs().max())
            print(f"{size:>5} {label:>22} {fixed:>14.3f} {direct:>9.3f} {fixed / direct:>6.1f} {difference:>13.1e}",
                  flush=True)


def images_interval(score: float, images: int) -> str:
    """Clopper-Pearson 95% interval of an accuracy measured on ``images`` test images:
    the uncertainty of a deterministic device (nothing to repeat over trials)."""
    interval = stats.binomtest(round(score * images), images).proportion_ci(0.95)
    return f"[{interval.low:.2%}, {interval.high:.2%}]"


def _percent(interval: Interval) -> str:
    if interval.half_width is None:
        return f"{interval.mean:.2%}"
    return f"{interval.mean:.2%} ± {interval.half_width:.2%}"


def mapping_study(model, data, device: CrossbarDevice, statistics, tiles, mode: str, images: int,
                  trials: int, seed: int, mappings: tuple[str, ...] = MAPPINGS) -> dict:
    """Per tile size and mapping: NF, output error, accuracy over ``trials`` device instances."""
    test = Subset(data.test, range(min(images, len(data.test))))
    if mode == "exact" and device.programs_exactly and not device.read_noise:
        trials = 1  # nothing random: every trial would give the same numbers
    print(f"{'tile':>5} {'mapping':>8} {'NF':>18} {'out err':>18} {'gain-free err':>18} {'accuracy':>18} {'CPU s':>8}"
          + (f" {'test-set 95% CI':>18}" if trials == 1 else ""))
    results = {}
    for size in tiles:
        sized = dataclasses.replace(device, tile_size=size)
        for mapping in mappings:
            started = time.process_time()
            nf, error, gain_free, score = [], [], [], []
            for trial in range(trials):
                analog = to_crossbars(model, statistics, sized, mapping, mode, seed + trial)
                distortion = model_distortion(model, statistics, sized, mapping, seed + trial, analog)
                nf.append(distortion.nf)
                error.append(distortion.output_error)
                gain_free.append(distortion.gain_free_error)
                score.append(accuracy(analog, test, EVAL_BATCH_SIZE))
            row = {"nf": Interval.of(nf), "output_error": Interval.of(error), "gain_free_error": Interval.of(gain_free),
                   "accuracy": Interval.of(score)}
            results[(size, mapping)] = row
            print(f"{size:>5} {mapping:>8} {str(row['nf']):>18} {str(row['output_error']):>18} "
                  f"{str(row['gain_free_error']):>18} "
                  f"{_percent(row['accuracy']):>18} {time.process_time() - started:>8.1f}"
                  + (f" {images_interval(score[0], len(test)):>18}" if trials == 1 else ""), flush=True)
    return results


def drift_study(model, data, statistics, tile: int, r_wire: float, mode: str, images: int, trials: int,
                seed: int) -> dict:
    test = Subset(data.test, range(min(images, len(data.test))))
    print(f"{'drift time s':>13} {'compensated':>12} " + " ".join(f"{m:>18}" for m in MAPPINGS))
    results = {}
    for compensate in (False, True):
        for seconds in DRIFT_TIMES:
            device = CrossbarDevice(tile_size=tile, r_wordline=r_wire, r_bitline=r_wire, drift_nu=0.05,
                                    drift_nu_std=0.01, drift_time=seconds, drift_compensation=compensate)
            row = {}
            for mapping in MAPPINGS:
                scores = [accuracy(to_crossbars(model, statistics, device, mapping, mode, seed + t), test, EVAL_BATCH_SIZE)
                          for t in range(trials)]
                row[mapping] = Interval.of(scores)
            results[(compensate, seconds)] = row
            print(f"{seconds:>13.0f} {str(compensate):>12} " + " ".join(f"{_percent(row[m]):>18}" for m in MAPPINGS), flush=True)
    return results


def _build_transfers(model, statistics, device: CrossbarDevice, mapping: str, method: str, seed: int) -> float:
    """CPU seconds to map every layer and build every tile's transfer matrix by ``method``."""
    started = time.process_time()
    generators = DeviceGenerators.from_seed(seed)
    for name, layer in mappable_layers(model).items():
        q, _ = quantise_weights(weight_matrix(layer), device.weight_bits)
        for tile in map_matrix(q, device, mapping, statistics[name].row_density, generators.programming):
            transfer_matrix(tile, device, method=method)
    return time.process_time() - started


def exact_speed(model, data, device: CrossbarDevice, baseline_images: int, seed: int) -> None:
    """Exact mode on every test image, each mapping; against building the same transfer
    matrices by fixed-point solves only (the previous exact mode, measured whole), and
    against solving every distinct read (the one before, on ``baseline_images``
    images, extrapolated)."""
    # CPU seconds of this (single-threaded) process next to wall seconds: on a shared,
    # overloaded machine the CPU time is what an idle core would take.
    statistics = calibrate(model, data.train.tensors[0][:64], device, 1, torch.Generator().manual_seed(seed))
    cpu = {}
    for mapping in MAPPINGS:
        begun, cpu_begun = time.perf_counter(), time.process_time()
        analog = to_crossbars(model, statistics, device, mapping, "exact", seed)
        built = time.process_time() - cpu_begun
        score = accuracy(analog, data.test, EVAL_BATCH_SIZE)
        cpu[mapping] = time.process_time() - cpu_begun
        fixed_point = _build_transfers(model, statistics, device, mapping, "fixed-point", seed)
        print(f"exact, {mapping}: {len(data.test)} images in {time.perf_counter() - begun:.1f} s wall, "
              f"{cpu[mapping]:.1f} s CPU (transfer matrices {built:.1f} s; by fixed point only {fixed_point:.1f} s, "
              f"ratio {fixed_point / built:.2f}x), accuracy {score:.2%}", flush=True)
    exact_total = cpu["naive"] + cpu["mdm"]
    print(f"naive + mdm: {exact_total:.1f} s CPU (goal <= 60 s); all {len(MAPPINGS)} mappings "
          f"{sum(cpu.values()):.1f} s CPU", flush=True)
    # With an ADC the product is no longer linear: every bit-plane is read through the
    # transfer matrices and converted.
    with_adc = dataclasses.replace(device, adc_bits=8)
    for mapping in ("naive", "mdm"):
        cpu_begun = time.process_time()
        score = accuracy(to_crossbars(model, statistics, with_adc, mapping, "exact", seed), data.test, EVAL_BATCH_SIZE)
        print(f"exact, {mapping}, 8-bit ADC: {len(data.test)} images in {time.process_time() - cpu_begun:.1f} s CPU, "
              f"accuracy {score:.2%}", flush=True)
    # Baseline: the layer inputs of a few test images, every distinct read solved.
    images = data.test.tensors[0][:baseline_images]
    inputs = calibrate(model, images, device, 10**9, torch.Generator().manual_seed(seed))
    begun = time.process_time()
    for name, layer in mappable_layers(model).items():
        q, _ = quantise_weights(weight_matrix(layer), device.weight_bits)
        tiles = map_matrix(q, device, "mdm", inputs[name].row_density)
        simulate_matmul(tiles, inputs[name].sample, q.shape[0], device, solve_every_read=True)
    per_image = (time.process_time() - begun) / baseline_images
    print(f"solving every read instead: {per_image:.2f} CPU s per image per mapping, "
          f"{2 * per_image * len(data.test):.0f} CPU s extrapolated to naive + mdm on all images "
          f"(ratio {2 * per_image * len(data.test) / exact_total:.1f}x)", flush=True)


def fidelity(model, data, statistics, device: CrossbarDevice, images: int, seed: int) -> None:
    test = data.test.tensors[0][:images]
    with torch.no_grad():
        outputs = {mode: to_crossbars(model, statistics, device, "mdm", mode, seed)(test) for mode in ("ideal", "fast", "exact")}
    exact = outputs["exact"]
    gap = {mode: float((outputs[mode] - exact).norm() / exact.norm()) for mode in ("ideal", "fast")}
    distortion = float((exact - outputs["ideal"]).norm())
    captured = 1 - float((outputs["fast"] - exact).norm()) / distortion if distortion else 1.0
    agree = float((outputs["fast"].argmax(1) == exact.argmax(1)).float().mean())
    print(f"tile {device.tile_size}, wire {device.r_wordline:g} ohm: logits vs exact, ideal {gap['ideal']:.4f}, "
          f"fast {gap['fast']:.4f}; fast captures {captured:.1%} of the exact distortion "
          f"(1 - |fast - exact| / |ideal - exact|); top-1 agreement {agree:.1%} on {images} images", flush=True)


def _plot_mapping(plt, mapping_results: dict[str, dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(mapping_results), figsize=(4.8 * len(mapping_results), 3.6), squeeze=False)
    for ax, (label, results) in zip(axes[0], mapping_results.items()):
        sizes = sorted({size for size, _ in results})
        for mapping in dict.fromkeys(mapping for _, mapping in results):
            points = [results[(size, mapping)]["accuracy"] for size in sizes]
            ax.errorbar(sizes, [p.mean for p in points], yerr=[p.half_width or 0 for p in points],
                        marker="o", capsize=3, label=mapping)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(size) for size in sizes])
        ax.set_xlabel("tile size (rows = columns)")
        ax.set_ylabel("accuracy")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_drift(plt, drift_results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for compensate, style in ((False, "--"), (True, "-")):
        for mapping in MAPPINGS:
            points = [drift_results[(compensate, t)][mapping] for t in DRIFT_TIMES]
            ax.errorbar(DRIFT_TIMES, [p.mean for p in points], yerr=[p.half_width or 0 for p in points],
                        linestyle=style, marker="o", capsize=3, label=f"{mapping}{', compensated' if compensate else ''}")
    ax.set_xscale("log")
    ax.set_xlabel("time since programming (s)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(mapping_results: dict[str, dict], drift_results: dict | None, out: Path) -> list[Path]:
    """Accuracy against tile size per mapping, and against drift time."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if mapping_results:
        paths.append(_plot_mapping(plt, mapping_results, out / "cim_accuracy_vs_tile.png"))
    if drift_results:
        paths.append(_plot_drift(plt, drift_results, out / "cim_accuracy_vs_drift.png"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="solver,speed,mapping,drift,fidelity")
    parser.add_argument("--model", default="resnet10")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=0, help="resize digits (0 = native 8x8)")
    parser.add_argument("--tiles", default=",".join(map(str, SWEEP_TILE_SIZES)))
    parser.add_argument("--r-wire", type=float, default=CrossbarDevice.r_wordline,
                        help="wire resistance per segment, ohm (NeuroSim: 2.46 at 22 nm wires, 5.05 at 14 nm)")
    parser.add_argument("--r-on", type=float, default=CrossbarDevice.r_on, help="ON resistance, ohm (NeuroSim RRAM: 6e3)")
    parser.add_argument("--r-off", type=float, default=CrossbarDevice.r_off, help="OFF resistance, ohm (NeuroSim RRAM: 9e5)")
    parser.add_argument("--mode", default="exact", choices=("fast", "exact"))
    parser.add_argument("--images", type=int, default=360, help="test images for accuracy")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--exact-images", type=int, default=32, help="images for the fidelity section")
    parser.add_argument("--noise", default="off,on", help="mapping section: off, on, or both")
    parser.add_argument("--noisy-tiles", default="", help="tile sizes of the noisy device (default: --tiles)")
    parser.add_argument("--drift-r-wire", type=float, default=0.0,
                        help="wire resistance of the drift section (default 0: drift alone)")
    parser.add_argument("--mappings", default=",".join(MAPPINGS), help="mapping section: the mappings to compare")
    parser.add_argument("--plots", default="", help="folder for the plots (none if empty)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sections = set(args.sections.split(","))

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if "solver" in sections:
        print("\n== solver speed (batch 64 random inputs, best of 3) ==")
        solver_speed(batch=64, repeats=3)
        transfer_speed(repeats=1)
    if not sections & {"mapping", "drift", "fidelity", "speed"}:
        return
    data = load_dataset("digits", image_size=args.image_size)
    spec = ModelSpec(args.model, data.num_classes, data.in_channels, data.image_size, args.width)
    started = time.perf_counter()
    model = train(spec, data, args.epochs, args.seed)
    base = CrossbarDevice(r_on=args.r_on, r_off=args.r_off, r_wordline=args.r_wire, r_bitline=args.r_wire)
    statistics = calibrate(model, data.train.tensors[0][:64], base, 16, torch.Generator().manual_seed(args.seed))
    test = Subset(data.test, range(min(args.images, len(data.test))))
    print(f"\n{spec.name} width {args.width}, digits {data.image_size}x{data.image_size}, trained in "
          f"{time.perf_counter() - started:.0f} s; digital accuracy {accuracy(model, test, EVAL_BATCH_SIZE):.2%}, quantised on ideal "
          f"crossbars {accuracy(to_crossbars(model, statistics, base, 'mdm', 'ideal'), test, EVAL_BATCH_SIZE):.2%} ({len(test)} images)")
    mapping_results, drift_results = {}, None
    if "mapping" in sections:
        for noise in args.noise.split(","):
            device = dataclasses.replace(base, **NOISY) if noise == "on" else base
            label = (f"{'PCM-like noise' if noise == 'on' else 'ideal cells'}, R_on {args.r_on:g}, R_off {args.r_off:g}, "
                     f"wire {args.r_wire:g} ohm, {args.mode}")
            print(f"\n== mapping study: {label}, {len(test)} images, {args.trials} trial(s) ==")
            sizes = args.noisy_tiles if noise == "on" and args.noisy_tiles else args.tiles
            tiles = [int(size) for size in sizes.split(",")]
            mapping_results[label] = mapping_study(model, data, device, statistics, tiles, args.mode, args.images,
                                                   args.trials, args.seed, tuple(args.mappings.split(",")))
    if "drift" in sections:
        print(f"\n== accuracy against drift time (nu 0.05 ± 0.01, tile 128, wire {args.drift_r_wire:g} ohm, "
              f"{args.mode}) ==")
        drift_results = drift_study(model, data, statistics, 128, args.drift_r_wire, args.mode, args.images,
                                    args.trials, args.seed)
    if "speed" in sections:
        print("\n== exact mode speed, tile 128 ==")
        exact_speed(model, data, dataclasses.replace(base, tile_size=128), 4, args.seed)
    if "fidelity" in sections:
        print("\n== fast mode against exact mode ==")
        for size in (128, 256):
            fidelity(model, data, statistics, dataclasses.replace(base, tile_size=size), args.exact_images, args.seed)
    if args.plots and (mapping_results or drift_results):
        print("wrote " + ", ".join(str(p) for p in plot(mapping_results, drift_results, Path(args.plots))))


if __name__ == "__main__":
    main()
