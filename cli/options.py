"""What the subcommands parse: the one-line-error parser, argument types that reject a bad
value in one line (also used by the docker entrypoint), and the run options that
``dpfl simulate``, ``dpfl audit`` and ``dpfl compare`` share.

Nothing here imports torch, Flower or Opacus: every ``dpfl`` command line is parsed,
and a mistake in it reported, before any of them loads. The names a choice is checked
against (data sets, mappings, ...) come from the torch-free ``names`` modules of
``task/``, ``compression/`` and ``cim/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from dpfl.engines import ENGINES
from dpfl.errors import UsageError
from dpfl.settings import RunSettings
from dpfl.task.recipes import UNSET

DEFAULTS = RunSettings()


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default once, after its help, unless the help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, "", [], argparse.SUPPRESS) and not isinstance(action.default, bool)
        if "default" in text or not shown or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """A rate in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def open_unit(text: str) -> float:
    """A value in (0, 1), such as δ."""
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def unit_interval(text: str) -> float:
    """A value in [0, 1), such as a share of cells or a relative noise."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def key_value(text: str) -> str:
    """``KEY=VALUE``, both parts non-empty."""
    key, sep, value = text.partition("=")
    if not (sep and key and value):
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE, got {text!r}")
    return text


def node_config(text: str) -> dict:
    """A simulated data owner's node config, as ``flower-supernode --node-config`` reads it."""
    from dpfl.client.node import parse_node_config  # only when the option is given: it loads torch

    try:
        return parse_node_config(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def output_dir(text: str) -> Path:
    """A folder a command may write into (see :func:`check_output_dir`)."""
    try:
        return check_output_dir(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_output_dir(path: str | Path) -> Path:
    """``path`` as an absolute folder a command may write into, checked before anything is
    written: not a file, its name valid UTF-8 (log lines carry it), and the folder (or, when
    it does not exist yet, its nearest existing parent) writable. Nothing is left behind."""
    path = Path(path).expanduser().absolute()
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{str(path)!r} is not a valid UTF-8 name; choose a folder name in UTF-8") from None
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        what = "is a file" if existing == path else f"is inside {str(existing)!r}, which is a file"
        raise UsageError(f"{str(path)!r} {what}; give a folder")
    try:  # by trying: permission bits do not bind root, read-only mounts and /proc do
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UsageError(f"{str(path)!r} cannot be written: {str(existing)!r} refuses new files ({err.strerror})") from None
    return path


def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if not math.isfinite(value):  # float("inf"), float("nan")
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# Every run-configuration flag, by section of `--help`: (flag, settings field, type, help).
# Each sets the run-config key of its field.
RUN_OPTION_GROUPS: dict[str, list[tuple[str, str, Callable, str]]] = {
    "federation": [
        ("--rounds", "num_server_rounds", positive_int, "federated rounds"),
        ("--clients", "num_clients", positive_int, "clients (simulated SuperNodes), each with one partition"),
        ("--strategy", "strategy", str, "strategy name (`dpfl strategies` lists them) or module:Class"),
        ("--model", "model", str, "resnet10, resnet18, vit or cnn"),
        ("--width", "model_width", positive_int, "channels of the model's first stage"),
        ("--depth", "model_depth", positive_int, "the vit's encoder blocks"),
        ("--dataset", "dataset", str, "digits or mnist5k (bundled), cifar10, cifar100, mnist, fashion-mnist, imagefolder, fakedata"),
        ("--data-dir", "data_dir", str, "folder of a downloaded or imagefolder dataset"),
        ("--image-size", "image_size", int, "resize images to this size (0: the dataset's own)"),
        ("--partition", "partition", str, "iid or dirichlet"),
        ("--alpha", "dirichlet_alpha", positive_float, "Dirichlet concentration of the label skew"),
        ("--validation-fraction", "validation_fraction", unit_interval,
         "share of the server's held-out data used as its validation set (0: none)"),
        ("--pretraining", "pretraining", str, "initial weights: none, fractal or strokes (public synthetic pretraining)"),
        ("--seed", "seed", int, "seed of model init, partitions and local shuffling (never of the privacy noise or sampling)"),
    ],
    "client-level privacy": [
        ("--clip", "clip_norm", positive_float, "clip norm C of each client's private update"),
        ("--sample-rate", "sample_rate", probability, "Poisson client sampling rate q"),
        ("--delta", "delta", open_unit, "delta of the (epsilon, delta) guarantee"),
        ("--max-epsilon", "max_epsilon", non_negative_float, "stop before a round would exceed this epsilon (0: no budget)"),
        ("--noise", "noise_placement", str, "add the noise on the 'server' or split it across sampled 'client's"),
        ("--accountant", "accountant", str, "rdp, prv or pld: how epsilon is computed"),
        ("--clipping", "clipping", str, "flat (sound DP) or paper (the DP-FedPGN authors' clipping: NO DP guarantee)"),
        ("--reproducible-noise", "reproducible_noise", bool,
         "derive the privacy noise and client sampling from --seed (debugging): epsilon NOT valid"),
        ("--mechanism", "mechanism", str, "gaussian (independent noise), or correlated noise that needs "
         "--participation cyclic or min-sep: bandmf (banded matrix factorisation, band = --min-separation), tree "
         "(binary-tree aggregation) or blt (buffered linear Toeplitz); tree and blt are accounted without "
         "amplification (q = 1)"),
        ("--participation", "participation", str, "poisson (every round, rate q), cyclic (--min-separation groups, "
         "one per round, Poisson within) or min-sep (a client waits --min-separation rounds between rounds)"),
        ("--min-separation", "min_separation", positive_int, "b: rounds between two participations of a client "
         "under --participation cyclic or min-sep (at most ceil(rounds/b) each)"),
        ("--aggregation", "aggregation", str, "plain (the server sees each update) or secagg (secure aggregation "
         "with distributed Skellam noise: the server learns only the noisy sum)"),
        ("--secagg-threshold", "secagg_threshold", non_negative_int,
         "t: the fewest inputs a secure sum releases, each noise share sized for it (0: ceil(2n/3))"),
        ("--secagg-neighbours", "secagg_neighbours", non_negative_int,
         "k: SecAgg+ neighbours of each client, even (0: safe against a server colluding with a fifth of the clients)"),
        ("--secagg-bits", "secagg_bits", positive_int, "b: the secure sum is taken mod 2^b (2-62)"),
        ("--clip-mode", "clip_mode", str, "fixed (C = --clip) or adaptive (C starts at --clip, tracks --target-quantile)"),
        ("--target-quantile", "target_quantile", probability, "adaptive clipping: fraction of updates left unclipped"),
        ("--clip-lr", "clip_lr", positive_float, "adaptive clipping: rate of the geometric update of C"),
        ("--clip-count-noise", "clip_count_noise", non_negative_float,
         "adaptive clipping: noise std on the clipped count (0: expected clients / 20, raised so sigma grows <= 5%%)"),
    ],
    "client failures": [
        ("--round-timeout", "round_timeout", positive_float, "seconds to wait for a round's replies; later ones are left out"),
        ("--min-replies", "min_replies", non_negative_int,
         "skip a round's update (still accounted) when its noisy count of replies is below this (0: never)"),
        ("--reply-count-noise", "reply_count_noise", positive_float,
         "std of the noise on the reply count (with --min-replies; must exceed sigma, whose cost it shares)"),
    ],
    "local training": [
        ("--lr", "lr", positive_float, "initial local learning rate"),
        ("--lr-decay", "lr_decay", probability, "learning-rate decay per round, in (0, 1]"),
        ("--local-epochs", "local_epochs", positive_int, "local epochs over a nominal client's data"),
        ("--client-size", "client_size", non_negative_int,
         "examples of a nominal client, which fix the public number of local steps (0: published size / clients)"),
        ("--batch-size", "batch_size", positive_int, "local batch size"),
        ("--weight-decay", "weight_decay", non_negative_float, "local weight decay"),
        ("--grad-clip", "grad_clip", positive_float, "per-step clip of the raw local gradient (stability, not DP)"),
        ("--device", "device", str, "where clients train: auto, cpu, cuda, cuda:N or mps (privacy noise and clipping stay on the CPU)"),
        ("--cohort-batching", "cohort_batching", str,
         "in-process engine: train a round's clients as one vectorised computation: auto (where the strategy allows), on or off"),
        ("--train-bit-widths", "train_bit_widths", str,
         "multi-precision training: local steps also take the forward at these weight bits, e.g. 2,4 (docs/cim.md)"),
        ("--server-optimizer", "server_optimizer", str,
         "how the server applies the released mean update: sgd, momentum or adam (no privacy cost)"),
        ("--server-lr", "server_lr", positive_float, "the server optimizer's learning rate (sgd at 1 is plain FedAvg)"),
        ("--local-dp", "local_dp", bool, "also sample-level DP-SGD inside each client (Opacus)"),
        ("--local-noise", "local_noise_multiplier", positive_float, "noise multiplier of each client's DP-SGD"),
        ("--local-clip", "local_clip", positive_float, "per-sample gradient clip norm of each client's DP-SGD"),
        ("--local-delta", "local_delta", open_unit, "delta of each client's sample-level epsilon"),
    ],
    "deployment round": [
        ("--deploy", "deploy", bool,
         "after training, every node compresses the final model with its own data and runs it on its own CIM device"),
        ("--deploy-clients", "deploy_clients", non_negative_int, "deploy on this many nodes, chosen at random (0: every node)"),
        ("--deploy-method", "deploy_method", str, "nodes' compression: tucker2, cpd or svd"),
        ("--deploy-norm", "deploy_norm", str, "nodes' compression norm: sigma or frobenius"),
        ("--deploy-ratio", "deploy_ratio", open_unit, "fraction of parameters the nodes keep, in (0, 1)"),
        ("--deploy-mapping", "deploy_mapping", str, "crossbar mapping deployed: naive, mdm, sw-mdm or gf-mdm"),
        ("--deploy-mode", "deploy_mode", str, "analog inference: auto, exact, fast or ideal"),
        ("--deploy-sweep-tiles", "deploy_sweep_tiles", str, "tile sizes of each node's NF sweep beside its own, comma-separated (default: none)"),
    ],
    "continuing": [
        ("--init-from", "init_from", str,
         "start from this checkpoint's weights (run folder, checkpoint.pt or final_model.pt), carrying its privacy ledger"),
        ("--init-new-data", "init_new_data", bool,
         "with --init-from: this run's clients hold other data, so no ledger is carried"),
    ],
}
OPTIONS = [option for group in RUN_OPTION_GROUPS.values() for option in group]


def add_run_options(parser: argparse.ArgumentParser, leave_out: Sequence[str] = ()) -> None:
    """The run-configuration flags (but the fields in ``leave_out``), σ or the target ε, and the
    strategy's options, in one section of ``--help`` each."""
    for title, options in RUN_OPTION_GROUPS.items():
        group = parser.add_argument_group(title)
        for flag, field, kind, text in options:
            if field not in leave_out:
                add_option(group, flag, field, kind, text)
            if flag == "--sample-rate" and "target_epsilon" not in leave_out:
                noise = group.add_mutually_exclusive_group()
                noise.add_argument("--noise-multiplier", type=positive_float, default=None, metavar="X",
                                   help="noise multiplier sigma (instead of calibrating it to --target-epsilon)")  # fmt: skip
                noise.add_argument("--target-epsilon", type=positive_float, default=None, metavar="X",
                                   help=f"calibrate sigma so that all rounds spend this epsilon (default {DEFAULTS.target_epsilon:g})")  # fmt: skip
        if title == "federation":
            group.add_argument("--strategy-option", dest="strategy_options", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                               help="an option of the strategy (repeatable; `dpfl strategies` lists them)")  # fmt: skip


def add_option(parser, flag: str, field: str, kind: Callable, text: str) -> None:
    """One option as an argument; a bool field is a switch (with its --no- form)."""
    if kind is bool:
        parser.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=getattr(DEFAULTS, field), help=text)
        return
    metavar = "N" if kind in (int, positive_int, non_negative_int) else "NAME" if kind is str else "X"
    if field in UNSET:  # the sentinel, so that the model's recipe fills it
        parser.add_argument(flag, dest=field, type=kind, default=UNSET[field], metavar=metavar,
                            help=f"{text} (default: the model's recipe)")  # fmt: skip
    else:
        parser.add_argument(flag, dest=field, type=kind, default=getattr(DEFAULTS, field), metavar=metavar, help=text)


def add_output_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", type=output_dir, default=None, metavar="DIR", help=f"output folder (default: runs/{what}-<time>)")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=ENGINES, default="in-process",
                        help="in-process: the same apps in this process (and its --workers), without Flower's "
                        "per-message costs; flower: Flower's local simulation (SuperLink, Ray)")  # fmt: skip
    parser.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help="in-process engine: worker processes that train a round's clients in parallel "
                        "(default: the usable cores; the result does not depend on it)")  # fmt: skip


