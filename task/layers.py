"""What a Conv2d or Linear layer multiplies by its weight matrix (im2col), and watching
those inputs (and outputs) during forward passes.

Shared by compression (input covariance, MAC counts) and the crossbar simulation
(calibration, analog layers), which both see a layer as a matrix product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from dpfl.errors import UsageError

# observe(name, layer, input, output) after one forward pass of a watched layer.
Observer = Callable[[str, nn.Module, torch.Tensor, torch.Tensor], None]


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The explicit (height, width) zero padding of ``conv``: "valid" and symmetric
    "same" resolved; one-line error for what im2col cannot express."""
    if conv.padding_mode != "zeros":
        raise UsageError(f"padding mode {conv.padding_mode!r} is not supported; only zero padding maps to im2col")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise UsageError("asymmetric 'same' padding is not supported; use explicit padding")
        return (total[0] // 2, total[1] // 2)
    return tuple(conv.padding)


def input_rows(layer: nn.Conv2d | nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The vectors ``layer`` multiplies by its flattened weight, as rows (N, D): for a
    conv the im2col patches (``F.unfold``: channel-major, then kernel rows and columns,
    the order of ``weight.view(T, -1)``), one per output position; for a linear layer
    the feature vectors, one per token."""
    if isinstance(layer, nn.Conv2d):
        patches = F.unfold(x, layer.kernel_size, layer.dilation, conv_padding(layer), layer.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


@contextmanager
def watch_layers(model: nn.Module, layers: Mapping[str, nn.Module], observe: Observer) -> Iterator[None]:
    """While open, ``observe(name, layer, input, output)`` runs after every forward pass
    of each of ``layers`` (name → a module of ``model``), and ``model`` runs in eval
    mode without gradients. On exit the hooks are removed and the training flag restored."""
    handles = [
        layer.register_forward_hook(lambda module, args, output, name=name: observe(name, module, args[0], output))
        for name, layer in layers.items()
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


__all__ = ["Observer", "conv_padding", "input_rows", "watch_layers"]
