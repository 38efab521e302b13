"""``dpfl privacy``: ε of a planned federation, or the σ for a target ε, per accountant."""

from __future__ import annotations

import argparse
import json

from dpfl.cli.display import make_console
from dpfl.cli.options import HelpFormatter, open_unit, positive_float, positive_int, probability
from dpfl.privacy.accountants import ACCOUNTANTS
from dpfl.privacy.names import NOISE_MECHANISMS, PARTICIPATIONS

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
    parser.add_argument("--mechanism", choices=[*NOISE_MECHANISMS, ALL], default="gaussian",
                        help="noise: independent gaussian; correlated bandmf, tree or blt (need a participation schema; "
                        "tree and blt are never amplified); or all of them side by side (with the Poisson gaussian as "
                        "the baseline)")
    parser.add_argument("--participation", choices=PARTICIPATIONS, default="poisson",
                        help="who takes part when: poisson (rate q every round), cyclic or min-sep (--min-separation)")
    parser.add_argument("--min-separation", type=positive_int, default=1,
                        help="b: rounds between two participations of a client (cyclic, min-sep); bandmf's band")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list, for scripts")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from dpfl.privacy.calibration import privacy_spent

    from dpfl.errors import UsageError
    from dpfl.privacy.participation import ParticipationSchema

    names = list(ACCOUNTANTS) if args.accountant == ALL else [args.accountant]
    mechanisms = list(NOISE_MECHANISMS) if args.mechanism == ALL else [args.mechanism]
    schemas = []
    if args.mechanism == ALL and args.participation != "poisson":
        schemas.append(None)  # the baseline: Poisson sampling, independent noise
    for mechanism in mechanisms:
        if args.participation == "poisson" and mechanism == "gaussian":
            schemas.append(None)
        elif args.participation != "poisson" or args.mechanism != ALL:
            try:
                schemas.append(ParticipationSchema(args.participation, args.min_separation, args.rounds, mechanism))
            except ValueError as err:
                raise UsageError(str(err)) from None
    rows = [privacy_spent(name, args.sample_rate, args.rounds, args.delta, noise_multiplier=args.noise_multiplier,
                          target_epsilon=args.target_epsilon, schema=schema)
            for schema in schemas for name in names]  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="client-level DP")
    for column in ("accountant", "noise multiplier", "sample rate", "rounds", "delta", "epsilon", "best RDP order",
                   "last-iterate epsilon\n(heuristic)", "mechanism", "participation\n(min-separation)",
                   "accounted\nsteps", "model noise\n(rms, C/N)"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in rows:
        order, last_iterate = row["best-rdp-order"], row["last-iterate-epsilon"]
        participation = row["participation"] + ("" if row["participation"] == "poisson" else f" ({row['min-separation']})")
        table.add_row(
            row["accountant"], f"{row['noise-multiplier']:.4f}", f"{row['sample-rate']:g}", str(row["rounds"]),
            f"{row['delta']:g}", f"{row['epsilon']:.4f}", "" if order is None else f"{order:.3f}",
            "" if last_iterate is None else f"{last_iterate:.4f}", row["mechanism"], participation,
            str(row["accounted-steps"]), f"{row['model-noise']:.4g}",
        )  # fmt: skip
    console = make_console()
    console.print(table)
    console.print("epsilon is the accountant's guarantee for anyone who sees every round's model. The last-iterate "
                  "epsilon (Steinke et al., ICLR 2025) is a heuristic, not a guarantee, for who sees only the final "
                  "model: exact when every client's update is the same vector each round it is sampled. Under a "
                  "participation schema the accountant composes one step per block of min-separation rounds "
                  "(cyclic: Poisson-sampled, amplified for gaussian and bandmf; min-sep, and tree or blt under "
                  "cyclic: not amplified); model noise is the RMS std of "
                  "the noise in the model over the rounds, per coordinate, in units of C/N (docs/privacy.md).")  # fmt: skip
    return 0
