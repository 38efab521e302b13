"""The run-configuration options that `dpfl simulate`, `dpfl audit` and `dpfl compare` share, and
the run settings they give. Kept apart from :mod:`dpfl.cli.options` (argument types only), which the
docker entrypoint imports without the library."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from dpfl.cli.options import non_negative_float, open_unit, positive_float, positive_int, probability
from dpfl.engines.simulation import prepare_run, resumed_settings
from dpfl.errors import UsageError
from dpfl.server.recorder import holds_run
from dpfl.settings import RunSettings
from dpfl.strategies import get_strategy_class
from dpfl.task.recipes import UNSET

DEFAULTS = RunSettings()
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
    ("--deploy-sweep-tiles", "deploy_sweep_tiles", str, "tile sizes of each node's NF sweep, comma-separated"),
    ("--pretraining", "pretraining", str, "initial weights: none (random), fractal or strokes (public synthetic pretraining, cached)"),
    ("--seed", "seed", int, "seed of model init, partitions and local shuffling (never of the privacy noise or sampling)"),
    ("--init-from", "init_from", str,
     "start from this checkpoint's weights (a run folder, checkpoint.pt or final_model.pt), carrying its privacy ledger"),
    ("--init-new-data", "init_new_data", bool,
     "with --init-from: this run's clients hold other data, so no ledger is carried (needed for a checkpoint without one)"),
]


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
