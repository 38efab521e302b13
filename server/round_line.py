"""A round's public record as one line of text: the ServerApp's log (what ``flwr log``
streams) and ``dpfl simulate``'s output print the same line."""

from __future__ import annotations

from typing import Any

from dpfl.server.recorder import format_epsilon


def round_line(row: dict[str, Any], rounds: int, delta: float, local_delta: float) -> str:
    """``row`` (a line of metrics.jsonl) of a run of ``rounds`` rounds at ``delta``: accuracy,
    loss, the guarantee the run has, and the round's time.

    A run without a valid client-level ε but with sample-level DP inside every client (the
    docker example's silos) shows the ε it does have: a nominal client's sample-level ε.
    """
    if row.get("epsilon") is not None or "local-epsilon-nominal" not in row:
        guarantee = f"epsilon {format_epsilon(row.get('epsilon'))} (delta {delta:g})"
        if "local-epsilon-nominal" in row:
            guarantee += f", sample-level epsilon per client (nominal size) {row['local-epsilon-nominal']:.3f}"
    else:
        guarantee = (f"no client-level epsilon; sample-level epsilon per client (nominal size) "
                     f"{row['local-epsilon-nominal']:.3f} (delta {local_delta:g})")  # fmt: skip
    return (
        f"round {row['round']:>3}/{rounds}  accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}  "
        f"{guarantee}  {row['round-time']:.1f} s"
    )
