"""``dpfl compare``: strategies side by side at the same ε, over seeds: a table and a plot."""

from __future__ import annotations

import argparse
import dataclasses
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dpfl.analysis.comparison import run_comparison
from dpfl.cli.options import positive_float, positive_int
from dpfl.cli.simulate import DEFAULTS, OPTIONS, add_option
from dpfl.errors import UsageError
from dpfl.server.recorder import format_epsilon, holds_run
from dpfl.settings import describe_recipe

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


def print_run(console: Console):
    """A line per finished (strategy, seed): its accuracy, rounds and ε."""

    def show(name: str, seed: int, rounds: list[dict]) -> None:
        console.print(
            f"{name} seed {seed}: accuracy {rounds[-1]['accuracy']:.4f} after {len(rounds) - 1} rounds, "
            f"epsilon {format_epsilon(rounds[-1]['epsilon'])}"
        )

    return show


def run(args: argparse.Namespace) -> int:
    values = {field: getattr(args, field) for _, field, _, _ in SHARED_OPTIONS}
    base = dataclasses.replace(DEFAULTS, **values, target_epsilon=args.target_epsilon)
    base.validate()
    out = Path(args.out or f"runs/compare-{datetime.now():%Y%m%d-%H%M%S}").expanduser().resolve()
    if holds_run(out) or (out / "comparison.json").exists():
        raise UsageError(f"output folder {str(out)!r} already holds a comparison; choose another --out")
    console = Console()
    console.print(describe_recipe(base))
    rows = run_comparison(base, args.strategies, args.seeds, out, args.strategy_options, on_run=print_run(console))
    print_table(rows, console)
    console.print(f"table: {out / 'comparison.json'}\nplot: {out / 'comparison.png'}")
    return 0
