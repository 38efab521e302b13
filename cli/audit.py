"""``dpfl audit``: the accountant's ε of a run configuration beside an empirical lower bound."""

from __future__ import annotations

import argparse
import math
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dpfl.cli.options import open_unit, positive_int
from dpfl.cli.simulate import add_run_options, settings_from_args

DEFAULT_CANARIES = 128
DEFAULT_CONFIDENCE = 0.95


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="audit a run configuration: accountant epsilon vs an empirical lower bound",
        description="Run the configured federation (the same ServerApp, strategy, mechanism and ClientApp as "
        "`dpfl simulate`, on the in-process engine) with canary clients, each present with probability 1/2, "
        "and bound epsilon from below from the released models (Steinke, Nasr & Jagielski 2023, one run). "
        "A lower bound above the accountant's epsilon means the code does not implement the mechanism it claims.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_audit_options(parser)
    add_run_options(parser)
    parser.add_argument("--out", default=None, help="output folder (default runs/audit-<time>)")
    parser.set_defaults(func=run, deploy_node_configs=[], node_configs=[], download=False, resume=None)


def add_audit_options(parser: argparse.ArgumentParser) -> None:
    """--canaries and --confidence (also used by `dpfl simulate --audit`)."""
    parser.add_argument("--canaries", type=positive_int, default=DEFAULT_CANARIES,
                        help="canary clients, each present with probability 1/2")  # fmt: skip
    parser.add_argument("--confidence", type=open_unit, default=DEFAULT_CONFIDENCE,
                        help="confidence of the audited lower bound")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    args.out = args.out or f"runs/audit-{datetime.now():%Y%m%d-%H%M%S}"
    settings = settings_from_args(args)
    console = Console()
    console.print(f"[bold]dpfl audit[/]: {settings.strategy}, {settings.num_clients} clients + {args.canaries} "
                  f"canaries (each present with probability 1/2), {settings.num_server_rounds} rounds; "
                  f"records: {settings.out_dir}")  # fmt: skip
    audit_and_print(settings, args.canaries, args.confidence, Path(settings.out_dir), console)
    return 0


def audit_and_print(settings, canaries: int, confidence: float, out: Path, console: Console) -> None:
    """Run the audit of ``settings`` into ``out`` and print its table and files."""
    from dpfl.analysis.audit import AUDIT_FILE, AUDIT_PLOT, run_audit

    report = run_audit(settings, canaries, confidence, out)
    print_audit(report, console)
    console.print(f"  {out / AUDIT_FILE}\n  plot: {out / AUDIT_PLOT}")


def print_audit(report, console: Console) -> None:
    """The accountant's ε and the audited lower bound side by side, with how the bound was reached."""
    bound = report.bound
    table = Table(title=f"client-level privacy of {report.strategy} (delta {report.delta:g})")
    for column in ("epsilon\n(accountant)", f"epsilon lower\nbound ({bound.confidence:.0%})", "sigma", "rounds",
                   "canaries\n(present)", "guesses\n+/-", "correct"):  # fmt: skip
        table.add_column(column, justify="right")
    accountant = f"{report.accountant_epsilon:.3f}" if math.isfinite(report.accountant_epsilon) else "not valid"
    table.add_row(
        accountant, f"{bound.epsilon_lower:.3f}", f"{report.noise_multiplier:.4f}", str(report.rounds),
        f"{bound.canaries} ({bound.included})", f"{bound.positive_guesses}/{bound.negative_guesses}",
        f"{bound.correct} of {bound.positive_guesses + bound.negative_guesses}",
    )  # fmt: skip
    console.print(table)
    if math.isfinite(report.accountant_epsilon) and bound.epsilon_lower > report.accountant_epsilon:
        console.print("[bold red]the audited lower bound exceeds the accountant's epsilon: the mechanism as run "
                      "leaks more than it claims[/]")  # fmt: skip
