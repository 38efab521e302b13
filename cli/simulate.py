"""``dpfl simulate``: a federation in Flower's local simulation, with live progress."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dpfl.cli.options import non_negative_float, open_unit, positive_float, positive_int, probability
from dpfl.client.node import parse_node_config
from dpfl.engines.simulation import ENGINES, FLOWER_LOG, prepare_run, resumed_settings, run_simulation, run_warnings
from dpfl.errors import UsageError
from dpfl.server.recorder import METRICS_FILE, SUMMARY_FILE, format_epsilon, holds_run
from dpfl.settings import RunSettings, describe_recipe
from dpfl.strategies import get_strategy_class
from dpfl.task.models import DEPTH_SETTABLE
from dpfl.task.recipes import UNSET

DEFAULTS = RunSettings()
# A run stopped by Ctrl-C or SIGTERM exits as a shell reports a SIGINT death.
INTERRUPTED_EXIT_CODE = 130
# (flag, settings field, type, help): every flag sets the run-config key of that field.
OPTIONS = [
    ("--rounds", "num_server_rounds", positive_int, "federated rounds"),
    ("--clients", "num_clients", positive_int, "clients (simulated SuperNodes), each with one partition"),
    ("--strategy", "strategy", str, "strategy name (`dpfl strategies` lists them)"),
    ("--model", "model", str, "resnet10, resnet18, vit or cnn"),
    ("--width", "model_width", positive_int, "channels of the model's first stage"),
    ("--depth", "model_depth", positive_int, "the vit's encoder blocks (a convolutional model's depth is in its name)"),
    ("--dataset", "dataset", str, "digits (bundled), cifar10, cifar100, mnist, fashion-mnist, imagefolder"),
    ("--data-dir", "data_dir", str, "folder of a downloaded or imagefolder dataset"),
    ("--image-size", "image_size", int, "resize images to this size (0 = the dataset's own)"),
    ("--partition", "partition", str, "iid or dirichlet"),
    ("--validation-fraction", "validation_fraction", non_negative_float, "share of the server's held-out data used as its validation set (0 = none)"),
    ("--alpha", "dirichlet_alpha", positive_float, "Dirichlet concentration of the label skew"),
    ("--clip", "clip_norm", positive_float, "clip norm C of each client's private update (the initial C under --clip-mode adaptive)"),
    ("--clip-mode", "clip_mode", str, "fixed (C = --clip) or adaptive (C starts at --clip and tracks --target-quantile)"),
    ("--target-quantile", "target_quantile", probability, "adaptive clipping: fraction of updates left unclipped"),
    ("--clip-lr", "clip_lr", positive_float, "adaptive clipping: rate of the geometric update of C"),
    ("--clip-count-noise", "clip_count_noise", non_negative_float,
     "adaptive clipping: noise std on the clipped count (0 = expected clients / 20, raised so sigma grows <= 5%%)"),
    ("--sample-rate", "sample_rate", probability, "Poisson client sampling rate q"),
    ("--delta", "delta", open_unit, "delta of the (epsilon, delta) guarantee"),
    ("--max-epsilon", "max_epsilon", non_negative_float, "stop before a round would exceed this epsilon (0 = no budget)"),
    ("--noise", "noise_placement", str, "add the noise on the 'server' or split it across sampled 'client's"),
    ("--accountant", "accountant", str, "rdp, prv or pld: how the client-level epsilon is computed"),
    ("--clipping", "clipping", str, "flat (sound DP) or paper (the DP-FedPGN authors' code's clipping: NO DP guarantee)"),
    ("--reproducible-noise", "reproducible_noise", bool,
     "derive the privacy noise and client sampling from --seed, for debugging and exact reproduction: epsilon NOT valid"),
    ("--round-timeout", "round_timeout", positive_float, "seconds to wait for a round's replies; later ones are left out"),
    ("--min-replies", "min_replies", int,
     "skip a round's update (still accounted) when its noisy count of replies is below this (0 = never)"),
    ("--reply-count-noise", "reply_count_noise", positive_float,
     "std of the noise on the reply count (with --min-replies; must exceed sigma, whose cost it shares)"),
    ("--lr", "lr", positive_float, "initial local learning rate"),
    ("--lr-decay", "lr_decay", positive_float, "learning-rate decay per round"),
    ("--local-epochs", "local_epochs", positive_int, "local epochs over a nominal client's data"),
    ("--client-size", "client_size", int,
     "examples of a nominal client, from which the public number of local steps follows (0 = the data set's published size / clients)"),
    ("--batch-size", "batch_size", positive_int, "local batch size"),
    ("--weight-decay", "weight_decay", non_negative_float, "local weight decay"),
    ("--grad-clip", "grad_clip", positive_float, "per-step clip of the raw local gradient (stability, not DP)"),
    ("--train-bit-widths", "train_bit_widths", str,
     "multi-precision training: local steps also take the forward at these weight bits, e.g. 2,4 (docs/cim.md)"),
    ("--server-optimizer", "server_optimizer", str,
     "how the server applies the released mean update: sgd, momentum or adam (post-processing, no privacy cost)"),
    ("--server-lr", "server_lr", positive_float, "the server optimizer's learning rate (sgd at 1 is plain FedAvg)"),
    ("--local-dp", "local_dp", bool, "also sample-level DP-SGD inside each client (Opacus), reporting its cumulative epsilon"),
    ("--local-noise", "local_noise_multiplier", positive_float, "noise multiplier of each client's DP-SGD (with --local-dp)"),
    ("--local-clip", "local_clip", positive_float, "per-sample gradient clip norm of each client's DP-SGD (with --local-dp)"),
    ("--local-delta", "local_delta", open_unit, "delta of each client's sample-level epsilon (with --local-dp)"),
    ("--deploy", "deploy", bool,
     "after training, every node compresses the final model with its own data and runs it on its own simulated CIM device"),
    ("--deploy-clients", "deploy_clients", int, "deploy on this many nodes, chosen at random (0 = every node)"),
    ("--deploy-method", "deploy_method", str, "nodes' compression: tucker2, cpd or svd (a node config may override)"),
    ("--deploy-norm", "deploy_norm", str, "nodes' compression norm: sigma or frobenius (a node config may override)"),
    ("--deploy-ratio", "deploy_ratio", positive_float, "fraction of parameters the nodes keep, in (0, 1)"),
    ("--deploy-mapping", "deploy_mapping", str, "crossbar mapping deployed: naive or mdm (a node config may override)"),
    ("--deploy-mode", "deploy_mode", str, "analog inference: auto (exact, or fast under read noise), exact, fast or ideal"),
    ("--deploy-holdout", "deploy_holdout", probability, "fraction of each node's data held out for evaluation"),
    ("--deploy-sweep-tiles", "deploy_sweep_tiles", str, "tile sizes of each node's NF sweep beside its own, comma-separated (default: none)"),
    ("--pretraining", "pretraining", str, "initial weights: none (random), fractal or strokes (public synthetic pretraining, cached)"),
    ("--seed", "seed", int, "seed of model init, partitions and local shuffling (never of the privacy noise or sampling)"),
    ("--init-from", "init_from", str,
     "start from this checkpoint's weights (a run folder, checkpoint.pt or final_model.pt), carrying its privacy ledger"),
    ("--init-new-data", "init_new_data", bool,
     "with --init-from: this run's clients hold other data, so no ledger is carried (needed for a checkpoint without one)"),
]
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


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Every run-configuration flag: :data:`OPTIONS`, σ or the target ε, the strategy's options."""
    for option in OPTIONS:
        add_option(parser, *option)
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--noise-multiplier", type=positive_float, default=None,
                       help="noise multiplier sigma (instead of calibrating it to --target-epsilon)")  # fmt: skip
    noise.add_argument("--target-epsilon", type=positive_float, default=None,
                       help=f"calibrate sigma so that all rounds together spend this epsilon (default {DEFAULTS.target_epsilon})")  # fmt: skip
    parser.add_argument("--strategy-option", dest="strategy_options", action="append", default=[],
                        metavar="KEY=VALUE", help="an option of the strategy (repeatable; `dpfl strategies` lists them)")  # fmt: skip


