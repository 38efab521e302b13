"""``dpfl deploy``: run a trained (or compressed) model on a simulated CIM edge device.

Reads any dpfl checkpoint (``dpfl simulate``'s ``final_model.pt``, ``dpfl compress``
output), maps its Conv2d/Linear layers onto bit-sliced memristive crossbars with every
mapping (naive, MDM, significance-weighted MDM), and reports the distortion (NF and
output error per layer), digital against analog accuracy, a JSON report and two
plots. Device noise (programming, stuck cells, read noise, drift) is drawn per trial;
``--trials N`` reports mean ± 95% interval over N device instances.
"""

from __future__ import annotations

import argparse

from dpfl.cim.device import PROGRAMMING_NOISE_MODELS, CrossbarDevice
from dpfl.cim.names import DEPLOY_MODES, MAPPINGS
from dpfl.cli.display import ProgressDisplay, make_console
from dpfl.cli.options import HelpFormatter, output_dir
from dpfl.errors import UsageError
from dpfl.task.names import DATASET_NAMES

TILE_SIZES = (64, 128, 256, 512)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deploy",
        help="simulate a model on compute-in-memory crossbars with parasitic wire resistance",
        description="Map a checkpoint's Conv2d/Linear layers onto simulated memristive crossbars "
        "(naive and MDM mappings) and report distortion and accuracy.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="dpfl checkpoint (dpfl simulate / dpfl compress output)")
    parser.add_argument("--dataset", choices=DATASET_NAMES, metavar="NAME",
                        help="evaluation data set: %(choices)s (default: the checkpoint's)")  # fmt: skip
    parser.add_argument("--data-dir", help="folder holding the data set (not needed for digits)")
    parser.add_argument("--tile", type=int, choices=TILE_SIZES, default=128, help="crossbar rows = columns")
    parser.add_argument("--mapping", choices=MAPPINGS, default="mdm", metavar="MAPPING",
                        help="mapping to deploy, one of %(choices)s (all are reported)")  # fmt: skip
    parser.add_argument("--mode", choices=DEPLOY_MODES, default="auto",
                        metavar="MODE", help="exact: every input bit-plane read through the circuit (under read noise every read "
                        "is solved: seconds per image); fast: calibrated attenuation maps, which miss how IR drop "
                        "depends on the input; ideal: the quantised model on ideal crossbars; auto: "
                        "exact, or fast under read noise")  # fmt: skip
    parser.add_argument("--compressed", action="store_true",
                        help="require a compressed checkpoint (dpfl compress output)")
    parser.add_argument("--samples", type=int, help="evaluate on the first N test images (default: all)")
    parser.add_argument("--r-on", type=float, default=CrossbarDevice.r_on, help="ON resistance, ohm")
    parser.add_argument("--r-off", type=float, default=CrossbarDevice.r_off, help="OFF resistance, ohm")
    parser.add_argument("--r-wire", type=float, default=CrossbarDevice.r_wordline,
                        help="wire resistance per wordline and bitline segment, ohm (default 1; 0 = ideal)")
    parser.add_argument("--weight-bits", default=str(CrossbarDevice.weight_bits), metavar="BITS[,BITS...]",
                        help="weight precision(s): magnitude bits per weight, e.g. 2,4,6,8 (default 8); the full "
                        "study runs at the largest, accuracy with and without weight bias correction at each")
    parser.add_argument("--bits-per-cell", type=int, default=CrossbarDevice.bits_per_cell,
                        help="bits one cell stores; a weight takes weight bits / bits per cell cells (default 1)")
    parser.add_argument("--adc-bits", type=int,
                        help="output (ADC) resolution per column read; at least enough for the column sum (default: ideal)")
    parser.add_argument("--activation-bits", type=int, default=CrossbarDevice.activation_bits,
                        help="input (DAC) resolution, applied bit-serially")  # fmt: skip
    noise = parser.add_argument_group("device non-idealities (all off by default; see docs/cim.md)")
    noise.add_argument("--programming-noise", type=float, default=0.0, metavar="SIGMA",
                       help="relative sigma of the programmed conductance, in [0, 1)")
    noise.add_argument("--programming-noise-model", choices=PROGRAMMING_NOISE_MODELS, default="proportional",
                       help="sigma x target conductance (proportional) or x G_on (independent)")
    noise.add_argument("--stuck-on", type=float, default=0.0, metavar="RATE", help="share of cells stuck at G_on")
    noise.add_argument("--stuck-off", type=float, default=0.0, metavar="RATE", help="share of cells stuck at G_off")
    noise.add_argument("--read-noise", type=float, default=0.0, metavar="SIGMA",
                       help="relative sigma of a cell's conductance, redrawn every read cycle")
    noise.add_argument("--drift-nu", type=float, default=0.0, help="mean drift exponent nu (PCM ~0.05)")
    noise.add_argument("--drift-nu-std", type=float, default=0.0, help="spread of nu across cells")
    noise.add_argument("--drift-time", type=float, metavar="SECONDS", help="time since programming")
    noise.add_argument("--drift-compensation", action="store_true", help="global drift compensation per tile")
    parser.add_argument("--trials", type=int, default=1,
                        help="device instances (seeds seed..seed+N-1); reports mean and 95%% interval")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first device instance")
    parser.add_argument("--out", type=output_dir, required=True, metavar="DIR", help="folder for report.json and the plots")
    parser.set_defaults(func=run)


