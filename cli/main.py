"""Entry point of the ``dpfl`` console command.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (a callable taking
the parsed arguments and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dpfl import __version__
from dpfl.cli.options import OneLineErrorParser
from dpfl.errors import UsageError

SUBCOMMAND_MODULES = (
    "dpfl.cli.simulate",
    "dpfl.cli.compare",
    "dpfl.cli.strategies",
    "dpfl.cli.privacy",
    "dpfl.cli.audit",
    "dpfl.cli.compress",
    "dpfl.cli.deploy",
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="dpfl",
        description="Federated learning with client-level differential privacy.",
    )
    parser.add_argument("--version", action="version", version=f"dpfl {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=OneLineErrorParser
    )
    subparsers.required = True
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Strategy plugins given as module:Class are looked up from the current
    # directory too, as `python -m` would.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        sys.stderr.write(f"dpfl {args.command}: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"dpfl {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
