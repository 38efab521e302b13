"""Experiment tracking: a run's public per-round records as TensorBoard scalars.

A tracker is a release like ``metrics.jsonl``, so it takes only the round records the
recorder wrote there, and checks them again against the same public keys
(:data:`dpfl.server.public_records.PUBLIC_ROUND_KEYS`): nothing of the server-private
diagnostics, no client's value, no run folder contents beyond those rows. TensorBoard
comes through ``torch.utils.tensorboard``, which needs the optional ``tensorboard``
package (``pip install 'dpfl[tracking]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpfl.errors import UsageError
from dpfl.server.public_records import PUBLIC_ROUND_KEYS
from dpfl.server.recorder import NotPublicError


class TensorBoardTracker:
    """One run's scalars under ``log_dir/run_name``, one point per round; close it when the run ends."""

    def __init__(self, log_dir: str | Path, run_name: str) -> None:
        self.path = Path(log_dir).expanduser().absolute() / run_name
        self._writer = summary_writer()(log_dir=str(self.path))

    def record(self, row: dict[str, Any]) -> None:
        """One public round record (a line of ``metrics.jsonl``)."""
        extra = sorted(set(row) - PUBLIC_ROUND_KEYS)
        if extra:
            raise NotPublicError(f"a tracked round would release {', '.join(extra)}, which is not covered by epsilon")
        for key, value in row.items():
            # None (an epsilon that is not valid) and flags are not curves.
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                # The records hold no timings (a round's duration grows with its private
                # cohort): TensorBoard's wall time of a point is its round, not the clock.
                self._writer.add_scalar(key, value, global_step=row["round"], walltime=float(row["round"]))

    def close(self) -> None:
        self._writer.close()


def summary_writer() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; a one-line error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # what torch raises without the tensorboard package
        raise UsageError(
            "--tensorboard needs the tensorboard package, which is not installed: pip install 'dpfl[tracking]'"
        ) from None
    return SummaryWriter
