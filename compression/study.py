"""The compression study behind ``dpfl compress``: read a checkpoint, choose the layers
and their ranks, collect (or load) the input statistics, factorise, optionally
fine-tune, and write the compressed checkpoint, its report and the statistics.

Everything is computed before anything is written, so a bad input or a failure leaves
the output folder as it was.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dpfl.compression.covariance import check_statistics, load_statistics, save_statistics
from dpfl.compression.finetune import finetune
from dpfl.compression.names import METHOD_LAYERS
from dpfl.compression.pipeline import CompressionConfig, CompressionRun, compress_on_data
from dpfl.compression.ranks import plan_ranks
from dpfl.compression.surgery import default_layers, eligible_layers, weight_shape
from dpfl.errors import UsageError
from dpfl.progress import Progress, no_progress
from dpfl.task.attention import explicit_attention
from dpfl.task.checkpoint import Checkpoint, checkpoint_dataset, load_checkpoint, save_checkpoint
from dpfl.task.evaluation import accuracy
from dpfl.task.files import write_atomically
from dpfl.task.models import count_parameters

MODEL_FILE = "compressed_model.pt"
REPORT_FILE = "compression_report.json"
COVARIANCE_FILE = "covariance.pt"


@dataclass(frozen=True)
class StudyOptions:
    """What to compress and how (the options of ``dpfl compress``)."""

    ratio: float  # fraction of parameters kept, in (0, 1)
    method: str = "tucker2"
    norm: str = "sigma"
    scope: str = "model"
    ranks: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # per layer, overriding the ratio
    layers: list[str] | None = None  # None: every eligible layer but the first conv and the classifier
    batches: int = 20  # training batches of the covariance pass
    batch_size: int = 64  # of the covariance pass and the fine-tuning
    finetune_epochs: int = 0
    finetune_lr: float = 1e-3
    config: CompressionConfig = CompressionConfig()

    def check(self) -> None:
        for option, value, minimum in (
            ("--batches", self.batches, 1),
            ("--batch-size", self.batch_size, 1),
            ("--max-iter", self.config.max_iter, 0),
            ("--finetune-epochs", self.finetune_epochs, 0),
        ):
            if value < minimum:
                raise UsageError(f"{option} must be >= {minimum}, got {value}")
        if not self.finetune_lr > 0:
            raise UsageError(f"--finetune-lr must be > 0, got {self.finetune_lr}")


def choose_layers(model: nn.Module, method: str, requested: list[str] | None) -> list[str]:
    """``requested`` if ``method`` can factorise every one of them, else the default layers."""
    if requested is None:
        layers = default_layers(model, method)
    else:
        layers = requested
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


def plan_layer_ranks(model: nn.Module, options: StudyOptions) -> dict[str, tuple[int, ...]]:
    """The layers to compress (name → ranks) for ``options``' layers, ratio and scope."""
    layers = choose_layers(model, options.method, options.layers)
    shapes = {name: (options.method, weight_shape(model.get_submodule(name))) for name in layers}
    return plan_ranks(shapes, options.ratio, options.scope, count_parameters(model), dict(options.ranks))


@dataclass
class CompressionStudy:
    """What ``dpfl compress`` computed, and the files it wrote."""

    run: CompressionRun
    accuracy_finetuned: float | None
    report: dict[str, Any]  # the content of REPORT_FILE
    files: list[Path]


def compress_checkpoint(
    checkpoint_path: str | Path,
    out: str | Path,
    options: StudyOptions,
    dataset: str | None = None,
    data_dir: str | None = None,
    covariance: str | None = None,
    progress: Progress = no_progress,
) -> CompressionStudy:
    """Compress the model of ``checkpoint_path`` on ``dataset`` (default: the one it was
    trained for), with the input statistics of the file ``covariance`` if given, and
    write MODEL_FILE, REPORT_FILE and (when computed here) COVARIANCE_FILE into ``out``."""
    options.check()
    out = Path(out)
    if (out / MODEL_FILE).resolve() == Path(checkpoint_path).resolve():
        raise UsageError(f"--out {str(out)!r} would overwrite the input checkpoint {str(checkpoint_path)!r}")
    checkpoint = load_checkpoint(checkpoint_path)
    if checkpoint.compression:
        raise UsageError(f"checkpoint {str(checkpoint_path)!r} is already compressed; compress the original model instead")
    spec = checkpoint.spec
    try:
        model = checkpoint.build_model().eval()
    except RuntimeError as err:  # load_state_dict: the weights are not those of spec.name
        reason = str(err).splitlines()[0]
        raise UsageError(f"checkpoint {str(checkpoint_path)!r} does not match its model {spec.name!r} ({reason})") from None
    data = checkpoint_dataset(checkpoint, dataset, data_dir)
    # Attention projections become nn.Linear layers that SVD can factorise (no-op without attention).
    explicit_attention(model)
    ranks = plan_layer_ranks(model, options)
    if covariance:
        statistics, covariance_source = load_statistics(covariance)
        check_statistics(statistics, model, list(ranks), covariance)
    else:
        statistics = None
        covariance_source = {"dataset": data.name, "batches": options.batches, "batch_size": options.batch_size}
    run = compress_on_data(
        model, data.train, data.test, (spec.in_channels, spec.image_size, spec.image_size), options.method,
        options.norm, ranks, statistics, options.batches, options.batch_size, options.config, progress=progress,
    )  # fmt: skip
    accuracy_finetuned = None
    if options.finetune_epochs:
        torch.manual_seed(options.config.seed)
        loader = DataLoader(data.train, batch_size=options.batch_size, shuffle=True)
        finetune(model, loader, options.finetune_epochs, options.finetune_lr, progress)
        accuracy_finetuned = accuracy(model, data.test, progress=progress, stage="accuracy after fine-tuning")

    shared = run.report()
    report = {
        "checkpoint": str(checkpoint_path),
        "model": asdict(spec),
        "dataset": data.name,
        **shared,
        "ratio": options.ratio,
        "scope": options.scope,
        "covariance": {
            "file": covariance or str(out / COVARIANCE_FILE),
            "source": covariance_source,
            "seconds": run.covariance_seconds,
        },
        "accuracy": {**shared["accuracy"], "after_finetune": accuracy_finetuned},
        "finetune_epochs": options.finetune_epochs,
    }
    files = [out / MODEL_FILE, out / REPORT_FILE]
    out.mkdir(parents=True, exist_ok=True)
    if not covariance:
        files.append(out / COVARIANCE_FILE)
        save_statistics(out / COVARIANCE_FILE, run.statistics, covariance_source)
    save_checkpoint(
        out / MODEL_FILE,
        Checkpoint(spec, checkpoint.dataset, model.state_dict(), run.record, {"compression_report": REPORT_FILE}),
    )
    write_atomically(out / REPORT_FILE, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    return CompressionStudy(run, accuracy_finetuned, report, files)


__all__ = [
    "COVARIANCE_FILE", "MODEL_FILE", "REPORT_FILE", "CompressionStudy", "StudyOptions", "choose_layers",
    "compress_checkpoint", "plan_layer_ranks",
]
