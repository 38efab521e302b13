"""``dpfl deploy``: run a trained (or compressed) model on a simulated CIM edge device.

Reads any dpfl checkpoint (``dpfl simulate``'s ``final_model.pt``, ``dpfl compress``
output), maps its Conv2d/Linear layers onto bit-sliced memristive crossbars with both
the naive and the MDM mapping, and reports the parasitic distortion (NF and output
error per layer), digital against analog accuracy, a JSON report and two plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import Subset

from dpfl.cim.device import CrossbarDevice
from dpfl.cim.mapping import MAPPINGS
from dpfl.cim.model import MODES, calibrate
from dpfl.cim.report import DeployReport, run_study, save_report
from dpfl.errors import UsageError
from dpfl.task.checkpoint import load_checkpoint
from dpfl.task.data import DATASET_NAMES, load_dataset

TILE_SIZES = (64, 128, 256, 512)
# Training images whose activations set each layer's input scale and bit density.
CALIBRATION_IMAGES = 64
# Input vectors per layer on which NF and output error are measured by circuit solves.
REPORT_VECTORS = 16


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deploy",
        help="simulate a model on compute-in-memory crossbars with parasitic wire resistance",
        description="Map a checkpoint's Conv2d/Linear layers onto simulated memristive crossbars "
        "(naive and MDM mappings) and report distortion and accuracy.",
    )
    parser.add_argument("--checkpoint", required=True, help="dpfl checkpoint (dpfl simulate / dpfl compress output)")
    parser.add_argument("--dataset", choices=DATASET_NAMES, help="evaluation data set (default: the checkpoint's)")
    parser.add_argument("--data-dir", help="folder holding the data set (not needed for digits)")
    parser.add_argument("--tile", type=int, choices=TILE_SIZES, default=128, help="crossbar rows = columns (default 128)")
    parser.add_argument("--mapping", choices=MAPPINGS, default="mdm", help="mapping to deploy (both are reported)")
    parser.add_argument("--mode", choices=MODES, default="fast",
                        help="fast: calibrated attenuation maps; exact: circuit solve per input bit-plane (slow)")
    parser.add_argument("--compressed", action="store_true",
                        help="require a compressed checkpoint (dpfl compress output)")
    parser.add_argument("--samples", type=int, help="evaluate on the first N test images (default: all)")
    parser.add_argument("--r-on", type=float, default=CrossbarDevice.r_on, help="ON resistance, ohm (default 100k)")
    parser.add_argument("--r-off", type=float, default=CrossbarDevice.r_off, help="OFF resistance, ohm (default 10M)")
    parser.add_argument("--r-wire", type=float, default=CrossbarDevice.r_wordline,
                        help="wire resistance per wordline and bitline segment, ohm (default 1; 0 = ideal)")
    parser.add_argument("--adc-bits", type=int, help="ADC resolution (default: ideal)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder for report.json and the plots")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    device = CrossbarDevice(
        tile_size=args.tile, r_on=args.r_on, r_off=args.r_off, r_wordline=args.r_wire,
        r_bitline=args.r_wire, adc_bits=args.adc_bits,
    )
    if args.samples is not None and args.samples < 1:
        raise UsageError(f"--samples must be >= 1, got {args.samples}")
    checkpoint = load_checkpoint(args.checkpoint)
    if args.compressed and not checkpoint.compression:
        raise UsageError(f"--compressed: checkpoint {args.checkpoint!r} holds no compression record (not a dpfl compress output)")
    spec = checkpoint.spec
    data = load_dataset(args.dataset or checkpoint.dataset, args.data_dir, image_size=spec.image_size)
    if (data.in_channels, data.num_classes) != (spec.in_channels, spec.num_classes):
        raise UsageError(
            f"dataset {data.name!r} has {data.in_channels} channels and {data.num_classes} classes; "
            f"the model expects {spec.in_channels} and {spec.num_classes}"
        )
    model = checkpoint.build_model().eval()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    calibration = torch.stack([data.train[i][0] for i in range(min(CALIBRATION_IMAGES, len(data.train)))])
    statistics = calibrate(model, calibration, device, REPORT_VECTORS, generator)
    test = data.test if args.samples is None else Subset(data.test, range(min(args.samples, len(data.test))))

    with console.status("simulating crossbars") as status:
        report, losses = run_study(
            model, statistics, test, device, args.mapping, args.mode, args.seed,
            progress=lambda message: status.update(message),
        )
    report.context = {
        "checkpoint": str(args.checkpoint), "model": spec.name, "dataset": data.name,
        "compressed": bool(checkpoint.compression), "test_images": len(test),
        "calibration_images": len(calibration), "report_vectors_per_layer": REPORT_VECTORS,
    }
    paths = save_report(report, losses, Path(args.out))
    _print(console, report)
    console.print("wrote " + ", ".join(str(path) for path in paths))
    return 0


def _print(console, report: DeployReport) -> None:
    from rich.table import Table

    naive, mdm = report.distortion["naive"], report.distortion["mdm"]
    table = Table(title=f"Parasitic distortion per layer, tile {naive.tile_size}x{naive.tile_size}")
    for column in ("layer", "tiles", "NF naive", "NF mdm", "NF change", "out err naive", "out err mdm"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    rows = [(a.name, a.tiles, a.nf, b.nf, a.output_error, b.output_error) for a, b in zip(naive.layers, mdm.layers)]
    rows.append(("model", sum(r[1] for r in rows), naive.nf, mdm.nf, naive.output_error, mdm.output_error))
    for name, tiles, nf_a, nf_b, err_a, err_b in rows:
        change = f"{(nf_b - nf_a) / nf_a:+.1%}" if nf_a else "-"
        table.add_row(name, str(tiles), f"{nf_a:.4f}", f"{nf_b:.4f}", change, f"{err_a:.4f}", f"{err_b:.4f}")
    console.print(table)

    accuracy = Table(title=f"Accuracy ({report.context['test_images']} test images, analog mode {report.mode})")
    labels = {"digital": "digital (float)", "quantised": "quantised, ideal crossbar",
              "analog_naive": "analog, naive mapping", "analog_mdm": "analog, MDM mapping"}
    accuracy.add_column("model")
    accuracy.add_column("accuracy", justify="right")
    for key, label in labels.items():
        marker = " (deployed)" if key == f"analog_{report.mapping}" else ""
        accuracy.add_row(label + marker, f"{report.accuracy[key]:.2%}")
    console.print(accuracy)


__all__ = ["register", "run"]