def add_tracking_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensorboard", type=output_dir, metavar="DIR", default=None,
                        help="also write the public per-round records as TensorBoard scalars under DIR "
                        "(needs the tensorboard package: pip install 'dpfl[tracking]')")  # fmt: skip


def option_values(args: argparse.Namespace, given_only: bool = False) -> dict:
    """The run settings the options set; ``given_only``: only those that differ from their defaults."""
    values = {field: getattr(args, field) for _, field, _, _ in OPTIONS if hasattr(args, field)}
    if given_only:
        values = {field: value for field, value in values.items() if value != UNSET.get(field, getattr(DEFAULTS, field))}
    if args.strategy_options or not given_only:
        values["strategy_options"] = " ".join(args.strategy_options)
    if getattr(args, "deploy_node_configs", None) or not given_only:
        values["deploy_node_configs"] = "; ".join(getattr(args, "deploy_node_configs", []))
    if args.target_epsilon is not None:
        values["target_epsilon"] = args.target_epsilon
    elif getattr(args, "noise_multiplier", None) is not None:
        values.update(noise_multiplier=args.noise_multiplier, target_epsilon=0.0)
    return values


def output_folder(given: Path | None, what: str) -> Path:
    """``--out`` (checked when parsed), or runs/<what>-<time> (checked here), as an absolute path."""
    if given is None:
        return check_output_dir(f"runs/{what}-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    return given.resolve()


def settings_from_args(args: argparse.Namespace, what: str) -> RunSettings:
    """The validated run settings of a ``simulate`` or ``audit`` command line (``what``:
    its default output folder's prefix), its strategy's recipe resolved."""
    from dpfl.engines.simulation import resumed_settings
    from dpfl.server.recorder import holds_run
    from dpfl.strategies import get_strategy_class

    if getattr(args, "resume", None):
        run_dir = Path(args.resume).expanduser().resolve()
        if args.out and Path(args.out).expanduser().resolve() != run_dir:
            raise UsageError(f"--resume continues in {str(run_dir)!r}; leave out --out (got {args.out!r})")
        settings = resumed_settings(run_dir, option_values(args, given_only=True))
    else:
        out = output_folder(args.out, what)
        if holds_run(out):
            raise UsageError(f"output folder {str(out)!r} already holds a run; choose another --out, or --resume it")
        values = option_values(args)
        if values["init_from"]:  # the ServerApp may run in another folder
            values["init_from"] = str(Path(values["init_from"]).expanduser().resolve())
        settings = dataclasses.replace(DEFAULTS, **values, out_dir=str(out))
        settings.validate()
    return get_strategy_class(settings.strategy).resolved_settings(settings)
