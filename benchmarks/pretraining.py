"""How ready-made the public backbones' features are: a linear probe on digits.

For each ``--pretraining`` choice (none = the random init, the baseline; fractal;
strokes), the model of the recipe (``--model vit``: 2 blocks at width 16) gets its
cached public backbone (``dpfl.task.pretraining``; pretrained here on a cold cache),
its head is removed, and a logistic regression (scikit-learn) is fitted on the class
token's features of the digits training images and scored on the test images. This
is non-private and uses the test set: it explains the federated results in
docs/vit.md, it does not choose anything (the recipe was chosen on validation runs).

    .venv/bin/python benchmarks/pretraining.py [--model vit] [--width 16] [--depth 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression
from torch import nn

from dpfl.task.checkpoint import ModelSpec
from dpfl.task.data import load_dataset
from dpfl.task.pretraining import PRETRAINING_CHOICES, initialise
from dpfl.task.recipes import recipe_for


def features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit")
    parser.add_argument("--width", type=int, default=0, help="0: the recipe's")
    parser.add_argument("--depth", type=int, default=0, help="0: the recipe's")
    args = parser.parse_args()
    recipe = recipe_for(args.model)
    data = load_dataset("digits")
    spec = ModelSpec.for_data(args.model, args.width or recipe.model_width, data, args.depth or recipe.model_depth)
    (train_x, train_y), (test_x, test_y) = data.train.tensors, data.test.tensors
    table = Table(title=f"linear probe on digits: {args.model}, width {spec.width}, depth {spec.depth}")
    for column in ("pretraining", "probe test accuracy", "vs random init", "pretraining s (0: cached)"):
        table.add_column(column)
    baseline = None
    for choice in PRETRAINING_CHOICES:
        torch.manual_seed(0)
        model = spec.build()
        started = time.perf_counter()
        seconds = initialise(model, spec, choice)
        # The features the head reads: the ViT's class token, a convolutional model's pooled map.
        setattr(model, "heads" if hasattr(model, "heads") else "fc", nn.Identity())
        model.eval()
        probe = LogisticRegression(max_iter=3000).fit(features(model, train_x).numpy(), train_y.numpy())
        accuracy = probe.score(features(model, test_x).numpy(), test_y.numpy())
        baseline = baseline or accuracy
        table.add_row(choice, f"{accuracy:.1%}", f"{accuracy / baseline:.2f}x", f"{seconds:.0f} ({time.perf_counter() - started:.0f} total)")
    Console().print(table)


if __name__ == "__main__":
    main()
