"""``dpfl privacy``: ε of a planned federation, or the σ for a target ε."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from dpfl.cli.options import open_unit, positive_float, positive_int, probability
from dpfl.privacy.accounting import calibrate_noise_multiplier, epsilon_for


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "privacy",
        help="epsilon of sigma, q and rounds, or sigma for a target epsilon",
        description="Client-level privacy of Poisson-subsampled Gaussian rounds (Renyi DP, Opacus's "
        "analysis with a refined order search). Give --noise-multiplier to get epsilon, or "
        "--target-epsilon to get the noise multiplier.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--noise-multiplier", type=positive_float, help="noise multiplier sigma")
    given.add_argument("--target-epsilon", type=positive_float, help="epsilon to reach after all rounds")
    parser.add_argument("--sample-rate", type=probability, required=True, help="Poisson client sampling rate q")
    parser.add_argument("--rounds", type=positive_int, required=True, help="number of rounds")
    parser.add_argument("--delta", type=open_unit, default=1e-5, help="delta")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sigma = args.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise_multiplier(args.target_epsilon, args.delta, args.sample_rate, args.rounds)
    epsilon, order = epsilon_for(sigma, args.sample_rate, args.rounds, args.delta)
    grid_epsilon, _ = epsilon_for(sigma, args.sample_rate, args.rounds, args.delta, refine=False)
    table = Table(title="client-level DP (Poisson-subsampled Gaussian, RDP)")
    for column in ("noise multiplier", "sample rate", "rounds", "delta", "epsilon", "best order", "epsilon (Opacus grid)"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{sigma:.4f}", f"{args.sample_rate:g}", str(args.rounds), f"{args.delta:g}",
        f"{epsilon:.4f}", f"{order:.3f}", f"{grid_epsilon:.4f}",
    )  # fmt: skip
    Console().print(table)
    return 0
