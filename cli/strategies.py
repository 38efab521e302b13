"""``dpfl strategies``: what strategies are available, with their options."""

from __future__ import annotations

import argparse

from dpfl.cli.display import make_console
from dpfl.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "strategies",
        help="list the available strategies",
        description="List the strategies registered under the `dpfl.strategies` entry-point group "
        "(built-ins and installed plugins), with a one-line description and their options.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from dpfl.strategies import get_strategy_class, registered_strategies

    table = Table(title="strategies (use a name, or module:Class, with --strategy)")
    for column in ("name", "DP", "description", "options (--strategy-option)"):
        table.add_column(column)
    for name in sorted(registered_strategies()):
        try:
            cls = get_strategy_class(name)
        except UsageError as err:  # a broken plugin must not hide the others
            table.add_row(name, "?", f"[red]{err}[/]", "")
            continue
        options = " ".join(f"{key}={value}" for key, value in cls.options.items())
        table.add_row(name, "yes" if cls.private else "no", cls.description, options)
    make_console().print(table)
    return 0
