"""``dpfl simulate``: a federation in Flower's local simulation, with live progress."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dpfl.cli.options import positive_int
from dpfl.cli.run_options import add_run_options, settings_from_args
from dpfl.client.node import parse_node_config
from dpfl.engines.simulation import ENGINES, FLOWER_LOG, run_simulation, run_warnings
from dpfl.errors import UsageError
from dpfl.server.recorder import METRICS_FILE, SUMMARY_FILE, format_epsilon
from dpfl.settings import RunSettings, describe_recipe
from dpfl.strategies import get_strategy_class
from dpfl.task.models import DEPTH_SETTABLE

# A run stopped by Ctrl-C or SIGTERM exits as a shell reports a SIGINT death.
INTERRUPTED_EXIT_CODE = 130
# What a resumed run may be given on the command line beside --resume.
RESUME_HINT = "dpfl simulate --resume {out} [--rounds N] [--max-epsilon E] [--engine ...]"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="run a DP federation in simulation (in-process, or Flower's local simulation)",
        description="Run a client-level DP federation in simulation, on the in-process engine or in Flower's "
        "local simulation (the same ServerApp and ClientApp as `flwr run .`), printing accuracy and epsilon "
        "after every round.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_options(parser)
    parser.add_argument("--deploy-node-config", dest="deploy_node_configs", action="append", default=[],
                        metavar="'KEY=VALUE ...'",
                        help="run config's proposal to simulated nodes for the deployment round (device-* and "
                        "compress-* keys only); repeat for several device types, assigned round robin by partition")  # fmt: skip
    parser.add_argument("--node-config", dest="node_configs", action="append", default=[], type=parse_node_config,
                        metavar="'KEY=VALUE ...'",
                        help="a simulated data owner's own node config, as flower-supernode --node-config takes it "
                        "(policy-*, share-accuracy, share-nf, node-dir, device-*; strings in double quotes); repeat "
                        "for several owners, assigned round robin by partition; never part of the run config")  # fmt: skip
    parser.add_argument("--out", default=None, help="output folder (default runs/<strategy>-<time>)")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue the run in RUN_DIR from its last completed round, with its run config "
                        "(only --rounds, --max-epsilon and --round-timeout may change)")  # fmt: skip
    parser.add_argument("--engine", choices=ENGINES, default="in-process",
                        help="in-process: the same apps in this process (and its --workers), without Flower's "
                        "per-message costs; flower: Flower's local simulation (SuperLink, Ray)")  # fmt: skip
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="in-process engine: worker processes that train a round's clients in parallel "
                        "(default: the usable cores; the result does not depend on it)")  # fmt: skip
    parser.add_argument("--download", action="store_true", help="download a torchvision dataset into --data-dir")
    parser.add_argument("--audit", action="store_true",
                        help="then audit this configuration (`dpfl audit`: a second run with canary clients) into OUT/audit")  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.engine == "flower" and args.workers is not None:
        raise UsageError(f"--workers {args.workers} is for --engine in-process; Flower's engine runs its own workers")
    workers = args.workers or len(os.sched_getaffinity(0))
    settings = settings_from_args(args)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    for warning in run_warnings(settings):
        console.print(f"[bold red]WARNING[/]: {warning}")
    console.print(
        f"[bold]dpfl simulate[/]: {settings.strategy} on {settings.dataset} with {settings.model} "
        f"(width {settings.model_width}{f', depth {settings.model_depth}' if settings.model in DEPTH_SETTABLE else ''}), "
        f"{settings.num_clients} clients, q={settings.sample_rate}, "
        f"{settings.num_server_rounds} rounds, C={settings.clip_norm}, delta={settings.delta}, "
        f"budget epsilon={settings.max_epsilon or 'none'}, engine {args.engine}"
        + (f" ({workers} workers)" if args.engine == "in-process" else "")
        + f"\n  {describe_recipe(settings, get_strategy_class(settings.strategy).has_public_part())}"
        f"\n  records: {out}"
    )
    if args.engine == "flower":
        console.print(f"  Flower log: {out / FLOWER_LOG}")
    started = time.monotonic()
    try:
        with signals_interrupt():
            failure = run_simulation(settings, args.engine, workers, lambda running: follow_metrics(
                out / METRICS_FILE, running, settings, console), args.node_configs)
    except KeyboardInterrupt:
        console.print(f"[bold red]interrupted[/]: {_completed_rounds(out)}; resume with\n  {RESUME_HINT.format(out=out)}")
        return INTERRUPTED_EXIT_CODE
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
        from dpfl.cli.audit import DEFAULT_CANARIES, DEFAULT_CONFIDENCE, audit_and_print

        audit_and_print(settings, DEFAULT_CANARIES, DEFAULT_CONFIDENCE, out / "audit", console)
    return 0


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


def _show_deployment(out: Path, console: Console) -> int:
    from dpfl.deployment.federation import DEPLOYMENT_FILE, NOT_COVERED, TABLE_WIDTH, deployment_table

    path = out / DEPLOYMENT_FILE
    if not path.exists():
        console.print(f"[red]the deployment round wrote no {DEPLOYMENT_FILE}[/]; see {out / FLOWER_LOG}")
        return 1
    # A dozen columns: never squash them into a narrow (or non-terminal, 80-column) console.
    Console(file=console.file, width=max(console.width, TABLE_WIDTH)).print(deployment_table(json.loads(path.read_text())))
    console.print(f"  {path} ({NOT_COVERED})")
    return 0


def follow_metrics(path: Path, running: Callable[[], bool], settings: RunSettings, console: Console) -> None:
    """Show each round as the ServerApp writes it, until the run ends."""
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("starting Flower", total=settings.num_server_rounds)
        offset, last = 0, time.monotonic()
        while True:
            finished = not running()
            if path.exists():
                with path.open() as metrics:
                    metrics.seek(offset)
                    for line in iter(metrics.readline, ""):
                        if not line.endswith("\n"):
                            break
                        offset += len(line)
                        # Timed here, for the operator: the public records hold no timings.
                        now = time.monotonic()
                        _show_round(json.loads(line), settings, progress, task, now - last)
                        last = now
            if finished:
                return
            time.sleep(0.5)


def _show_round(row: dict, settings: RunSettings, progress: Progress, task, seconds: float) -> None:
    progress.update(task, completed=row["round"], description=f"round {row['round']}")
    progress.console.print(
        f"round {row['round']:>3}/{settings.num_server_rounds}  accuracy {row['accuracy']:.4f}  "
        f"loss {row['loss']:.4f}  epsilon {format_epsilon(row['epsilon'])}  {seconds:.1f} s"
        + (f"  local epsilon (nominal client, every round) {row['local-epsilon-nominal']:.3f}"
           if "local-epsilon-nominal" in row else "")
    )
