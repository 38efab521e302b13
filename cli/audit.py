"""``dpfl audit``: the accountant's ε of a run configuration beside an empirical lower bound.

The audit's own options are added by :func:`add_audit_options` and read by
:func:`audit_and_print`, which ``dpfl simulate --audit`` shares: a new audit option
needs a line in each, nothing in ``simulate``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from dpfl.cli.display import ProgressDisplay, make_console
from dpfl.cli.options import HelpFormatter, add_output_option, add_run_options, open_unit, positive_int, settings_from_args

DEFAULT_CANARIES = None  # the library's default for the threat model
DEFAULT_CONFIDENCE = 0.95
DEFAULT_THREAT = "white-box"
DEFAULT_STATISTIC = "gaussian"
# Kept here (not imported from the analysis layer) so that `dpfl --help` stays light.
THREATS = ("white-box", "final-model")
STATISTICS = ("threshold", "gaussian", "fdp")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit",
        usage="%(prog)s [OPTION ...]",
        help="audit a run configuration: accountant epsilon vs an empirical lower bound",
        description="Run the configured federation (the same ServerApp, strategy, mechanism and ClientApp as "
        "`dpfl simulate`, on the in-process engine) with canary clients, each present with probability 1/2, "
        "and bound epsilon from below from the released models in one run; beside it, the accountant's "
        "epsilon, the last-iterate heuristic and Andrew et al.'s one-shot estimate. A lower bound above the "
        "accountant's epsilon means the code does not implement the mechanism it claims.",
        formatter_class=HelpFormatter,
    )
    audit = parser.add_argument_group("the audit")
    add_audit_options(audit)
    add_output_option(audit, "audit")
    add_run_options(parser)
    parser.set_defaults(func=run, deploy_node_configs=[], node_configs=[])


def add_audit_options(parser: argparse.ArgumentParser) -> None:
    """The audit's options (also those of `dpfl simulate --audit`)."""
    parser.add_argument("--canaries", type=positive_int, default=DEFAULT_CANARIES, metavar="N",
                        help="canary clients, each present with probability 1/2 (default: white-box 2000 or one per "
                        "model parameter if fewer, final-model 500; white-box: at most the model's parameters)")  # fmt: skip
    parser.add_argument("--confidence", type=open_unit, default=DEFAULT_CONFIDENCE, metavar="X",
                        help="confidence of the audited lower bound")  # fmt: skip
    parser.add_argument("--threat", choices=THREATS, default=DEFAULT_THREAT,
                        help="white-box: the auditor sees every round's model and each canary sends a crafted update "
                        "in its own direction whenever sampled; final-model: the auditor sees only the last model "
                        "and each canary is a client holding one crafted example")  # fmt: skip
    parser.add_argument("--statistic", choices=STATISTICS, default=DEFAULT_STATISTIC,
                        help="threshold: Steinke et al.'s one-run bound (any mechanism); fdp: Mahloujifar et al.'s, "
                        "against the Gaussian trade-off curve; gaussian: the Gaussian pair of included and excluded "
                        "canaries' scores (tightest, assumes Gaussian scores)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from dpfl.engines.simulation import prepare_run

    settings = settings_from_args(args, "audit")
    console = make_console()
    with ProgressDisplay(console) as progress:
        prepare_run(settings, progress=progress)
    console.print(f"[bold]dpfl audit[/]: {settings.strategy}, {settings.num_clients} clients + "
                  f"{args.canaries or 'the default number of'} {args.threat} canaries (each present with probability "
                  f"1/2), {settings.num_server_rounds} rounds; records: {settings.out_dir}")  # fmt: skip
    audit_and_print(settings, args, Path(settings.out_dir), console)
    return 0


def audit_and_print(settings, args: argparse.Namespace, out: Path, console) -> None:
    """Run the audit of ``settings`` with the audit options in ``args`` into ``out``; print its table and files."""
    from dpfl.analysis.audit import AUDIT_FILE, AUDIT_PLOT, AuditOptions, run_audit

    options = AuditOptions(args.canaries, args.confidence, args.threat, args.statistic)
    with ProgressDisplay(console) as progress:
        report = run_audit(settings, options, out, progress=progress)
    print_audit(report, console)
    console.print(f"  {out / AUDIT_FILE}\n  plot: {out / AUDIT_PLOT}")


def print_audit(report, console) -> None:
    """The accountant's ε, the last-iterate heuristic, the audited lower bound and the estimate side by side."""
    from rich.table import Table

    bound = report.bound
    table = Table(title=f"client-level privacy of {report.strategy} (delta {report.delta:g}), {report.threat} audit")
    for column in ("epsilon\n(accountant)", "epsilon last\niterate\n(heuristic)",
                   f"epsilon lower\nbound ({bound.confidence:.0%},\n{report.statistic})", "epsilon\none-shot\nestimate",
                   "sigma", "rounds", "canaries\n(present)", "how"):  # fmt: skip
        table.add_column(column, justify="right", overflow="fold")  # numbers wrap, never cut
    table.add_row(
        _epsilon(report.accountant_epsilon), _epsilon(report.last_iterate_epsilon), f"{bound.epsilon_lower:.3f}",
        f"{report.estimate.epsilon:.3f}", f"{report.noise_multiplier:.4f}", str(report.rounds),
        f"{bound.canaries} ({bound.included})", bound.describe(),
    )  # fmt: skip
    console.print(table)
    others = ", ".join(f"{name} {other.epsilon_lower:.3f}" for name, other in report.bounds.items() if name != report.statistic)
    console.print(f"  other statistics' lower bounds ({bound.confidence:.0%}): {others}")
    if report.flagged:
        console.print("[bold red]the audited lower bound exceeds the accountant's epsilon: the mechanism as run "
                      "leaks more than it claims[/]")  # fmt: skip


def _epsilon(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "not valid"
