"""Model surgery: which layers can be factorised, the modules that replace them, and
rebuilding that structure from a checkpoint's description.

Replacements (each an ``nn.Sequential``, so ``state_dict`` keys gain a ``.0``…``.3``):
* Tucker-2 of a k×k conv: 1×1 (S→r_S) → k×k (r_S→r_T, the original stride, padding and
  dilation) → 1×1 (r_T→T, with the bias);
* CPD of a k×k conv: 1×1 (S→R) → depthwise kh×1 → depthwise 1×kw (the vertical and
  horizontal parts of stride, padding, dilation) → 1×1 (R→T, with the bias);
* SVD of a linear layer or a 1×1 conv: two linears (or two 1×1 convs), D→r→T.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpfl.errors import UsageError
from dpfl.task.attention import explicit_attention

COMPRESSION_FORMAT = "dpfl-compression-v1"
# A compression record's "attention" value when the model's nn.MultiheadAttention layers
# were replaced by dpfl.task.attention.ExplicitAttention (projections as nn.Linear).
EXPLICIT_ATTENTION = "explicit"

# The layer types each method factorises.
METHOD_LAYERS = {
    "tucker2": "conv layers with kernels larger than 1x1",
    "cpd": "conv layers with kernels larger than 1x1",
    "svd": "linear layers and 1x1 conv layers",
}


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


def factorised_structure(module: nn.Module, kind: str, ranks: tuple[int, ...], bias: bool) -> nn.Sequential:
    """The replacement for ``module`` at ``ranks``, with uninitialised weights."""
    if isinstance(module, nn.Linear):
        (rank,) = ranks
        return nn.Sequential(
            nn.Linear(module.in_features, rank, bias=False), nn.Linear(rank, module.out_features, bias=bias)
        )
    in_channels, out_channels = module.in_channels, module.out_channels
    geometry = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
    if kind == "svd":
        (rank,) = ranks
        return nn.Sequential(
            nn.Conv2d(in_channels, rank, 1, bias=False, **geometry), nn.Conv2d(rank, out_channels, 1, bias=bias)
        )
    if kind == "tucker2":
        rank_out, rank_in = ranks
        return nn.Sequential(
            nn.Conv2d(in_channels, rank_in, 1, bias=False),
            nn.Conv2d(rank_in, rank_out, module.kernel_size, bias=False, **geometry),
            nn.Conv2d(rank_out, out_channels, 1, bias=bias),
        )
    (rank,) = ranks
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = module.kernel_size, module.stride, module.padding, module.dilation
    return nn.Sequential(
        nn.Conv2d(in_channels, rank, 1, bias=False),
        nn.Conv2d(rank, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=rank, bias=False),
        nn.Conv2d(rank, rank, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=rank, bias=False),
        nn.Conv2d(rank, out_channels, 1, bias=bias),
    )


@torch.no_grad()
def load_factors(structure: nn.Sequential, factors: list[torch.Tensor], bias: torch.Tensor | None) -> None:
    """Copy the factors (one weight per submodule, any shape with the same number of
    elements, in the order of the sequence) and the bias into ``structure``."""
    for layer, factor in zip(structure, factors, strict=True):
        layer.weight.copy_(factor.reshape(layer.weight.shape))
    if bias is not None:
        structure[-1].bias.copy_(bias)


def replace_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, replacement)


def layer_record(kind: str, ranks: tuple[int, ...], bias: bool) -> dict[str, Any]:
    """How one replaced layer is described in a checkpoint's ``compression`` dict."""
    return {"kind": kind, "ranks": list(ranks), "bias": bias}


def restore_structure(model: nn.Module, spec: dict[str, Any]) -> None:
    """Rebuild the factorised layers described by ``spec`` (a checkpoint's
    ``compression`` dict) in a freshly built model, so ``load_state_dict`` fills them."""
    if spec.get("format") != COMPRESSION_FORMAT:
        raise UsageError(f"checkpoint compression record is not {COMPRESSION_FORMAT}")
    if spec.get("attention") == EXPLICIT_ATTENTION:
        explicit_attention(model)
    modules = dict(model.named_modules())
    for name, record in spec["layers"].items():
        module = modules.get(name)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise UsageError(f"checkpoint compresses layer {name!r}, which this model does not have as a conv or linear")
        replace_module(model, name, factorised_structure(module, record["kind"], tuple(record["ranks"]), record["bias"]))
