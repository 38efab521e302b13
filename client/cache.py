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

from torch import nn

from dpfl.settings import RunSettings
from dpfl.task.checkpoint import ModelSpec

# One model per thread: an engine running several clients at once in one process
# (threads) must not train them on the same module.
_per_thread = threading.local()


def run_settings(run_config: Mapping[str, Any]) -> RunSettings:
    """The run's settings, parsed and validated once per run config in this process."""
    return _parse(tuple(sorted(run_config.items())))


@functools.lru_cache(maxsize=4)
def _parse(items: tuple[tuple[str, Any], ...]) -> RunSettings:
    return RunSettings.from_run_config(dict(items))


def resident_model(spec: ModelSpec) -> nn.Module:
    """This thread's one instance of the model ``spec`` describes, to be loaded with weights.

    Its state dict holds every parameter and buffer, so once loaded it computes what
    a freshly built model would. A new spec replaces the kept model.
    """
    kept = getattr(_per_thread, "model", None)
    if kept is None or kept[0] != spec:
        kept = _per_thread.model = (spec, spec.build())
    return kept[1]
