"""``dpfl simulate``: a federation in simulation, with live progress."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dpfl.cli.audit import add_audit_options, audit_and_print
from dpfl.cli.display import ProgressDisplay, make_console
from dpfl.cli.options import (
    HelpFormatter, add_engine_options, add_output_option, add_run_options, add_tracking_option, node_config,
    settings_from_args,
)  # fmt: skip
from dpfl.errors import UsageError

# A run stopped by Ctrl-C or SIGTERM exits as a shell reports a SIGINT death.
INTERRUPTED_EXIT_CODE = 130
# What a resumed run may be given on the command line beside --resume.
RESUME_HINT = "dpfl simulate --resume {out} [--rounds N] [--max-epsilon E] [--engine ...]"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        usage="%(prog)s [OPTION ...]",
        help="run a DP federation in simulation (in-process, or Flower's local simulation)",
        description="Run a client-level DP federation in simulation, on the in-process engine or in Flower's "
        "local simulation (the same ServerApp and ClientApp as `flwr run .`), printing accuracy and epsilon "
        "after every round.",
        formatter_class=HelpFormatter,
    )
    add_run_options(parser)
    run = parser.add_argument_group("this command")
    run.add_argument("--deploy-node-config", dest="deploy_node_configs", action="append", default=[],
                     metavar="'KEY=VALUE ...'",
                     help="run config's proposal to simulated nodes for the deployment round (device-* and "
                     "compress-* keys only); repeat for several device types, assigned round robin by partition")  # fmt: skip
    run.add_argument("--node-config", dest="node_configs", action="append", default=[], type=node_config,
                     metavar="'KEY=VALUE ...'",
                     help="a simulated data owner's own node config, as flower-supernode --node-config takes it "
                     "(policy-*, share-accuracy, share-nf, node-dir, device-*; strings in double quotes); repeat "
                     "for several owners, assigned round robin by partition; never part of the run config")  # fmt: skip
    add_output_option(run, "<strategy>")
    run.add_argument("--resume", metavar="RUN_DIR", default=None,
                     help="continue the run in RUN_DIR from its last completed round, with its run config "
                     "(only --rounds, --max-epsilon and --round-timeout may change)")  # fmt: skip
    add_engine_options(run)
    run.add_argument("--download", action="store_true", help="download a torchvision dataset into --data-dir")
    add_tracking_option(run)
    run.add_argument("--audit", action="store_true",
                     help="then audit this configuration (`dpfl audit`: a second run with canary clients) into OUT/audit")  # fmt: skip
    add_audit_options(run)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from dpfl.engines.simulation import (
        FLOWER_LOG, SERVER_LOG, client_training, follow_rounds, prepare_run, run_simulation, run_warnings,
    )  # fmt: skip
    from dpfl.server.recorder import METRICS_FILE, SUMMARY_FILE, format_epsilon
    from dpfl.server.round_line import round_line
    from dpfl.settings import describe_recipe
    from dpfl.strategies import get_strategy_class
    from dpfl.task.models import DEPTH_SETTABLE

    if args.engine == "flower" and args.workers is not None:
        raise UsageError(f"--workers {args.workers} is for --engine in-process; Flower's engine runs its own workers")
    workers = args.workers or len(os.sched_getaffinity(0))
    settings = settings_from_args(args, args.strategy)
    training = client_training(settings, args.engine)
    out = Path(settings.out_dir)
    console = make_console()
    with ProgressDisplay(console) as progress:
        prepare_run(settings, args.download, progress)
    tracker = _tracker(args.tensorboard, out)
    out.mkdir(parents=True, exist_ok=True)
    for warning in run_warnings(settings):
        console.print(f"[bold red]WARNING[/]: {warning}")
    console.print(
        f"[bold]dpfl simulate[/]: {settings.strategy} on {settings.dataset} with {settings.model} "
        f"(width {settings.model_width}{f', depth {settings.model_depth}' if settings.model in DEPTH_SETTABLE else ''}), "
        f"{settings.num_clients} clients, q={settings.sample_rate}, "
        f"{settings.num_server_rounds} rounds, C={settings.clip_norm}, delta={settings.delta}, "
        f"budget epsilon={settings.max_epsilon or 'none'}, engine {args.engine}"
        + (f" ({workers} workers)" if args.engine == "in-process" else "")
        + f"\n  {training}"
        + f"\n  {describe_recipe(settings, get_strategy_class(settings.strategy).has_public_part())}"
        f"\n  records: {out}" + (f"\n  TensorBoard: {tracker.path}" if tracker else "")
        + (f"\n  Flower log: {out / FLOWER_LOG} (the server's own: {out / SERVER_LOG})" if args.engine == "flower" else "")
    )

    started = last = time.monotonic()

    def show(row: dict) -> None:
        # Timed here, for the operator: the public records hold no timings.
        nonlocal last
        now = time.monotonic()
        seconds, last = now - last, now
        progress(f"rounds ({settings.strategy})", row["round"], settings.num_server_rounds)
        console.print(f"{round_line(row, settings.num_server_rounds, settings.delta, settings.local_delta)}  {seconds:.1f} s",
                      highlight=False)  # fmt: skip
        if tracker:
            tracker.record(row)

    try:
        with ProgressDisplay(console) as progress, signals_interrupt():
            follow = follow_rounds(out / METRICS_FILE, show)
            failure = run_simulation(settings, args.engine, workers, follow, args.node_configs)
    except KeyboardInterrupt:
        console.print(f"[bold red]interrupted[/]: {_completed_rounds(out)}; resume with")
        console.print(f"  {RESUME_HINT.format(out=out)}", soft_wrap=True, markup=False, highlight=False)
        return INTERRUPTED_EXIT_CODE
    finally:
        if tracker:
            tracker.close()
    summary_file = out / SUMMARY_FILE
    if failure or not summary_file.exists():
        console.print(f"[red]the run failed[/]: {failure or 'no summary was written'}")
        return 1
    summary = json.loads(summary_file.read_text())
    epsilon = format_epsilon(summary["epsilon"])
    console.print(
        f"[bold]{summary['outcome']}[/]: {summary['rounds-completed']} rounds, final accuracy "
        f"{summary['final-accuracy']:.4f} (best {summary['best-accuracy']:.4f}), epsilon "
        f"{epsilon} at delta {summary['delta']:g}, sigma {summary['noise-multiplier']:.4f}, "
        f"{time.monotonic() - started:.0f} s\n  final model: {out / 'final_model.pt'}"
    )
    if settings.deploy and (code := _show_deployment(out, console)):
        return code
    if args.audit:
        audit_and_print(settings, args, out / "audit", console)
    return 0


def _tracker(log_dir: Path | None, out: Path):
    if not log_dir:
        return None
    from dpfl.server.tracking import TensorBoardTracker

    return TensorBoardTracker(log_dir, out.name)


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM as Ctrl-C: the engines' clean-up (stopping Flower's processes) runs for both."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _completed_rounds(out: Path) -> str:
    from dpfl.server.checkpoint import CHECKPOINT_FILE, load_run_checkpoint

    if not (out / CHECKPOINT_FILE).exists():
        return "no round was completed"
    return f"the checkpoint holds round {load_run_checkpoint(out).round}"


def _show_deployment(out: Path, console) -> int:
    from rich.console import Console

    from dpfl.deployment.federation import DEPLOYMENT_FILE, NOT_COVERED, TABLE_WIDTH, deployment_table
    from dpfl.engines.simulation import SERVER_LOG

    path = out / DEPLOYMENT_FILE
    if not path.exists():
        console.print(f"[red]the deployment round wrote no {DEPLOYMENT_FILE}[/]; see {out / SERVER_LOG}")
        return 1
    # A dozen columns: never squash them into a narrow console.
    Console(file=console.file, width=max(console.width, TABLE_WIDTH)).print(deployment_table(json.loads(path.read_text())))
    console.print(f"  {path} ({NOT_COVERED})")
    return 0
