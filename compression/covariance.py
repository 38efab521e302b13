"""Input statistics of the layers to compress: streaming mean and covariance, and their files.

A layer's input vectors are those it multiplies by its weight matrix
(:func:`dpfl.task.layers.input_rows`: im2col patches for a conv). Sums are kept in
float64 so a long stream of batches loses no precision. A statistics file is keyed by
layer name and records each layer's geometry, so one computed on one data set can
compress the same model for another, and a file for other layers is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpfl.errors import UsageError
from dpfl.task.files import load_tagged, save_tagged
from dpfl.task.layers import input_rows, watch_layers

STATISTICS_FORMAT = "dpfl-covariance-v1"


def layer_signature(module: nn.Module) -> dict[str, Any]:
    """What fixes the meaning of a layer's input vector: two layers with equal
    signatures can share statistics."""
    if isinstance(module, nn.Conv2d):
        return {
            "kind": "conv",
            "dim": module.in_channels * module.kernel_size[0] * module.kernel_size[1],
            "kernel_size": list(module.kernel_size),
            "stride": list(module.stride),
            "padding": list(module.padding),
            "dilation": list(module.dilation),
        }
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "dim": module.in_features}
    raise TypeError(f"no input statistics for {type(module).__name__}")


@dataclass
class InputMoments:
    """Σx and Σxxᵀ over ``count`` input vectors of one layer."""

    signature: dict[str, Any]
    count: int
    total: torch.Tensor  # (D,)
    outer: torch.Tensor  # (D, D)

    @classmethod
    def empty(cls, signature: dict[str, Any]) -> InputMoments:
        dim = signature["dim"]
        return cls(signature, 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64))

    def update(self, vectors: torch.Tensor) -> None:
        vectors = vectors.detach().to(torch.float64)
        self.count += vectors.shape[0]
        self.total += vectors.sum(dim=0)
        self.outer += vectors.T @ vectors

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def second_moment(self) -> torch.Tensor:
        """E[xxᵀ]."""
        return self.outer / self.count

    @property
    def covariance(self) -> torch.Tensor:
        """E[(x − μ)(x − μ)ᵀ]."""
        mean = self.mean
        return self.second_moment - torch.outer(mean, mean)


def collect_statistics(
    model: nn.Module, batches: Iterable, layer_names: list[str], max_batches: int
) -> dict[str, InputMoments]:
    """Run ``model`` on up to ``max_batches`` batches (x or (x, y, ...)) and accumulate
    the input statistics of the named layers."""
    layers = {name: model.get_submodule(name) for name in layer_names}
    statistics = {name: InputMoments.empty(layer_signature(layer)) for name, layer in layers.items()}

    def observe(name: str, layer: nn.Module, inputs: torch.Tensor, _output: torch.Tensor) -> None:
        statistics[name].update(input_rows(layer, inputs))

    with watch_layers(model, layers, observe):
        for index, batch in enumerate(batches):
            if index >= max_batches:
                break
            model(batch[0] if isinstance(batch, (list, tuple)) else batch)
    return statistics


def save_statistics(path: str | Path, statistics: dict[str, InputMoments], source: dict[str, Any]) -> None:
    """One file: format tag, where the data came from (``source``), and per layer its
    signature, sample count and float64 sums."""
    payload = {
        "source": source,
        "layers": {
            name: {"signature": s.signature, "count": s.count, "total": s.total, "outer": s.outer}
            for name, s in statistics.items()
        },
    }
    save_tagged(path, STATISTICS_FORMAT, payload)


def load_statistics(path: str | Path) -> tuple[dict[str, InputMoments], dict[str, Any]]:
    """The per-layer statistics and the ``source`` record of a statistics file."""
    payload = load_tagged(path, STATISTICS_FORMAT, "covariance file")
    statistics = {
        name: InputMoments(entry["signature"], int(entry["count"]), entry["total"], entry["outer"])
        for name, entry in payload["layers"].items()
    }
    return statistics, payload.get("source", {})


def check_statistics(statistics: dict[str, InputMoments], model: nn.Module, layer_names: list[str], path: str) -> None:
    """Every layer to compress must be in the file with the same input geometry."""
    missing = [name for name in layer_names if name not in statistics]
    if missing:
        raise UsageError(
            f"covariance file {path!r} has no statistics for layer(s) {', '.join(missing)} "
            f"(it covers {', '.join(statistics) or 'no layers'})"
        )
    for name in layer_names:
        expected = layer_signature(model.get_submodule(name))
        if statistics[name].signature != expected:
            raise UsageError(
                f"covariance file {path!r}: layer {name} was recorded as {statistics[name].signature}, "
                f"but this model's layer is {expected}"
            )
