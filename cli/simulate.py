"""``dpfl simulate``: a federation in Flower's local simulation, with live progress."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dpfl.cli.options import non_negative_float, open_unit, positive_float, positive_int, probability
from dpfl.errors import UsageError
from dpfl.server.recorder import METRICS_FILE, SUMMARY_FILE, holds_run
from dpfl.settings import RunSettings

DEFAULTS = RunSettings()
FLOWER_LOG = "flower.log"
# (flag, settings field, type, help): every flag sets the run-config key of that field.
OPTIONS = [
    ("--rounds", "num_server_rounds", positive_int, "federated rounds"),
    ("--clients", "num_clients", positive_int, "clients (simulated SuperNodes), each with one partition"),
    ("--strategy", "strategy", str, "strategy name (`dpfl strategies` lists them)"),
    ("--model", "model", str, "resnet10, resnet18, vit or cnn"),
    ("--width", "model_width", positive_int, "channels of the model's first stage"),
    ("--dataset", "dataset", str, "digits (bundled), cifar10, cifar100, mnist, fashion-mnist, imagefolder"),
    ("--data-dir", "data_dir", str, "folder of a downloaded or imagefolder dataset"),
    ("--image-size", "image_size", int, "resize images to this size (0 = the dataset's own)"),
    ("--partition", "partition", str, "iid or dirichlet"),
    ("--alpha", "dirichlet_alpha", positive_float, "Dirichlet concentration of the label skew"),
    ("--clip", "clip_norm", positive_float, "clip norm C of each client's private update"),
    ("--sample-rate", "sample_rate", probability, "Poisson client sampling rate q"),
    ("--delta", "delta", open_unit, "delta of the (epsilon, delta) guarantee"),
    ("--max-epsilon", "max_epsilon", non_negative_float, "stop before a round would exceed this epsilon (0 = no budget)"),
    ("--noise", "noise_placement", str, "add the noise on the 'server' or split it across sampled 'client's"),
    ("--lr", "lr", positive_float, "initial local learning rate"),
    ("--lr-decay", "lr_decay", positive_float, "learning-rate decay per round"),
    ("--local-epochs", "local_epochs", positive_int, "local epochs over a nominal client's data"),
    ("--batch-size", "batch_size", positive_int, "local batch size"),
    ("--weight-decay", "weight_decay", non_negative_float, "local weight decay"),
    ("--grad-clip", "grad_clip", positive_float, "per-step clip of the raw local gradient (stability, not DP)"),
    ("--gamma", "gamma", probability, "DP-FedPGN: weight of the local gradient in each step"),
    ("--seed", "seed", int, "seed of model init, partitions, sampling and noise"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="run a DP federation in Flower's local simulation",
        description="Run a client-level DP federation in Flower's local simulation (the same ServerApp "
        "and ClientApp as `flwr run .`), printing accuracy and epsilon after every round.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flag, field, kind, text in OPTIONS:
        parser.add_argument(flag, dest=field, type=kind, default=getattr(DEFAULTS, field), help=text)
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--noise-multiplier", type=positive_float, default=None,
                       help="noise multiplier sigma (instead of calibrating it to --target-epsilon)")  # fmt: skip
    noise.add_argument("--target-epsilon", type=positive_float, default=None,
                       help=f"calibrate sigma so that all rounds together spend this epsilon (default {DEFAULTS.target_epsilon})")  # fmt: skip
    parser.add_argument("--out", default=None, help="output folder (default runs/<strategy>-<time>)")
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    values = {field: getattr(args, field) for _, field, _, _ in OPTIONS}
    if args.target_epsilon is not None:
        values["target_epsilon"] = args.target_epsilon
    elif args.noise_multiplier is not None:
        values.update(noise_multiplier=args.noise_multiplier, target_epsilon=0.0)
    out = Path(args.out or f"runs/{args.strategy}-{datetime.now():%Y%m%d-%H%M%S}").expanduser().resolve()
    if holds_run(out):
        raise UsageError(f"output folder {str(out)!r} already holds a run; choose another --out")
    settings = dataclasses.replace(DEFAULTS, **values, out_dir=str(out))
    settings.validate()
    from dpfl.client.data import cached_dataset
    from dpfl.strategies import get_strategy_class
    from dpfl.task.partition import partition_indices

    get_strategy_class(settings.strategy)
    # Fail here, in one line, rather than inside every simulated node.
    data = cached_dataset(settings.dataset, settings.data_dir, settings.image_size)
    partition_indices(data.train_labels, settings.num_clients, settings.partition, settings.dirichlet_alpha, settings.seed)
    return settings


def run(args: argparse.Namespace) -> int:
    from dpfl.server.local_federation import FederationError, simulation

    settings = settings_from_args(args)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    console.print(
        f"[bold]dpfl simulate[/]: {settings.strategy} on {settings.dataset} with {settings.model} "
        f"(width {settings.model_width}), {settings.num_clients} clients, q={settings.sample_rate}, "
        f"{settings.num_server_rounds} rounds, C={settings.clip_norm}, delta={settings.delta}, "
        f"budget epsilon={settings.max_epsilon or 'none'}\n  records: {out}\n  Flower log: {out / FLOWER_LOG}"
    )
    try:
        with simulation(settings, settings.num_clients, out / FLOWER_LOG) as flower:
            follow_metrics(out / METRICS_FILE, flower, settings, console)
    except FederationError as err:
        console.print(f"[red]Flower failed[/]: {err}")
        return 1
    summary_file = out / SUMMARY_FILE
    if not summary_file.exists():
        tail = (out / FLOWER_LOG).read_text(errors="replace").strip().splitlines()[-15:]
        console.print("[red]the run failed[/]; last lines of the Flower log:\n" + "\n".join(tail))
        return 1
    summary = json.loads(summary_file.read_text())
    console.print(
        f"[bold]{summary['outcome']}[/]: {summary['rounds-completed']} rounds, final accuracy "
        f"{summary['final-accuracy']:.4f} (best {summary['best-accuracy']:.4f}), epsilon "
        f"{summary['epsilon']:.3f} at delta {summary['delta']:g}, sigma {summary['noise-multiplier']:.4f}, "
        f"{summary['wall-time']:.0f} s\n  final model: {out / 'final_model.pt'}"
    )
    return 0


def follow_metrics(path: Path, flower, settings: RunSettings, console: Console) -> None:
    """Show each round as the ServerApp writes it, until the Flower run ends."""
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("starting Flower", total=settings.num_server_rounds)
        offset = 0
        while True:
            finished = flower.poll() is not None
            if path.exists():
                with path.open() as metrics:
                    metrics.seek(offset)
                    for line in iter(metrics.readline, ""):
                        if not line.endswith("\n"):
                            break
                        offset += len(line)
                        _show_round(json.loads(line), settings, progress, task)
            if finished:
                return
            time.sleep(0.5)


def _show_round(row: dict, settings: RunSettings, progress: Progress, task) -> None:
    progress.update(task, completed=row["round"], description=f"round {row['round']}")
    progress.console.print(
        f"round {row['round']:>3}/{settings.num_server_rounds}  accuracy {row['accuracy']:.4f}  "
        f"loss {row['loss']:.4f}  epsilon {row['epsilon']:.3f}  clients {row['sampled']:>3}  "
        f"{row['round-time']:.1f} s"
    )
