"""Multi-head attention with explicit projection layers.

``nn.MultiheadAttention`` keeps its query/key/value projections as one raw parameter
(``in_proj_weight``) that it reads itself, so neither compression (which swaps modules)
nor a crossbar mapper (which places ``nn.Linear`` weights) can reach them.
:class:`ExplicitAttention` computes the same function with the four projections as
``nn.Linear`` modules; the two products of activations by activations (scores QKᵀ and
the weighted sum of values) are plain tensor products, the part a CIM accelerator
keeps digital. :func:`explicit_attention` swaps it in for every
``nn.MultiheadAttention`` of a model, weights included.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from dpfl.errors import UsageError


class ExplicitAttention(nn.Module):
    """``nn.MultiheadAttention`` (same arguments of ``forward``, same results) with
    ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as ``nn.Linear`` layers."""

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
        kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise UsageError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    @torch.no_grad()
    def from_multihead(cls, attention: nn.MultiheadAttention) -> ExplicitAttention:
        if attention.bias_k is not None or attention.add_zero_attn:
            raise UsageError("nn.MultiheadAttention with add_bias_kv or add_zero_attn has no explicit equivalent here")
        bias = attention.in_proj_bias is not None
        explicit = cls(attention.embed_dim, attention.num_heads, attention.dropout, bias,
                       attention.kdim, attention.vdim, attention.batch_first)  # fmt: skip
        if attention._qkv_same_embed_dim:
            weights = attention.in_proj_weight.chunk(3)
        else:
            weights = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
        biases = attention.in_proj_bias.chunk(3) if bias else (None, None, None)
        for layer, weight, layer_bias in zip((explicit.q_proj, explicit.k_proj, explicit.v_proj), weights, biases):
            layer.weight.copy_(weight)
            if layer_bias is not None:
                layer.bias.copy_(layer_bias)
        explicit.out_proj.weight.copy_(attention.out_proj.weight)
        if bias:
            explicit.out_proj.bias.copy_(attention.out_proj.bias)
        return explicit.train(attention.training)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None, need_weights: bool = True, attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if self.batch_first and not unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (length, batch, features) from here on, as nn.MultiheadAttention computes.
        target, batch = query.shape[:2]
        source = key.shape[0]
        heads, head_dim = self.num_heads, self.embed_dim // self.num_heads

        def split(x: torch.Tensor, length: int) -> torch.Tensor:
            return x.reshape(length, batch * heads, head_dim).transpose(0, 1)

        q = split(self.q_proj(query), target)
        k = split(self.k_proj(key), source)
        v = split(self.v_proj(value), source)
        # Activations times activations: digital on a CIM accelerator.
        scores = q @ k.transpose(1, 2) / math.sqrt(head_dim)
        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, target, source, batch, heads, scores.dtype)
        if mask is not None:
            scores = scores + mask
        weights = F.softmax(scores, dim=-1)
        dropped = F.dropout(weights, p=self.dropout) if self.training and self.dropout > 0 else weights
        attended = (dropped @ v).transpose(0, 1).reshape(target, batch, self.embed_dim)
        output = self.out_proj(attended)
        if self.batch_first and not unbatched:
            output = output.transpose(0, 1)
        if unbatched:
            output = output.squeeze(1)
        if not need_weights:
            return output, None
        weights = weights.reshape(batch, heads, target, source)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return output, weights.squeeze(0) if unbatched else weights


def _additive_mask(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool,
    target: int, source: int, batch: int, heads: int, dtype: torch.dtype,
) -> torch.Tensor | None:
    """The masks as one additive (batch·heads, target, source) term; True means 'masked'."""

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    if attn_mask is None and is_causal:
        attn_mask = torch.ones(target, source, dtype=torch.bool).triu(1)
    total = None
    if attn_mask is not None:
        total = additive(attn_mask)
        total = total.expand(batch * heads, target, source) if total.dim() == 2 else total
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).reshape(batch, 1, 1, source).expand(batch, heads, 1, source)
        padding = padding.reshape(batch * heads, 1, source)
        total = padding if total is None else total + padding
    return total


def explicit_attention(model: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by its :class:`ExplicitAttention`
    (in place); return how many were replaced."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, ExplicitAttention.from_multihead(module))
    return len(targets)


__all__ = ["ExplicitAttention", "explicit_attention"]
