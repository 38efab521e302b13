"""What a client process keeps between messages: what is constant for a run.

An engine delivers many simulated nodes' messages to one process (each of Flower's
Ray actors, the in-process engine and each of its worker processes). Parsing the
run config and building the model once per message cost more than a small model's
local training; here each is done once per process and reused. The data partitions
are cached in :mod:`dpfl.client.data`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dpfl.settings import RunSettings
from dpfl.task.checkpoint import ModelSpec
from dpfl.task.devices import resolve_device

# One model per thread: an engine running several clients at once in one process
# (threads) must not train them on the same module.
_per_thread = threading.local()


def run_settings(run_config: Mapping[str, Any]) -> RunSettings:
    """The run's settings, parsed and validated once per run config in this process."""
    return _parse(tuple(sorted(run_config.items())))


@functools.lru_cache(maxsize=4)
def _parse(items: tuple[tuple[str, Any], ...]) -> RunSettings:
    return RunSettings.from_run_config(dict(items))


def run_device(name: str) -> torch.device:
    """The torch device of the run's ``device`` key in this process (``dpfl.task.devices``)."""
    return _device(name)


@functools.lru_cache(maxsize=4)
def _device(name: str) -> torch.device:
    return resolve_device(name)


def resident_model(spec: ModelSpec, device: torch.device | None = None) -> nn.Module:
    """This thread's one instance of the model ``spec`` describes on ``device`` (default the
    CPU), to be loaded with weights.

    Its state dict holds every parameter and buffer, so once loaded it computes what
    a freshly built model would. A new spec or device replaces the kept model.
    """
    key = (spec, device or torch.device("cpu"))
    kept = getattr(_per_thread, "model", None)
    if kept is None or kept[0] != key:
        kept = _per_thread.model = (key, spec.build().to(key[1]))
    return kept[1]
