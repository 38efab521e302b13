"""One run's curves: accuracy and ε by round, and accuracy against ε spent (``curves.png``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_curves(rounds: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Plot a run's public round records to ``path``; ε panels show the client-level ε, or where it
    is not valid the sample-level ε of local DP when the run has it, or say that there is none."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = [row["round"] for row in rounds]
    accuracy = [row["accuracy"] for row in rounds]
    epsilon, label = [row.get("epsilon") for row in rounds], "epsilon spent"
    if any(e is None for e in epsilon) and all("local-epsilon-nominal" in row for row in rounds):
        # No client-level guarantee, but sample-level DP in every client: plot the ε the run has.
        epsilon, label = [row["local-epsilon-nominal"] for row in rounds], "sample-level epsilon per client (nominal)"
    valid = bool(rounds) and all(e is not None and math.isfinite(e) for e in epsilon)
    figure, (by_round, spent, by_epsilon) = plt.subplots(1, 3, figsize=(15, 4.5))
    by_round.plot(steps, accuracy, marker=".")
    if "validation-accuracy" in rounds[-1]:
        by_round.plot(steps, [row.get("validation-accuracy") for row in rounds], marker=".", label="validation")
        by_round.legend(["test", "validation"])
    by_round.set(xlabel="round", ylabel="accuracy", title="accuracy by round")
    spent.set(xlabel="round", ylabel=label, title="privacy spent by round")
    by_epsilon.set(xlabel=label, ylabel="test accuracy", title="accuracy by privacy spent")
    if valid:
        spent.plot(steps, epsilon, marker=".", color="tab:red")
        by_epsilon.plot(epsilon, accuracy, marker=".", color="tab:purple")
    else:
        for axes in (spent, by_epsilon):
            axes.text(0.5, 0.5, "epsilon not valid for this run", ha="center", va="center", transform=axes.transAxes)
    for axes in (by_round, spent, by_epsilon):
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
