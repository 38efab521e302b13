"""Comparing runs: a table of final and best accuracy over seeds, and a plot."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpfl.server.recorder import CONFIG_FILE, METRICS_FILE


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def privacy_label(run_dir: Path) -> str:
    """How a run's ε is to be read: ``valid``, ``not private`` or why it is not valid."""
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    if config["epsilon-valid"]:
        return "valid"
    reasons = [name for key, value, name in (("clipping", "paper", "paper clipping"),
                                              ("reproducible-noise", True, "reproducible noise")) if config[key] == value]  # fmt: skip
    return f"not valid ({', '.join(reasons)})" if reasons else "not private"


def summarise(runs: Mapping[str, Sequence[list[dict[str, Any]]]], labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """Per strategy: mean ± std over seeds of final and best accuracy, the final ε and its label."""
    rows = []
    for strategy, seeds in runs.items():
        final = [rounds[-1]["accuracy"] for rounds in seeds]
        best = [max(r["accuracy"] for r in rounds) for rounds in seeds]
        epsilons = [rounds[-1]["epsilon"] for rounds in seeds]
        rows.append(
            {
                "strategy": strategy,
                "seeds": len(seeds),
                "final-accuracy-mean": float(np.mean(final)),
                "final-accuracy-std": float(np.std(final)),
                "best-accuracy-mean": float(np.mean(best)),
                "best-accuracy-std": float(np.std(best)),
                "epsilon": None if any(e is None for e in epsilons) else float(np.max(epsilons)),
                "epsilon-label": labels[strategy],
                "rounds": len(seeds[0]) - 1,
            }
        )
    return rows


def plot_comparison(runs: Mapping[str, Sequence[list[dict[str, Any]]]], path: Path, title: str) -> None:
    """Accuracy against round and against ε spent, mean over seeds with a ±std band."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (by_round, by_epsilon) = plt.subplots(1, 2, figsize=(12, 4.5))
    for strategy, seeds in runs.items():
        length = min(len(rounds) for rounds in seeds)
        accuracy = np.array([[r["accuracy"] for r in rounds[:length]] for rounds in seeds])
        mean, std = accuracy.mean(axis=0), accuracy.std(axis=0)
        steps = np.arange(length)
        (line,) = by_round.plot(steps, mean, label=strategy)
        by_round.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        epsilon = [r["epsilon"] for r in seeds[0][:length]]
        if all(e is not None and math.isfinite(e) for e in epsilon):
            by_epsilon.plot(epsilon, mean, label=strategy, color=line.get_color())
            by_epsilon.fill_between(epsilon, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    by_round.set(xlabel="round", ylabel="test accuracy", title="accuracy by round")
    by_epsilon.set(xlabel="epsilon spent", ylabel="test accuracy", title="accuracy by privacy spent")
    for axes in (by_round, by_epsilon):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
