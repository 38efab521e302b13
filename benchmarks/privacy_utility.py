"""Privacy-utility at equal ε: DP strategies on the same non-IID federation.

400 clients holding the digits training set with Dirichlet(α = 0.3) label skew
(3-4 images each), the model's recipe (dpfl/task/recipes.py; for the default
GroupNorm ResNet-10 of width 8: 40 rounds of Poisson sampling at q = 0.25, C = 0.2),
and one σ calibrated so that every private strategy ends at ε = 8 (δ = 1e-5);
non-private FedAvg as the reference curve; seeds 0-2. It calls `dpfl compare`'s
library function with these settings (the in-process engine), so the records and
plot are the ones a researcher gets from the CLI.

``--clip-mode adaptive`` runs the private strategies with quantile-based adaptive
clipping (C starts at the recipe's and tracks ``--target-quantile``); tune it with
``--validation-fraction`` > 0, which holds out part of the server's data and prints
the final validation accuracy beside the test accuracy (choose on validation only).

    .venv/bin/python benchmarks/privacy_utility.py [--model vit] [--seeds 3] [--out DIR]
        [--clip-mode adaptive --target-quantile 0.5 --clip-lr 0.2] [--validation-fraction 0.3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from dpfl.analysis.comparison import run_comparison
from dpfl.server.recorder import format_epsilon
from dpfl.settings import RunSettings, describe_recipe

STRATEGIES = ["dp-fedavg", "dp-fedsam", "dp-fedpgn", "dp-fedpgn-ls", "fedavg"]
# Not dataclasses.replace of a RunSettings: a new one takes the chosen model's recipe.
SETTINGS = dict(
    partition="dirichlet",
    dirichlet_alpha=0.3,
    num_clients=400,
    target_epsilon=8.0,
    max_epsilon=0.0,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES, help="a subset, e.g. to split the work")
    parser.add_argument("--model", default="resnet10", help="a built-in model, trained with its recipe")
    parser.add_argument("--out", default=None, help="default benchmarks/results/privacy_utility[-MODEL][-adaptive]")
    parser.add_argument("--clip-mode", default="fixed", choices=["fixed", "adaptive"])
    parser.add_argument("--target-quantile", type=float, default=RunSettings.target_quantile)
    parser.add_argument("--clip-lr", type=float, default=RunSettings.clip_lr)
    parser.add_argument("--validation-fraction", type=float, default=0.0, help="for tuning: report validation accuracy")
    args = parser.parse_args()
    settings = RunSettings(**SETTINGS, model=args.model, clip_mode=args.clip_mode, target_quantile=args.target_quantile,
                           clip_lr=args.clip_lr, validation_fraction=args.validation_fraction)  # fmt: skip
    settings.validate()
    out = args.out or "benchmarks/results/privacy_utility" + ("" if args.model == "resnet10" else f"-{args.model}") + (
        "-adaptive" if args.clip_mode == "adaptive" else "")
    console = Console()
    console.print(describe_recipe(settings))
    started = time.perf_counter()
    rows = run_comparison(settings, args.strategies, args.seeds, Path(out).resolve(), [],
                          on_run=lambda name, seed, rounds: console.print(
                              f"{name} seed {seed}: final accuracy {rounds[-1]['accuracy']:.4f}, "
                              f"epsilon {format_epsilon(rounds[-1]['epsilon'])}"))  # fmt: skip
    for row in rows:  # the library's summary rows (comparison.json), one line each
        console.print(f"{row['strategy']}: final accuracy {row['final-accuracy-mean']:.4f} ± {row['final-accuracy-std']:.4f}, "
                      f"best {row['best-accuracy-mean']:.4f} ± {row['best-accuracy-std']:.4f} over {row['seeds']} seed(s), "
                      f"epsilon {format_epsilon(row['epsilon']) if row['epsilon-label'] == 'valid' else row['epsilon-label']}")  # fmt: skip
    if args.validation_fraction:
        print_validation(Path(out).resolve(), console)
    by_name = {row["strategy"]: row for row in rows}
    if {"dp-fedpgn", "dp-fedavg"} <= by_name.keys():
        gain = by_name["dp-fedpgn"]["final-accuracy-mean"] - by_name["dp-fedavg"]["final-accuracy-mean"]
        console.print(f"DP-FedPGN - DP-FedAvg at epsilon {settings.target_epsilon}: {100 * gain:+.1f} points (goal +3.0)")
    console.print(f"{time.perf_counter() - started:.0f} s in all; plot {Path(out) / 'comparison.png'}")


def print_validation(out: Path, console: Console) -> None:
    """Final validation accuracy per strategy (mean over its seeds): what tuning may look at."""
    by_strategy: dict[str, list[float]] = {}
    for summary_file in sorted(out.glob("*-seed*/summary.json")):
        summary = json.loads(summary_file.read_text())
        by_strategy.setdefault(summary["strategy"], []).append(summary["final-validation-accuracy"])
    for strategy, accuracies in by_strategy.items():
        console.print(f"{strategy}: final validation accuracy {sum(accuracies) / len(accuracies):.4f} "
                      f"over {len(accuracies)} seed(s)")  # fmt: skip


if __name__ == "__main__":
    main()
