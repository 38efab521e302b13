"""Benchmark of the simulated CIM device (not a test): python benchmarks/cim.py

1. A GroupNorm ResNet-10 trained here on digits; tiles 64/128/256/512, naive vs MDM
   mapping: model NF, output error and analog accuracy (fast mode), and the NF
   reduction of MDM (goal: >= 30% at 128x128).
2. Solver speed per input vector, fast fixed point vs exact sparse nodal solve, on
   random 30%-dense tiles of 128x128 and 256x256 (goal: fast <= 5 ms at 256x256).
3. Fast mode against exact mode on a small CNN: agreement of the logits.

Every ratio is against a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from torch import nn

from dpfl.cim.circuit import NodalSolver, solve_fixed_point
from dpfl.cim.device import CrossbarDevice
from dpfl.cim.model import calibrate, to_crossbars
from dpfl.cim.report import SWEEP_TILE_SIZES, accuracy, model_distortion
from dpfl.task.checkpoint import ModelSpec
from dpfl.task.data import load_dataset


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


def mapping_study(model: nn.Module, data, vectors: int, seed: int) -> None:
    device = CrossbarDevice()
    calibration = data.train.tensors[0][:64]
    statistics = calibrate(model, calibration, device, vectors, torch.Generator().manual_seed(seed))
    print(f"digital accuracy {accuracy(model, data.test):.2%}; "
          f"quantised, ideal crossbar {accuracy(to_crossbars(model, statistics, device, 'mdm', 'ideal'), data.test):.2%}")
    print(f"{'tile':>5} {'NF naive':>9} {'NF mdm':>8} {'mdm/naive':>10} {'err naive':>10} {'err mdm':>8} "
          f"{'acc naive':>10} {'acc mdm':>8} {'seconds':>8}")
    for size in SWEEP_TILE_SIZES:
        sized = dataclasses.replace(device, tile_size=size)
        started = time.perf_counter()
        rows = {}
        for mapping in ("naive", "mdm"):
            distortion = model_distortion(model, statistics, sized, mapping)
            analog = to_crossbars(model, statistics, sized, mapping, "fast", seed)
            rows[mapping] = (distortion.nf, distortion.output_error, accuracy(analog, data.test))
        (nf_n, err_n, acc_n), (nf_m, err_m, acc_m) = rows["naive"], rows["mdm"]
        print(f"{size:>5} {nf_n:>9.4f} {nf_m:>8.4f} {nf_m / nf_n:>10.3f} {err_n:>10.4f} {err_m:>8.4f} "
              f"{acc_n:>10.2%} {acc_m:>8.2%} {time.perf_counter() - started:>8.1f}", flush=True)


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


def fast_against_exact(data, images: int, seed: int) -> None:
    spec = ModelSpec("cnn", data.num_classes, data.in_channels, data.image_size, 8)
    model = train(spec, data, epochs=6, seed=seed)
    test = data.test.tensors[0][:images]
    for device in (CrossbarDevice(tile_size=64), CrossbarDevice(tile_size=64, r_on=20e3, r_off=2e6, r_wordline=2.0, r_bitline=2.0)):
        statistics = calibrate(model, data.train.tensors[0][:64], device, 8, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            outputs = {mode: to_crossbars(model, statistics, device, "mdm", mode, seed)(test)
                       for mode in ("ideal", "fast", "exact")}
        exact = outputs["exact"]
        gap = {mode: float((outputs[mode] - exact).norm() / exact.norm()) for mode in ("ideal", "fast")}
        agree = float((outputs["fast"].argmax(1) == exact.argmax(1)).float().mean())
        print(f"R_on {device.r_on:g} ohm, wire {device.r_wordline:g} ohm: logits vs exact, ideal {gap['ideal']:.4f}, "
              f"fast {gap['fast']:.4f} (fast leaves {gap['fast'] / gap['ideal']:.1%} of the distortion unmodelled); "
              f"fast/exact top-1 agreement {agree:.1%} on {images} images", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--vectors", type=int, default=16, help="input vectors per layer for NF")
    parser.add_argument("--exact-images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_dataset("digits")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n== 2. solver speed (batch 64 random inputs, best of 3) ==")
    solver_speed(batch=64, repeats=3)
    print(f"\n== 1. GroupNorm ResNet-10 (width {args.width}) on digits, default device (R_on 100k, R_off 10M, 1 ohm wires) ==")
    spec = ModelSpec("resnet10", data.num_classes, data.in_channels, data.image_size, args.width)
    mapping_study(train(spec, data, args.epochs, args.seed), data, args.vectors, args.seed)
    print("\n== 3. fast mode against exact mode, small CNN, tile 64 ==")
    fast_against_exact(data, args.exact_images, args.seed)


if __name__ == "__main__":
    main()
