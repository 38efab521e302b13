"""Comparing strategies: runs over seeds at the same ε, a table of final and best accuracy, and a plot."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpfl.client.app import app as client_app
from dpfl.engines.inprocess import flower_log_to, run_in_process
from dpfl.engines.simulation import cohort_handler
from dpfl.plugins import smoke_test_strategy
from dpfl.server.app import app as server_app
from dpfl.server.recorder import CONFIG_FILE, METRICS_FILE
from dpfl.settings import RunSettings
from dpfl.strategies import get_strategy_class


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


def run_comparison(
    base: RunSettings, strategies: list[str], seeds: int, out: Path, option_items: list[str],
    on_run: Callable[[str, int, list[dict[str, Any]]], None] = lambda name, seed, rounds: None,
) -> list[dict[str, Any]]:
    """Run every (strategy, seed) on the in-process engine, write comparison.json and
    comparison.png, return the table rows; ``on_run`` sees each finished run's rounds."""
    plans = {}
    for name in strategies:
        cls = get_strategy_class(name)
        own = " ".join(item for item in option_items if item.partition("=")[0] in cls.options)
        settings = dataclasses.replace(base, strategy=name, strategy_options=own)
        smoke_test_strategy(cls, settings, name)
        plans[name] = settings
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list] = {}
    labels: dict[str, str] = {}
    for name, settings in plans.items():
        for seed in range(seeds):
            run_dir = out / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-seed{seed}"
            seeded = dataclasses.replace(settings, seed=seed, out_dir=str(run_dir))
            with flower_log_to(out / "flower.log"):
                run_in_process(server_app, client_app, seeded.to_run_config(), seeded.num_clients,
                               cohort=cohort_handler(seeded))  # fmt: skip
            rounds = read_rounds(run_dir)
            runs.setdefault(name, []).append(rounds)
            labels[name] = privacy_label(run_dir)
            on_run(name, seed, rounds)
    rows = summarise(runs, labels)
    title = (
        f"{base.dataset}, {base.model} w{base.model_width}, {base.num_clients} clients, q={base.sample_rate}, "
        f"{base.partition}{f' alpha={base.dirichlet_alpha}' if base.partition == 'dirichlet' else ''}, "
        f"target epsilon {base.target_epsilon} (delta {base.delta:g}), {seeds} seeds"
    )
    plot_comparison(runs, out / "comparison.png", title)
    (out / "comparison.json").write_text(json.dumps({"title": title, "rows": rows}, indent=2) + "\n")
    return rows
