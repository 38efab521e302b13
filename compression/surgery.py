"""Model surgery: which layers each decomposition method can factorise, and loading
the factors into the replacement structures (:mod:`dpfl.task.factorised`).
"""

from __future__ import annotations

import torch
from torch import nn


def is_eligible(module: nn.Module, method: str, parent: nn.Module | None) -> bool:
    """Plain (ungrouped, zero-padded, explicitly padded) convs and linears only; a
    Linear owned by ``nn.MultiheadAttention`` is read as a raw weight by its parent and
    cannot be swapped for a module."""
    if isinstance(module, nn.Conv2d):
        plain = module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
        pointwise = module.kernel_size == (1, 1)
        return plain and (pointwise if method == "svd" else not pointwise)
    if isinstance(module, nn.Linear):
        return method == "svd" and not isinstance(parent, nn.MultiheadAttention)
    return False


def eligible_layers(model: nn.Module, method: str) -> list[str]:
    modules = dict(model.named_modules())
    return [
        name
        for name, module in modules.items()
        if name and is_eligible(module, method, modules[name.rpartition(".")[0]])
    ]


def default_layers(model: nn.Module, method: str) -> list[str]:
    """The eligible layers except the first conv and the classifier (the last linear):
    both are small and the most sensitive to approximation."""
    modules = list(model.named_modules())
    first_conv = next((name for name, m in modules if isinstance(m, nn.Conv2d)), None)
    classifier = next((name for name, m in reversed(modules) if isinstance(m, nn.Linear)), None)
    return [name for name in eligible_layers(model, method) if name not in (first_conv, classifier)]


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    return tuple(module.weight.shape)


@torch.no_grad()
def load_factors(structure: nn.Sequential, factors: list[torch.Tensor], bias: torch.Tensor | None) -> None:
    """Copy the factors (one weight per submodule, any shape with the same number of
    elements, in the order of the sequence) and the bias into ``structure``."""
    for layer, factor in zip(structure, factors, strict=True):
        layer.weight.copy_(factor.reshape(layer.weight.shape))
    if bias is not None:
        structure[-1].bias.copy_(bias)
