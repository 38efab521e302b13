"""Multiply-accumulates of a model's conv and linear modules, from one forward pass."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs per conv/linear module (by name) for one input of shape (C, H, W).

    Measured with hooks rather than derived from shapes, so strides, padding and any
    replacement structure are counted as they run. Weights used outside modules (the
    attention projections of ``nn.MultiheadAttention``) are not counted.
    """
    macs: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            per_output = module.in_features
        else:
            continue

        def hook(module: nn.Module, args: tuple, output: torch.Tensor, name: str = name, per_output: int = per_output) -> None:
            macs[name] = macs.get(name, 0) + output.numel() * per_output

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        parameter = next(model.parameters())
        model(torch.zeros(1, *input_shape, dtype=parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return macs


def macs_under(macs: dict[str, int], name: str) -> int:
    """MACs of module ``name`` and everything inside it."""
    return sum(value for key, value in macs.items() if key == name or key.startswith(name + "."))
