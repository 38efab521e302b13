"""A node's own data: its partition of the run's data set, found from its node config.

In simulation Flower sets ``partition-id`` and ``num-partitions``; the node then
partitions the data set named in the run config with the run's seed, so every node
computes the same split. A deployed node may instead be given ``data-file``: a file
holding only its own partition (written by :func:`export_partition`), so that it
never sees the others' data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from dpfl.errors import UsageError
from dpfl.settings import RunSettings
from dpfl.task.checkpoint import ModelSpec
from dpfl.task.data import cached_dataset
from dpfl.task.files import write_atomically
from dpfl.task.partition import check_partition_id, partition_indices


@dataclass(frozen=True)
class ClientPartition:
    dataset: Dataset
    spec: ModelSpec


def _partition(settings: RunSettings, partition_id: int, num_partitions: int) -> ClientPartition:
    check_partition_id(partition_id, num_partitions)
    data = cached_dataset(settings.dataset, settings.data_dir, settings.image_size)
    parts = _split(settings.dataset, settings.data_dir, settings.image_size, settings.partition,
                   settings.dirichlet_alpha, settings.seed, num_partitions)  # fmt: skip
    return ClientPartition(Subset(data.train, parts[partition_id]), ModelSpec.for_data(settings.model, settings.model_width, data, settings.model_depth))


@lru_cache(maxsize=2)
def _split(
    dataset: str, data_dir: str, image_size: int, scheme: str, alpha: float, seed: int, num_partitions: int
) -> tuple[list[int], ...]:
    """Every partition's indices, computed once per process: one engine process serves many nodes."""
    labels = cached_dataset(dataset, data_dir, image_size).train_labels
    return tuple(part.tolist() for part in partition_indices(labels, num_partitions, scheme, alpha, seed))


@lru_cache(maxsize=2)
def _partition_file(path: str, settings: RunSettings) -> ClientPartition:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"data-file {path!r} does not exist")
    payload = torch.load(file, map_location="cpu", weights_only=True)
    x, y = payload["x"], payload["y"]
    spec = ModelSpec(settings.model, int(payload["num-classes"]), x.shape[1], x.shape[-1], settings.model_width, settings.model_depth)
    return ClientPartition(TensorDataset(x, y), spec)


def load_client_partition(settings: RunSettings, node_config: Mapping[str, Any]) -> ClientPartition:
    if "data-file" in node_config:
        return _partition_file(str(node_config["data-file"]), settings)
    try:
        partition_id, num_partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as err:
        raise UsageError(f"node config needs {err.args[0]!r} (or 'data-file')") from None
    return _partition(settings, partition_id, num_partitions)


def export_partition(settings: RunSettings, partition_id: int, num_partitions: int, path: str | Path) -> int:
    """Write one node's partition as a ``data-file`` (atomically); return its number of samples."""
    part = _partition(settings, partition_id, num_partitions)
    xs, ys = zip(*(part.dataset[i] for i in range(len(part.dataset))))
    write_data_file(path, torch.stack(xs), torch.as_tensor(ys), part.spec.num_classes, settings.dataset)
    return len(xs)


def write_data_file(path: str | Path, x: torch.Tensor, y: torch.Tensor, num_classes: int, dataset: str) -> None:
    """Write examples ``x`` with labels ``y`` as a node's ``data-file`` (atomically)."""
    payload = {"x": x, "y": y, "num-classes": num_classes, "dataset": dataset}
    write_atomically(path, lambda tmp: torch.save(payload, tmp))
