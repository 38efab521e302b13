"""Model checkpoints that carry their own architecture description.

A checkpoint is one ``torch.save`` file holding the model name and constructor
arguments, the data set it was trained for, the weights, and, for a compressed
model, the description of the layers compression replaced. Anything that reads a
model (``dpfl compress``, ``dpfl deploy``) rebuilds it from that alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpfl.errors import UsageError
from dpfl.task.data import TaskData, load_dataset
from dpfl.task.factorised import restore_structure
from dpfl.task.files import load_tagged, save_tagged
from dpfl.task.models import VIT_DEPTH, build_model

CHECKPOINT_FORMAT = "dpfl-checkpoint-v1"


@dataclass(frozen=True)
class ModelSpec:
    """Everything ``build_model`` needs to rebuild a model."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    width: int
    # The ViT's encoder blocks; the default is the depth every checkpoint saved before
    # this field existed was built with, so those still load.
    depth: int = VIT_DEPTH

    @classmethod
    def for_data(cls, name: str, width: int, data: TaskData, depth: int = VIT_DEPTH) -> ModelSpec:
        """The spec of model ``name`` at ``width`` and ``depth`` for the classes and images of ``data``."""
        return cls(name, data.num_classes, data.in_channels, data.image_size, width, depth)

    def build(self) -> nn.Module:
        return build_model(self.name, self.num_classes, self.in_channels, self.image_size, self.width, self.depth)


@dataclass
class Checkpoint:
    spec: ModelSpec
    dataset: str
    state_dict: dict[str, torch.Tensor]
    # Layer replacements made by dpfl.compression (dpfl.task.factorised; empty for an
    # uncompressed model).
    compression: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def build_model(self) -> nn.Module:
        model = self.spec.build()
        if self.compression:
            restore_structure(model, self.compression)
        model.load_state_dict(self.state_dict)
        return model


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    payload = {
        "model": asdict(checkpoint.spec),
        "dataset": checkpoint.dataset,
        "state_dict": {k: v.detach().cpu() for k, v in checkpoint.state_dict.items()},
        "compression": checkpoint.compression,
        "extra": checkpoint.extra,
    }
    save_tagged(path, CHECKPOINT_FORMAT, payload)


def load_checkpoint(path: str | Path) -> Checkpoint:
    payload = load_tagged(path, CHECKPOINT_FORMAT, "checkpoint")
    return Checkpoint(
        spec=ModelSpec(**payload["model"]),
        dataset=payload["dataset"],
        state_dict=payload["state_dict"],
        compression=payload.get("compression") or {},
        extra=payload.get("extra") or {},
    )


def checkpoint_dataset(checkpoint: Checkpoint, name: str | None = None, data_dir: str | None = None) -> TaskData:
    """The data set ``name`` (default: the one ``checkpoint`` was trained for) at the
    model's image size; a one-line error unless it has the model's channels and classes."""
    spec = checkpoint.spec
    data = load_dataset(name or checkpoint.dataset, data_dir, image_size=spec.image_size)
    if (data.in_channels, data.num_classes) != (spec.in_channels, spec.num_classes):
        raise UsageError(
            f"dataset {data.name!r} has {data.in_channels} channels and {data.num_classes} classes; "
            f"the model expects {spec.in_channels} and {spec.num_classes}"
        )
    return data