def add_option(parser: argparse.ArgumentParser, flag: str, field: str, kind: Callable, text: str) -> None:
    """One OPTIONS entry as an argument; a bool field is a switch (with its --no- form)."""
    if kind is bool:
        parser.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=getattr(DEFAULTS, field), help=text)
    else:
        if field in UNSET:  # the sentinel, so that the model's recipe fills it
            text += " (default: the model's recipe)"
        parser.add_argument(flag, dest=field, type=kind, default=UNSET.get(field, getattr(DEFAULTS, field)), help=text)


def option_values(args: argparse.Namespace, given_only: bool = False) -> dict:
    """The run settings the options set; ``given_only``: only those that differ from their defaults."""
    values = {field: getattr(args, field) for _, field, _, _ in OPTIONS}
    if given_only:
        values = {field: value for field, value in values.items() if value != UNSET.get(field, getattr(DEFAULTS, field))}
    if args.strategy_options or not given_only:
        values["strategy_options"] = " ".join(args.strategy_options)
    if args.deploy_node_configs or not given_only:
        values["deploy_node_configs"] = "; ".join(args.deploy_node_configs)
    if args.target_epsilon is not None:
        values["target_epsilon"] = args.target_epsilon
    elif args.noise_multiplier is not None:
        values.update(noise_multiplier=args.noise_multiplier, target_epsilon=0.0)
    return values


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    if args.resume:
        run_dir = Path(args.resume).expanduser().resolve()
        if args.out and Path(args.out).expanduser().resolve() != run_dir:
            raise UsageError(f"--resume continues in {str(run_dir)!r}; leave out --out (got {args.out!r})")
        settings = resumed_settings(run_dir, option_values(args, given_only=True))
    else:
        out = Path(args.out or f"runs/{args.strategy}-{datetime.now():%Y%m%d-%H%M%S}").expanduser().resolve()
        if holds_run(out):
            raise UsageError(f"output folder {str(out)!r} already holds a run; choose another --out, or --resume it")
        values = option_values(args)
        if values["init_from"]:  # the ServerApp may run in another folder
            values["init_from"] = str(Path(values["init_from"]).expanduser().resolve())
        settings = dataclasses.replace(DEFAULTS, **values, out_dir=str(out))
        settings.validate()
    settings = get_strategy_class(settings.strategy).resolved_settings(settings)
    prepare_run(settings, args.download)
    return settings


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
