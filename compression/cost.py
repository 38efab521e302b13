"""Multiply-accumulates of a model's conv and linear modules, from one forward pass."""

from __future__ import annotations

import torch
from torch import nn

from dpfl.task.layers import watch_layers


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs per conv/linear module (by name) for one input of shape (C, H, W).

    Measured with hooks rather than derived from shapes, so strides, padding and any
    replacement structure are counted as they run. Weights used outside modules (the
    attention projections of ``nn.MultiheadAttention``) are not counted.
    """
    macs: dict[str, int] = {}

    def observe(name: str, layer: nn.Module, _input: torch.Tensor, output: torch.Tensor) -> None:
        if isinstance(layer, nn.Conv2d):
            per_output = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        else:
            per_output = layer.in_features
        macs[name] = macs.get(name, 0) + output.numel() * per_output

    layers = {name: module for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))}
    with watch_layers(model, layers, observe):
        parameter = next(model.parameters())
        model(torch.zeros(1, *input_shape, dtype=parameter.dtype))
    return macs


def macs_under(macs: dict[str, int], name: str) -> int:
    """MACs of module ``name`` and everything inside it."""
    return sum(value for key, value in macs.items() if key == name or key.startswith(name + "."))
