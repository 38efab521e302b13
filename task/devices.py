"""Where the clients train: ``device`` = auto, cpu, cuda, cuda:N or mps.

``auto`` takes a CUDA GPU if torch sees one, else Apple's MPS, else the CPU. ``cuda``
is the process's current CUDA device (an engine that runs several GPUs makes each
worker's GPU its current device, and Flower's engine shows each ClientApp only the GPU
it assigned); ``cuda:N`` pins GPU N. A device that is not there is refused in one line
naming the devices that are.

Only the computation moves: whatever the privacy guarantee rests on (clipping in
float64, the secure noise, the sum) runs on the CPU (``dpfl.client.training``).
"""

from __future__ import annotations

import re

import torch

from dpfl.errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_name(name: str) -> None:
    """A one-line error unless ``name`` is one of :data:`DEVICE_CHOICES` (N a GPU's index)."""
    if not _PATTERN.fullmatch(name):
        raise UsageError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")


def available_devices() -> list[str]:
    """The devices torch can use in this process, CPU first."""
    gpus = [f"cuda:{index}" for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *gpus, *(["mps"] if torch.backends.mps.is_available() else [])]


def device_name(name: str) -> str:
    """The device ``name`` stands for here ("cpu", "mps", "cuda" or "cuda:N"), or a one-line
    error naming the devices that are available.

    Queries CUDA without initialising it, so that processes forked afterwards can still
    use it; "cpu" queries nothing.
    """
    check_device_name(name)
    if name == "cpu":
        return name
    available = available_devices()
    gpus = [device for device in available if device.startswith("cuda")]
    if name == "auto":
        return "cuda" if gpus else "mps" if "mps" in available else "cpu"
    if name in available or (name == "cuda" and gpus):
        return name
    why = "; this torch was built without CUDA" if name.startswith("cuda") and torch.version.cuda is None else ""
    raise UsageError(f"device {name!r} is not available here{why}; available: {', '.join(available)}")


def resolve_device(name: str) -> torch.device:
    """The torch device of ``name`` in this process (``cuda``: its current CUDA device)."""
    resolved = device_name(name)
    if resolved == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(resolved)


def cuda_devices(name: str) -> list[int]:
    """The GPUs a run on device ``name`` spreads its workers over (none for a CPU or MPS run)."""
    resolved = device_name(name)
    if resolved == "cuda":
        return list(range(torch.cuda.device_count()))
    return [torch.device(resolved).index] if resolved.startswith("cuda:") else []
