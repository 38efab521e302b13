"""Benchmark: Σ-norm against Frobenius compression of a GroupNorm ResNet, no fine-tuning.

Trains a GroupNorm ResNet-10 on digits (in this script, about a minute on 2 cores),
collects the input covariance of its conv layers on the training set, then compresses
every 3x3 conv but the first to 2x and 4x fewer parameters with Tucker-2 and CPD, in
the Frobenius norm (TensorLy) and in the Σ-norm (ALS from the Frobenius solution),
and prints test accuracy and time per method as a Markdown table.

Digits are upsampled to 16x16 and the stages are 16-32-64-128 channels wide: at the
native 8x8 the last stage runs on 1x1 maps, where a 3x3 kernel only ever uses its
centre tap and the Σ-norm wins trivially; width 16 makes the convs large enough
(300k parameters) that 4x compression costs accuracy.

    python benchmarks/compression.py [--epochs 5] [--width 16] [--image-size 16]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from dpfl.compression.covariance import collect_statistics
from dpfl.compression.finetune import finetune
from dpfl.compression.pipeline import CompressionConfig, compress_on_data
from dpfl.compression.study import StudyOptions, choose_layers, plan_layer_ranks
from dpfl.task.data import load_dataset
from dpfl.task.evaluation import accuracy
from dpfl.task.models import build_model

KEPT_FRACTIONS = (0.5, 0.25)  # 2x and 4x fewer parameters in the compressed convs
VARIANTS = (
    ("frobenius", CompressionConfig()),
    ("sigma", CompressionConfig()),
    # Ablation: Σ = E[xxᵀ] (uncentred) and the original bias, to separate the Σ-norm
    # itself from the mean/bias correction of the default.
    ("sigma", CompressionConfig(center=False)),
)


def conv_parameters(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = load_dataset("digits", image_size=args.image_size)
    model = build_model("resnet10", data.num_classes, data.in_channels, data.image_size, args.width)
    started = time.perf_counter()
    finetune(model, DataLoader(data.train, batch_size=64, shuffle=True), args.epochs, lr=3e-3)
    train_seconds = time.perf_counter() - started
    baseline = accuracy(model, data.test)

    # The layers dpfl compress picks by default (every 3x3 conv but the first), the
    # same for Tucker-2 and CPD; their statistics over the whole training set, once.
    layers = choose_layers(model, "tucker2", None)
    started = time.perf_counter()
    calibration = DataLoader(data.train, batch_size=128)
    statistics = collect_statistics(model, calibration, layers, max_batches=len(calibration))
    covariance_seconds = time.perf_counter() - started
    samples = {name: s.count for name, s in statistics.items()}

    print(f"GroupNorm ResNet-10, width {args.width}, digits at {args.image_size}x{args.image_size}, "
          f"{args.epochs} epochs: {train_seconds:.1f} s, test accuracy {baseline:.2%}, "
          f"{conv_parameters(model)} conv parameters; torch threads {torch.get_num_threads()}")
    print(f"covariance pass ({len(data.train)} training images, {len(layers)} layers, "
          f"{min(samples.values())}-{max(samples.values())} patches per layer): {covariance_seconds:.1f} s")
    print()
    print("| method | conv params kept | norm | accuracy | Δ vs Frobenius | Frobenius init (s) | Σ-ALS (s) | ALS sweeps |")
    print("|---|---|---|---|---|---|---|---|")
    input_shape = (data.in_channels, data.image_size, data.image_size)
    for method in ("tucker2", "cpd"):
        for kept in KEPT_FRACTIONS:
            ranks = plan_layer_ranks(model, StudyOptions(ratio=kept, method=method, scope="layer"))
            frobenius_accuracy = None
            for norm, config in VARIANTS:
                compressed = copy.deepcopy(model)
                run = compress_on_data(
                    compressed, data.train, data.test, input_shape, method, norm, ranks, statistics, config=config
                )
                acc = run.accuracy_after
                frobenius_accuracy = acc if norm == "frobenius" else frobenius_accuracy
                label = norm if config.center or norm == "frobenius" else "sigma, uncentred, no bias fix"
                delta = "" if norm == "frobenius" else f"{100 * (acc - frobenius_accuracy):+.1f} pt"
                print(
                    f"| {method} | {conv_parameters(compressed) / conv_parameters(model):.1%} | {label} | {acc:.2%} | {delta} | "
                    f"{sum(r.frobenius_seconds for r in run.layers):.1f} | {sum(r.sigma_seconds for r in run.layers):.1f} | "
                    f"{sum(r.sweeps for r in run.layers)} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
