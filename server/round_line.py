"""A round's public record as one line of text: the ServerApp's log (what ``flwr log``
streams) and ``dpfl simulate``'s output print the same line. It has no duration: the log
is public, and a round's time grows with its private cohort."""

from __future__ import annotations

from typing import Any

from dpfl.server.recorder import format_epsilon


def round_line(row: dict[str, Any], rounds: int, delta: float, local_delta: float) -> str:
    """``row`` (a line of metrics.jsonl) of a run of ``rounds`` rounds at ``delta``: accuracy,
    loss and the guarantee the run has.

    A run without a valid client-level ε but with sample-level DP inside every client (the
    docker example's silos) shows the ε it does have: the public ε of a client of the nominal
    size sampled in every round (``local-epsilon-nominal``; each client's own stays in its
    node's private log, whose lines say "sample-level").
    """
    if row.get("epsilon") is not None or "local-epsilon-nominal" not in row:
        guarantee = f"epsilon {format_epsilon(row.get('epsilon'))} (delta {delta:g})"
        if "local-epsilon-nominal" in row:
            guarantee += f", local DP-SGD epsilon of a nominal client {row['local-epsilon-nominal']:.3f}"
    else:
        guarantee = (f"no client-level epsilon; local DP-SGD epsilon of a nominal client "
                     f"{row['local-epsilon-nominal']:.3f} (delta {local_delta:g})")  # fmt: skip
    return f"round {row['round']:>3}/{rounds}  accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}  {guarantee}"
