"""Training one model for devices of several weight precisions (EMQ's child models).

A multi-bit network (Kim et al., "Efficient Multi-bit Quantization Network Training
via Weight Bias Correction and Bit-wise Coreset Sampling", arXiv 2510.20673) trains
one set of full-precision weights whose quantisations at each bit-width all work: each
step takes the forward and backward pass of every child model (the weights quantised
at one bit-width) in turn and steps along the mean gradient. The quantiser is the
deployment's own (:func:`dpfl.cim.mapping.quantise_weights`: symmetric, per output
channel), and the gradient of a child model is the straight-through estimator's: the
gradient at the quantised weights, applied to the full-precision ones.

Pure torch; the training loop (``dpfl.client.training``) calls
:func:`multi_precision_gradient` around its gradient computation. Nothing here draws
a random number or reads data, so the update it produces is clipped and noised exactly
as any other (only the local objective changes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dpfl.cim.mapping import quantise_weights


@contextmanager
def quantised_weights(model: nn.Module, bits: int) -> Iterator[None]:
    """Inside, every Conv2d and Linear weight of ``model`` holds its ``bits``-bit
    quantisation (per output channel, as a deployment maps it); on exit the
    full-precision weights return. Gradients taken inside are at the quantised weights."""
    saved = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                weight = module.weight
                q, step = quantise_weights(weight.reshape(weight.shape[0], -1), bits)
                saved.append((weight, weight.detach().clone()))
                weight.copy_((q.to(weight.dtype) * step[:, None]).reshape(weight.shape))
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def multi_precision_gradient(compute: Callable[[], float], model: nn.Module, bit_widths: tuple[int, ...]) -> float:
    """``compute()`` (fills each parameter's ``grad``, returns the loss) for the
    full-precision weights and for each of ``bit_widths`` in turn; leaves the mean
    gradient in ``grad`` and returns the mean loss. Without bit widths, ``compute()``."""
    if not bit_widths:
        return compute()
    params = list(model.parameters())
    total = [torch.zeros_like(param) for param in params]
    loss = 0.0
    for bits in (None, *bit_widths):
        for param in params:
            if param.grad is not None:
                param.grad.zero_()
        if bits is None:
            loss += compute()
        else:
            with quantised_weights(model, bits):
                loss += compute()
        for sum_, param in zip(total, params):
            if param.grad is not None:
                sum_ += param.grad
    count = 1 + len(bit_widths)
    for sum_, param in zip(total, params):
        param.grad = sum_ / count
    return loss / count


__all__ = ["multi_precision_gradient", "quantised_weights"]
