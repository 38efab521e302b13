"""The decomposition methods, norms and scopes of a compression, without torch.

Why this module exists: ``dpfl compress --help`` and the check of a run's deployment
settings list these names, and they used to live in :mod:`dpfl.compression.pipeline`,
``study`` and ``surgery``, which import torch, so printing help took seconds. Every module
that uses them (``study``, ``dpfl.deployment.node``, ...) reads them from here. It imports
nothing.
"""

from __future__ import annotations

# The layer types each method factorises.
METHOD_LAYERS = {
    "tucker2": "conv layers with kernels larger than 1x1",
    "cpd": "conv layers with kernels larger than 1x1",
    "svd": "linear layers and 1x1 conv layers",
}
METHODS = tuple(METHOD_LAYERS)
NORMS = ("sigma", "frobenius")
# model: the whole model keeps the ratio of its parameters; layer: each compressed layer does.
SCOPES = ("model", "layer")

__all__ = ["METHODS", "METHOD_LAYERS", "NORMS", "SCOPES"]
