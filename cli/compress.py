"""``dpfl compress``: factorise a trained model's layers in the Σ-weighted or the plain norm.

Reads any dpfl checkpoint (``dpfl simulate``'s ``final_model.pt`` included), collects
the input covariance of the layers to compress from the training data (or loads it
from ``--covariance``), replaces the layers by Tucker-2, CPD or SVD factorisations,
prints a per-layer table and the accuracy before and after, and writes
``compressed_model.pt`` (a checkpoint with its ``compression`` record),
``compression_report.json`` and, when computed here, ``covariance.pt``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dpfl.compression.covariance import check_statistics, load_statistics, save_statistics
from dpfl.compression.finetune import finetune
from dpfl.compression.pipeline import METHODS, NORMS, CompressionConfig, compress_on_data
from dpfl.compression.ranks import plan_ranks
from dpfl.compression.surgery import METHOD_LAYERS, default_layers, eligible_layers, weight_shape
from dpfl.errors import UsageError
from dpfl.task.attention import explicit_attention
from dpfl.task.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dpfl.task.data import DATASET_NAMES, load_dataset
from dpfl.task.evaluation import accuracy
from dpfl.task.models import count_parameters

MODEL_FILE = "compressed_model.pt"
REPORT_FILE = "compression_report.json"
COVARIANCE_FILE = "covariance.pt"
EVAL_BATCH_SIZE = 256


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compress",
        help="compress a model by Tucker-2, CPD or SVD in the data-informed (Σ) or plain norm",
        description="Factorise a checkpoint's conv (Tucker-2, CPD) or linear and 1x1 conv (SVD) layers, "
        "minimising the change of each layer's output over the data (--norm sigma) or of its weights "
        "(--norm frobenius), and report ranks, costs, errors and accuracy.",
    )
    parser.add_argument("--checkpoint", required=True, help="dpfl checkpoint (e.g. a dpfl simulate run's final_model.pt)")
    parser.add_argument("--dataset", choices=DATASET_NAMES, help="data for the covariance and accuracy (default: the checkpoint's)")
    parser.add_argument("--data-dir", help="folder holding the data set (not needed for digits)")
    parser.add_argument("--method", choices=METHODS, default="tucker2", help="decomposition (default tucker2)")
    parser.add_argument("--norm", choices=NORMS, default="sigma",
                        help="sigma: output change over the data; frobenius: weight change (default sigma)")
    parser.add_argument("--ratio", type=float, required=True, help="fraction of parameters kept, in (0, 1)")
    parser.add_argument("--scope", choices=("model", "layer"), default="model",
                        help="model: the whole model keeps --ratio of its parameters; layer: each compressed layer does")
    parser.add_argument("--rank", action="append", default=[], metavar="LAYER=R[,R]",
                        help="ranks for one layer, overriding --ratio (tucker2: output,input); repeatable")
    parser.add_argument("--layers", help="comma-separated layers to compress (default: all eligible but the first conv and the classifier)")
    parser.add_argument("--covariance", help="input statistics file from an earlier run (e.g. on another data set)")
    parser.add_argument("--batches", type=int, default=20, help="training batches for the covariance pass (default 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of the covariance pass and fine-tuning (default 64)")
    parser.add_argument("--max-iter", type=int, default=CompressionConfig.max_iter, help=f"ALS sweeps per layer (default {CompressionConfig.max_iter})")
    parser.add_argument("--finetune-epochs", type=int, default=0, help="epochs of fine-tuning after compression (default 0)")
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="Adam learning rate of the fine-tuning (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help=f"folder for {MODEL_FILE}, {REPORT_FILE} and {COVARIANCE_FILE}")
    parser.set_defaults(func=run)


def parse_rank_overrides(values: list[str]) -> dict[str, tuple[int, ...]]:
    overrides = {}
    for value in values:
        name, _, ranks = value.partition("=")
        try:
            overrides[name] = tuple(int(r) for r in ranks.split(","))
        except ValueError:
            raise UsageError(f"--rank {value!r} is not LAYER=R or LAYER=R,R with integer ranks") from None
        if not name:
            raise UsageError(f"--rank {value!r} names no layer (use LAYER=R)")
    return overrides


def check_counts(args: argparse.Namespace) -> None:
    for option, value, minimum in (
        ("--batches", args.batches, 1),
        ("--batch-size", args.batch_size, 1),
        ("--max-iter", args.max_iter, 0),
        ("--finetune-epochs", args.finetune_epochs, 0),
    ):
        if value < minimum:
            raise UsageError(f"{option} must be >= {minimum}, got {value}")
    if not args.finetune_lr > 0:
        raise UsageError(f"--finetune-lr must be > 0, got {args.finetune_lr}")


def choose_layers(model: torch.nn.Module, method: str, requested: str | None) -> list[str]:
    if requested is None:
        layers = default_layers(model, method)
    else:
        layers = [name.strip() for name in requested.split(",") if name.strip()]
        eligible = eligible_layers(model, method)
        wrong = [name for name in layers if name not in eligible]
        if wrong:
            raise UsageError(
                f"--layers: {', '.join(wrong)} cannot be compressed by {method} (it takes {METHOD_LAYERS[method]}: "
                f"{', '.join(eligible) or 'none in this model'})"
            )
    if not layers:
        raise UsageError(f"this model has no layers for {method} (it takes {METHOD_LAYERS[method]})")
    return layers


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    check_counts(args)
    overrides = parse_rank_overrides(args.rank)
    out = Path(args.out)
    if (out / MODEL_FILE).resolve() == Path(args.checkpoint).resolve():
        raise UsageError(f"--out {args.out!r} would overwrite the input checkpoint {args.checkpoint!r}")
    checkpoint = load_checkpoint(args.checkpoint)
    if checkpoint.compression:
        raise UsageError(f"checkpoint {args.checkpoint!r} is already compressed; compress the original model instead")
    spec = checkpoint.spec
    try:
        model = checkpoint.build_model().eval()
    except RuntimeError as err:  # load_state_dict: the weights are not those of spec.name
        reason = str(err).splitlines()[0]
        raise UsageError(f"checkpoint {args.checkpoint!r} does not match its model {spec.name!r} ({reason})") from None
    data = load_dataset(args.dataset or checkpoint.dataset, args.data_dir, image_size=spec.image_size)
    if (data.in_channels, data.num_classes) != (spec.in_channels, spec.num_classes):
        raise UsageError(
            f"dataset {data.name!r} has {data.in_channels} channels and {data.num_classes} classes; "
            f"the model expects {spec.in_channels} and {spec.num_classes}"
        )
    # Attention projections become nn.Linear layers that SVD can factorise (no-op without attention).
    explicit_attention(model)
    layers = choose_layers(model, args.method, args.layers)
    shapes = {name: (args.method, weight_shape(model.get_submodule(name))) for name in layers}
    ranks = plan_ranks(shapes, args.ratio, args.scope, count_parameters(model), overrides)
    if args.covariance:
        statistics, covariance_source = load_statistics(args.covariance)
        check_statistics(statistics, model, layers, args.covariance)
    else:
        statistics = None
        covariance_source = {"dataset": data.name, "batches": args.batches, "batch_size": args.batch_size}
    settings = CompressionConfig(max_iter=args.max_iter, seed=args.seed)
    run = compress_on_data(
        model, data.train, data.test, (spec.in_channels, spec.image_size, spec.image_size), args.method, args.norm,
        ranks, statistics, args.batches, args.batch_size, settings, EVAL_BATCH_SIZE,
    )  # fmt: skip
    accuracy_finetuned = None
    if args.finetune_epochs:
        torch.manual_seed(args.seed)
        finetune(model, DataLoader(data.train, batch_size=args.batch_size, shuffle=True), args.finetune_epochs, args.finetune_lr)
        accuracy_finetuned = accuracy(model, data.test, EVAL_BATCH_SIZE)

    shared = run.report()
    report = {
        "checkpoint": str(args.checkpoint),
        "model": asdict(spec),
        "dataset": data.name,
        **shared,
        "ratio": args.ratio,
        "scope": args.scope,
        "covariance": {
            "file": args.covariance or str(out / COVARIANCE_FILE),
            "source": covariance_source,
            "seconds": run.covariance_seconds,
        },
        "accuracy": {**shared["accuracy"], "after_finetune": accuracy_finetuned},
        "finetune_epochs": args.finetune_epochs,
    }
    # Everything is computed before anything is written, so a failure leaves --out untouched.
    out.mkdir(parents=True, exist_ok=True)
    if not args.covariance:
        save_statistics(out / COVARIANCE_FILE, run.statistics, covariance_source)
    save_checkpoint(
        out / MODEL_FILE,
        Checkpoint(spec, checkpoint.dataset, model.state_dict(), run.record, {"compression_report": REPORT_FILE}),
    )
    report_tmp = out / (REPORT_FILE + ".tmp")
    report_tmp.write_text(json.dumps(report, indent=2) + "\n")
    report_tmp.replace(out / REPORT_FILE)
    print_report(console, report)
    return 0


def print_report(console, report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"dpfl compress: {report['method']}, {report['norm']} norm, ratio {report['ratio']} ({report['scope']})")
    for column in ("layer", "shape", "ranks", "params", "param ×", "MAC ×", "Σ rel. err", "plain rel. err", "ALS sweeps"):
        table.add_column(column, justify="left" if column in ("layer", "shape") else "right")
    for layer in report["layers"]:
        sigma_error = layer["sigma_rel_error"]
        table.add_row(
            layer["name"],
            "x".join(map(str, layer["shape"])),
            ",".join(map(str, layer["ranks"])),
            f"{layer['params_before']} → {layer['params_after']}",
            f"{layer['params_before'] / layer['params_after']:.2f}",
            f"{layer['macs_before'] / layer['macs_after']:.2f}",
            "n/a" if sigma_error is None else f"{sigma_error:.4f}",
            f"{layer['frobenius_rel_error']:.4f}",
            f"{layer['sweeps']} ({layer['stopped']})" if layer["sweeps"] else layer["stopped"],
        )
    console.print(table)
    parameters, acc = report["parameters"], report["accuracy"]
    console.print(
        f"parameters {parameters['before']} → {parameters['after']} ({parameters['ratio']:.1%} kept); "
        f"accuracy {acc['before']:.2%} → {acc['after']:.2%}"
        + (f" → {acc['after_finetune']:.2%} after {report['finetune_epochs']} fine-tuning epoch(s)" if acc["after_finetune"] is not None else "")
    )
    console.print(
        f"covariance pass {report['covariance_seconds']:.1f} s, compression {report['compression_seconds']:.1f} s"
    )
