"""``dpfl compare``: strategies side by side at the same ε, over seeds: a table and a plot."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dpfl.cli.options import positive_float, positive_int
from dpfl.cli.simulate import DEFAULTS, OPTIONS, add_option
from dpfl.errors import UsageError
from dpfl.server.recorder import format_epsilon, holds_run
from dpfl.settings import RunSettings
from dpfl.task.recipes import describe_recipe

SHARED_OPTIONS = [option for option in OPTIONS if option[1] not in ("strategy", "seed")]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare strategies at the same epsilon over seeds (table and plot)",
        description="Run each strategy with each seed on the same federation, with one noise "
        "multiplier calibrated so that every private strategy ends at the same epsilon, then print "
        "a table (final and best accuracy, mean and std over seeds) and save a plot. Runs use the "
        "in-process engine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--strategies", nargs="+", required=True, help="names or module:Class plugins")
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds 0 .. N-1 for every strategy")
    parser.add_argument("--target-epsilon", type=positive_float, default=DEFAULTS.target_epsilon,
                        help="epsilon every private strategy ends at")  # fmt: skip
    for flag, field, kind, text in SHARED_OPTIONS:
        add_option(parser, flag, field, kind, text)
    parser.add_argument("--strategy-option", dest="strategy_options", action="append", default=[],
                        metavar="KEY=VALUE", help="given to every strategy that declares KEY")  # fmt: skip
    parser.add_argument("--out", default=None, help="output folder (default runs/compare-<time>)")
    parser.set_defaults(func=run)


def run_comparison(
    base: RunSettings, strategies: list[str], seeds: int, out: Path, console: Console, option_items: list[str]
) -> list[dict]:
    """Run every (strategy, seed), write comparison.json and comparison.png, return the table rows."""
    from dpfl.client.app import app as client_app
    from dpfl.server.app import app as server_app
    from dpfl.server.inprocess import flower_log_to, run_in_process
    from dpfl.server.report import plot_comparison, privacy_label, read_rounds, summarise
    from dpfl.plugins import smoke_test_strategy
    from dpfl.strategies import get_strategy_class

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
                run_in_process(server_app, client_app, seeded.to_run_config(), seeded.num_clients)
            rounds = read_rounds(run_dir)
            runs.setdefault(name, []).append(rounds)
            labels[name] = privacy_label(run_dir)
            console.print(
                f"{name} seed {seed}: accuracy {rounds[-1]['accuracy']:.4f} after {len(rounds) - 1} rounds, "
                f"epsilon {format_epsilon(rounds[-1]['epsilon'])}"
            )
    rows = summarise(runs, labels)
    title = (
        f"{base.dataset}, {base.model} w{base.model_width}, {base.num_clients} clients, q={base.sample_rate}, "
        f"{base.partition}{f' alpha={base.dirichlet_alpha}' if base.partition == 'dirichlet' else ''}, "
        f"target epsilon {base.target_epsilon} (delta {base.delta:g}), {seeds} seeds"
    )
    plot_comparison(runs, out / "comparison.png", title)
    (out / "comparison.json").write_text(json.dumps({"title": title, "rows": rows}, indent=2) + "\n")
    return rows


def print_table(rows: list[dict], console: Console) -> None:
    table = Table(title="accuracy at the same epsilon (mean ± std over seeds)")
    for column in ("strategy", "final accuracy", "best accuracy", "epsilon", "rounds"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["strategy"],
            f"{row['final-accuracy-mean']:.4f} ± {row['final-accuracy-std']:.4f}",
            f"{row['best-accuracy-mean']:.4f} ± {row['best-accuracy-std']:.4f}",
            format_epsilon(row["epsilon"]) if row["epsilon-label"] == "valid" else row["epsilon-label"],
            str(row["rounds"]),
        )
    console.print(table)


def run(args: argparse.Namespace) -> int:
    values = {field: getattr(args, field) for _, field, _, _ in SHARED_OPTIONS}
    base = dataclasses.replace(DEFAULTS, **values, target_epsilon=args.target_epsilon)
    base.validate()
    out = Path(args.out or f"runs/compare-{datetime.now():%Y%m%d-%H%M%S}").expanduser().resolve()
    if holds_run(out) or (out / "comparison.json").exists():
        raise UsageError(f"output folder {str(out)!r} already holds a comparison; choose another --out")
    console = Console()
    console.print(describe_recipe(base))
    rows = run_comparison(base, args.strategies, args.seeds, out, console, args.strategy_options)
    print_table(rows, console)
    console.print(f"table: {out / 'comparison.json'}\nplot: {out / 'comparison.png'}")
    return 0