def parse_weight_bits(value: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(part) for part in value.split(","))
    except ValueError:
        bits = ()
    if not bits or min(bits) < 1:
        raise UsageError(f"--weight-bits {value!r} is not a comma-separated list of positive integers (e.g. 2,4,6,8)")
    return bits


def run(args: argparse.Namespace) -> int:
    # Checked here, before torch loads (the device validates its own values).
    weight_bits = parse_weight_bits(args.weight_bits)
    device = CrossbarDevice(
        weight_bits=max(weight_bits), bits_per_cell=args.bits_per_cell,
        tile_size=args.tile, r_on=args.r_on, r_off=args.r_off, r_wordline=args.r_wire,
        r_bitline=args.r_wire, adc_bits=args.adc_bits, activation_bits=args.activation_bits,
        programming_noise=args.programming_noise, programming_noise_model=args.programming_noise_model,
        stuck_on_rate=args.stuck_on, stuck_off_rate=args.stuck_off, read_noise=args.read_noise,
        drift_nu=args.drift_nu, drift_nu_std=args.drift_nu_std, drift_time=args.drift_time,
        drift_compensation=args.drift_compensation,
    )
    from dpfl.cim.study import deploy_checkpoint

    console = make_console()
    with ProgressDisplay(console) as progress:
        report, paths = deploy_checkpoint(
            args.checkpoint, args.out, device, args.mapping, args.mode, args.seed, args.trials, args.samples,
            args.dataset, args.data_dir, args.compressed, progress=progress, weight_bits=weight_bits,
        )  # fmt: skip
    _print(console, report)
    console.print("wrote " + ", ".join(str(path) for path in paths), soft_wrap=True)
    return 0


def _print(console, report) -> None:
    from rich.table import Table

    mappings = list(report.distortion)
    tile = report.distortion[mappings[0]].tile_size
    table = Table(title=f"NF / output error per layer, tile {tile}x{tile} (first trial)")
    table.add_column("layer")
    table.add_column("tiles", justify="right")
    for name in mappings:
        table.add_column(name, justify="right")
    per_mapping = [report.distortion[name] for name in mappings]
    for index, layer in enumerate(per_mapping[0].layers):
        cells = [f"{m.layers[index].nf:.4f} / {m.layers[index].output_error:.4f}" for m in per_mapping]
        table.add_row(layer.name, str(layer.tiles), *cells)
    table.add_row("model", str(sum(layer.tiles for layer in per_mapping[0].layers)),
                  *(f"{m.nf:.4f} / {m.output_error:.4f}" for m in per_mapping))
    console.print(table)

    trials = len(report.trials[mappings[0]]["accuracy"].values)
    accuracy = Table(title=f"Accuracy ({report.context['test_images']} test images, analog mode {report.mode})")
    for column in ("model", "accuracy", "bias corrected", "NF", "out err", "gain-free err"):
        accuracy.add_column(column, justify="left" if column == "model" else "right")
    accuracy.add_row("digital (float)", f"{report.accuracy['digital']:.2%}", "", "", "", "")
    accuracy.add_row(f"quantised w{report.device['weight_bits']}, ideal crossbar", f"{report.accuracy['quantised']:.2%}",
                     f"{report.accuracy['quantised_corrected']:.2%}", "", "", "")  # fmt: skip
    for name in mappings:
        marker = " (deployed)" if name == report.mapping else ""
        summary = report.trials[name]
        accuracy.add_row(f"analog, {name}{marker}", _percent(summary["accuracy"]), _percent(summary["accuracy_corrected"]),
                         str(summary["nf"]), str(summary["output_error"]), str(summary["gain_free_error"]))  # fmt: skip
    console.print(accuracy)
    if trials > 1:
        console.print(f"analog rows: mean ± 95% interval over {trials} device instances")
    if len(report.precisions) > 1:
        _print_precisions(console, report)


def _percent(interval) -> str:
    return f"{interval.mean:.2%}" + ("" if interval.half_width is None else f" ± {interval.half_width:.2%}")


def _print_precisions(console, report) -> None:
    from rich.table import Table

    table = Table(title="Accuracy by weight precision, without / with weight bias correction "
                        f"(analog mode {report.mode}, tile {report.device['tile_size']})")
    mappings = list(report.distortion)
    for column in ("weight bits", "cells per weight", "quantised", *(f"analog, {name}" for name in mappings)):
        table.add_column(column, justify="right")
    for result in report.precisions:
        quantised = f"{result.accuracy['quantised']:.2%} / {result.accuracy['quantised_corrected']:.2%}"
        analog = [f"{_percent(result.trials[name]['accuracy'])} / {_percent(result.trials[name]['accuracy_corrected'])}"
                  for name in mappings]  # fmt: skip
        table.add_row(str(result.weight_bits), str(result.cells_per_weight), quantised, *analog)
    console.print(table)


__all__ = ["register", "run"]
