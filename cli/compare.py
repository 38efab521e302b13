"""``dpfl compare``: strategies side by side at the same ε, over seeds: a table and a plot."""

from __future__ import annotations

import argparse
import dataclasses

from dpfl.cli.display import ProgressDisplay, make_console
from dpfl.cli.options import (
    DEFAULTS, HelpFormatter, add_output_option, add_run_options, add_tracking_option, option_values, output_folder,
    positive_float, positive_int,
)  # fmt: skip
from dpfl.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        usage="%(prog)s [OPTION ...]",
        help="compare strategies at the same epsilon over seeds (table and plot)",
        description="Run each strategy with each seed on the same federation, with one noise "
        "multiplier calibrated so that every private strategy ends at the same epsilon, then print "
        "a table (final and best accuracy, mean and std over seeds) and save a plot. Runs use the "
        "in-process engine.",
        formatter_class=HelpFormatter,
    )
    comparison = parser.add_argument_group("the comparison")
    comparison.add_argument("--strategies", nargs="+", required=True, metavar="NAME", help="names or module:Class plugins")
    comparison.add_argument("--seeds", type=positive_int, default=3, metavar="N", help="seeds 0 .. N-1 for every strategy")
    comparison.add_argument("--target-epsilon", type=positive_float, default=DEFAULTS.target_epsilon, metavar="X",
                            help="epsilon every private strategy ends at")  # fmt: skip
    add_output_option(comparison, "compare")
    add_tracking_option(comparison)
    add_run_options(parser, leave_out=("strategy", "seed", "target_epsilon"))
    parser.set_defaults(func=run, noise_multiplier=None)


def print_table(rows: list[dict], console) -> None:
    from rich.table import Table

    from dpfl.server.recorder import format_epsilon

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


def print_run(console, tensorboard: str | None = None):
    """A line per finished (strategy, seed): its accuracy, rounds and ε; its rounds to TensorBoard if asked."""
    from dpfl.server.recorder import format_epsilon

    def show(name: str, seed: int, rounds: list[dict]) -> None:
        console.print(
            f"{name} seed {seed}: accuracy {rounds[-1]['accuracy']:.4f} after {len(rounds) - 1} rounds, "
            f"epsilon {format_epsilon(rounds[-1]['epsilon'])}"
        )
        if tensorboard:
            from dpfl.server.tracking import TensorBoardTracker

            tracker = TensorBoardTracker(tensorboard, f"{name.replace(':', '_')}-seed{seed}")
            for row in rounds:
                tracker.record(row)
            tracker.close()

    return show


def run(args: argparse.Namespace) -> int:
    from dpfl.analysis.comparison import COMPARISON_FILE, COMPARISON_PLOT, run_comparison
    from dpfl.server.recorder import holds_run
    from dpfl.settings import describe_recipe

    values = {field: value for field, value in option_values(args).items() if field != "strategy_options"}
    base = dataclasses.replace(DEFAULTS, **values)
    base.validate()
    out = output_folder(args.out, "compare")
    if holds_run(out) or (out / COMPARISON_FILE).exists():
        raise UsageError(f"output folder {str(out)!r} already holds a comparison; choose another --out")
    tensorboard = None
    if args.tensorboard:
        from dpfl.server.tracking import summary_writer

        summary_writer()  # refused now, not after the first run, when TensorBoard is missing
        tensorboard = str(args.tensorboard)
    console = make_console()
    console.print(describe_recipe(base), soft_wrap=True)
    with ProgressDisplay(console) as progress:
        rows = run_comparison(base, args.strategies, args.seeds, out, args.strategy_options,
                              on_run=print_run(console, tensorboard), progress=progress)  # fmt: skip
    print_table(rows, console)
    console.print(f"table: {out / COMPARISON_FILE}\nplot: {out / COMPARISON_PLOT}", soft_wrap=True)
    return 0
