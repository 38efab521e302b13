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

from dpfl.cli.display import ProgressDisplay, make_console
from dpfl.cli.options import HelpFormatter, output_dir
from dpfl.compression.names import METHODS, NORMS, SCOPES
from dpfl.compression.ranks import check_ratio
from dpfl.errors import UsageError
from dpfl.task.names import DATASET_NAMES

# Accuracy lost to compression (in points) above which the command suggests fine-tuning.
FINETUNE_HINT_POINTS = 5.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compress",
        help="compress a model by Tucker-2, CPD or SVD in the data-informed (Σ) or plain norm",
        description="Factorise a checkpoint's conv (Tucker-2, CPD) or linear and 1x1 conv (SVD) layers, "
        "minimising the change of each layer's output over the data (--norm sigma) or of its weights "
        "(--norm frobenius), and report ranks, costs, errors and accuracy.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="dpfl checkpoint (e.g. a dpfl simulate run's final_model.pt)")
    parser.add_argument("--dataset", choices=DATASET_NAMES, metavar="NAME",
                        help="data for the covariance and accuracy: %(choices)s (default: the checkpoint's)")  # fmt: skip
    parser.add_argument("--data-dir", help="folder holding the data set (not needed for digits)")
    parser.add_argument("--method", choices=METHODS, default="tucker2",
                        metavar="METHOD", help="decomposition: %(choices)s")  # fmt: skip
    parser.add_argument("--norm", choices=NORMS, default="sigma",
                        metavar="NORM", help="sigma: output change over the data; frobenius: weight change")  # fmt: skip
    parser.add_argument("--ratio", type=float, required=True, help="fraction of parameters kept, in (0, 1)")
    parser.add_argument("--scope", choices=SCOPES, default="model",
                        metavar="SCOPE", help="model: the whole model keeps --ratio of its parameters; layer: each compressed layer does")
    parser.add_argument("--rank", action="append", default=[], metavar="LAYER=R[,R]",
                        help="ranks for one layer, overriding --ratio (tucker2: output,input); repeatable")
    parser.add_argument("--layers", help="comma-separated layers to compress (default: all eligible but the first conv and the classifier)")
    parser.add_argument("--covariance", help="input statistics file from an earlier run (e.g. on another data set)")
    parser.add_argument("--batches", type=int, default=20, help="training batches for the covariance pass")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of the covariance pass and fine-tuning")
    parser.add_argument("--max-iter", type=int, default=None,
                        help="ALS sweeps per layer (default: the solver's, docs/compression.md)")  # fmt: skip
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="epochs of fine-tuning after compression (recovers the accuracy a high ratio costs)")  # fmt: skip
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="Adam learning rate of the fine-tuning")
    parser.add_argument("--seed", type=int, default=0, help="seed of CPD's initialisation and the data order")
    parser.add_argument("--out", type=output_dir, required=True, metavar="DIR",
                        help="folder for the compressed model, its report and the input statistics")  # fmt: skip
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


def run(args: argparse.Namespace) -> int:
    # Before torch loads: a mistake here is reported at once.
    check_ratio(args.ratio)
    ranks = parse_rank_overrides(args.rank)
    from dpfl.compression.pipeline import CompressionConfig
    from dpfl.compression.study import StudyOptions, compress_checkpoint

    layers = None if args.layers is None else [name.strip() for name in args.layers.split(",") if name.strip()]
    solver = {"seed": args.seed} if args.max_iter is None else {"seed": args.seed, "max_iter": args.max_iter}
    options = StudyOptions(
        ratio=args.ratio, method=args.method, norm=args.norm, scope=args.scope, ranks=ranks,
        layers=layers, batches=args.batches, batch_size=args.batch_size, finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr, config=CompressionConfig(**solver),
    )  # fmt: skip
    console = make_console()
    with ProgressDisplay(console) as progress:
        study = compress_checkpoint(args.checkpoint, args.out, options, args.dataset, args.data_dir, args.covariance, progress)
    print_report(console, study.report)
    console.print("wrote " + ", ".join(str(path) for path in study.files), soft_wrap=True)
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
    lost = 100 * (acc["before"] - acc["after"])
    if lost > FINETUNE_HINT_POINTS and acc["after_finetune"] is None:
        console.print(f"[yellow]compression cost {lost:.1f} accuracy points[/]: --finetune-epochs 3 (or a larger "
                      "--ratio) recovers most of them")  # fmt: skip
