"""Factorised layer structures, and the ``compression`` record of a checkpoint that
describes them, so a checkpoint of a compressed model rebuilds without the code that
compressed it (:mod:`dpfl.compression` computes the factors).

Replacements (each an ``nn.Sequential``, so ``state_dict`` keys gain a ``.0``…``.3``):
* Tucker-2 of a k×k conv: 1×1 (S→r_S) → k×k (r_S→r_T, the original stride, padding and
  dilation) → 1×1 (r_T→T, with the bias);
* CPD of a k×k conv: 1×1 (S→R) → depthwise kh×1 → depthwise 1×kw (the vertical and
  horizontal parts of stride, padding, dilation) → 1×1 (R→T, with the bias);
* SVD of a linear layer or a 1×1 conv: two linears (or two 1×1 convs), D→r→T.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dpfl.errors import UsageError
from dpfl.task.attention import ExplicitAttention, explicit_attention

COMPRESSION_FORMAT = "dpfl-compression-v1"
# A compression record's "attention" value when the model's nn.MultiheadAttention layers
# were replaced by dpfl.task.attention.ExplicitAttention (projections as nn.Linear).
EXPLICIT_ATTENTION = "explicit"


def factorised_structure(module: nn.Module, method: str, ranks: tuple[int, ...], bias: bool) -> nn.Sequential:
    """The replacement for ``module`` by ``method`` at ``ranks``, with uninitialised weights."""
    if isinstance(module, nn.Linear):
        (rank,) = ranks
        return nn.Sequential(
            nn.Linear(module.in_features, rank, bias=False), nn.Linear(rank, module.out_features, bias=bias)
        )
    in_channels, out_channels = module.in_channels, module.out_channels
    geometry = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
    if method == "svd":
        (rank,) = ranks
        return nn.Sequential(
            nn.Conv2d(in_channels, rank, 1, bias=False, **geometry), nn.Conv2d(rank, out_channels, 1, bias=bias)
        )
    if method == "tucker2":
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


def replace_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, replacement)


def layer_record(method: str, ranks: tuple[int, ...], bias: bool) -> dict[str, Any]:
    """How one replaced layer is described in a checkpoint's ``compression`` record
    (its key "kind" names the method; kept so checkpoints already written still load)."""
    return {"kind": method, "ranks": list(ranks), "bias": bias}


def compression_record(model: nn.Module, method: str, norm: str, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A checkpoint's ``compression`` record for ``model`` after its ``layers`` (name →
    :func:`layer_record`) were replaced."""
    record = {"format": COMPRESSION_FORMAT, "method": method, "norm": norm, "layers": layers}
    if any(isinstance(module, ExplicitAttention) for module in model.modules()):
        record["attention"] = EXPLICIT_ATTENTION  # restore_structure converts before it rebuilds the layers
    return record


def restore_structure(model: nn.Module, record: dict[str, Any]) -> None:
    """Rebuild the factorised layers described by ``record`` (a checkpoint's
    ``compression`` record) in a freshly built model, so ``load_state_dict`` fills them."""
    if record.get("format") != COMPRESSION_FORMAT:
        raise UsageError(f"checkpoint compression record is not {COMPRESSION_FORMAT}")
    if record.get("attention") == EXPLICIT_ATTENTION:
        explicit_attention(model)
    modules = dict(model.named_modules())
    for name, layer in record["layers"].items():
        module = modules.get(name)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise UsageError(f"checkpoint compresses layer {name!r}, which this model does not have as a conv or linear")
        replace_module(model, name, factorised_structure(module, layer["kind"], tuple(layer["ranks"]), layer["bias"]))


__all__ = [
    "COMPRESSION_FORMAT", "EXPLICIT_ATTENTION", "compression_record", "factorised_structure", "layer_record",
    "replace_module", "restore_structure",
]
