"""``dpfl privacy``: ε of a planned federation, or the σ for a target ε, per accountant."""

from __future__ import annotations

import argparse
import json

from dpfl.cli.display import make_console
from dpfl.cli.options import HelpFormatter, open_unit, positive_float, positive_int, probability
from dpfl.privacy.accountants import ACCOUNTANTS

ALL = "all"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "privacy",
        help="epsilon of sigma, q and rounds, or sigma for a target epsilon",
        description="Client-level privacy of Poisson-subsampled Gaussian rounds, by Renyi DP (Opacus's "
        "analysis with a refined order search), PRV (Opacus; the upper end of its error bound) or PLD "
        "(dp-accounting; pessimistic). Give --noise-multiplier to get epsilon, or --target-epsilon to get "
        "the noise multiplier.",
        formatter_class=HelpFormatter,
    )
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--noise-multiplier", type=positive_float, help="noise multiplier sigma")
    given.add_argument("--target-epsilon", type=positive_float, help="epsilon to reach after all rounds")
    parser.add_argument("--sample-rate", type=probability, required=True, help="Poisson client sampling rate q")
    parser.add_argument("--rounds", type=positive_int, required=True, help="number of rounds")
    parser.add_argument("--delta", type=open_unit, default=1e-5, help="delta")
    parser.add_argument(
        "--accountant", choices=[*ACCOUNTANTS, ALL], default=ALL, help="accountant, or all of them side by side"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list, for scripts")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from dpfl.privacy.calibration import privacy_spent

    names = list(ACCOUNTANTS) if args.accountant == ALL else [args.accountant]
    rows = [privacy_spent(name, args.sample_rate, args.rounds, args.delta, noise_multiplier=args.noise_multiplier,
                          target_epsilon=args.target_epsilon) for name in names]  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="client-level DP (Poisson-subsampled Gaussian)")
    for column in ("accountant", "noise multiplier", "sample rate", "rounds", "delta", "epsilon", "best RDP order",
                   "last-iterate epsilon\n(heuristic)"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in rows:
        order = row["best-rdp-order"]
        table.add_row(
            row["accountant"], f"{row['noise-multiplier']:.4f}", f"{row['sample-rate']:g}", str(row["rounds"]),
            f"{row['delta']:g}", f"{row['epsilon']:.4f}", "" if order is None else f"{order:.3f}",
            f"{row['last-iterate-epsilon']:.4f}",
        )  # fmt: skip
    console = make_console()
    console.print(table)
    console.print("epsilon is the accountant's guarantee for anyone who sees every round's model. The last-iterate "
                  "epsilon (Steinke et al., ICLR 2025) is a heuristic, not a guarantee, for who sees only the final "
                  "model: exact when every client's update is the same vector each round it is sampled.")  # fmt: skip
    return 0
