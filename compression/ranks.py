"""Rank selection: parameter counts of the factorised layers and ranks for a target ratio.

A layer is described by its decomposition ``method`` and its weight shape: (T, S, kh, kw)
for a conv (Tucker-2, CPD, or SVD of a 1×1 conv), (T, D) for a linear layer. Biases
are left out of these counts: they are carried over unchanged.
"""

from __future__ import annotations

import math

from dpfl.errors import UsageError


def weight_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def factorised_count(method: str, shape: tuple[int, ...], ranks: tuple[int, ...]) -> int:
    """Weights of the replacement layers."""
    if method == "tucker2":
        out_channels, in_channels, kh, kw = shape
        rank_out, rank_in = ranks
        return in_channels * rank_in + rank_in * rank_out * kh * kw + rank_out * out_channels
    if method == "cpd":
        out_channels, in_channels, kh, kw = shape
        return ranks[0] * (in_channels + kh + kw + out_channels)
    out_features = shape[0]
    return ranks[0] * (out_features + weight_count(shape[1:]))


def max_ranks(method: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The largest ranks that mean anything: the channel counts for Tucker-2, the
    matrix rank bound for SVD, and for CPD the product of all modes but the largest,
    which bounds the CP rank of any tensor of this shape."""
    if method == "tucker2":
        return (shape[0], shape[1])
    if method == "cpd":
        return (weight_count(shape) // max(shape),)
    return (min(shape[0], weight_count(shape[1:])),)


def check_ratio(ratio: float) -> None:
    """A ratio of parameters kept lies in (0, 1)."""
    if not 0 < ratio < 1:
        raise UsageError(f"ratio {ratio} is outside (0, 1): it is the fraction of parameters kept")


def ranks_for_ratio(method: str, shape: tuple[int, ...], ratio: float) -> tuple[int, ...]:
    """The largest ranks whose factorisation keeps at most ``ratio`` of the layer's
    weights (at least rank 1). Tucker-2 keeps r_T/T = r_S/S, as the two factors play
    symmetric roles."""
    budget = ratio * weight_count(shape)
    if method == "tucker2":
        out_channels, in_channels, kh, kw = shape
        # Solve a²·T·S·k + a·(S² + T²) = budget for the shared fraction a = r/channels.
        quadratic = out_channels * in_channels * kh * kw
        linear = in_channels**2 + out_channels**2
        fraction = (-linear + math.sqrt(linear**2 + 4 * quadratic * budget)) / (2 * quadratic)
        return (max(1, int(fraction * out_channels)), max(1, int(fraction * in_channels)))
    per_rank = factorised_count(method, shape, (1,))
    return (max(1, int(budget // per_rank)),)


def check_ranks(name: str, method: str, shape: tuple[int, ...], ranks: tuple[int, ...]) -> None:
    expected = len(max_ranks(method, shape))
    if len(ranks) != expected:
        raise UsageError(f"layer {name}: {method} takes {expected} rank(s), got {','.join(map(str, ranks))}")
    for rank, limit in zip(ranks, max_ranks(method, shape)):
        if not 1 <= rank <= limit:
            raise UsageError(
                f"layer {name}: rank {rank} is outside 1..{limit} for a {method} of a {'x'.join(map(str, shape))} weight"
            )


def plan_ranks(
    layers: dict[str, tuple[str, tuple[int, ...]]],
    ratio: float,
    scope: str,
    model_parameters: int,
    overrides: dict[str, tuple[int, ...]],
) -> dict[str, tuple[int, ...]]:
    """Ranks for every layer in ``layers`` (name → (method, weight shape)).

    ``scope`` "layer": each layer keeps ``ratio`` of its weights. ``scope`` "model":
    the whole model keeps ``ratio`` of its parameters; the layers not compressed count
    in full, and the compressed ones share one per-layer ratio. ``overrides`` (name →
    ranks) take precedence for their layers.
    """
    check_ratio(ratio)
    unknown = sorted(set(overrides) - set(layers))
    if unknown:
        raise UsageError(f"--rank names layer(s) {', '.join(unknown)}, not compressed here; choose from {', '.join(layers)}")
    for name, ranks in overrides.items():
        check_ranks(name, *layers[name], ranks)
    layer_ratio = ratio
    if scope == "model":
        compressed = sum(weight_count(shape) for _, shape in layers.values())
        kept_elsewhere = model_parameters - compressed
        layer_ratio = (ratio * model_parameters - kept_elsewhere) / compressed
        if layer_ratio <= 0:
            raise UsageError(
                f"ratio {ratio} is unreachable: the layers left uncompressed already hold "
                f"{kept_elsewhere / model_parameters:.1%} of the parameters"
            )
    return {
        name: overrides.get(name) or ranks_for_ratio(method, shape, layer_ratio)
        for name, (method, shape) in layers.items()
    }
