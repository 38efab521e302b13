"""What a run leaves under its output folder.

``metrics.jsonl`` (one JSON object per round, flushed as it is written, so a
watcher can follow it), ``config.json`` (the run settings, resolved noise
multiplier and K), ``final_model.pt`` (a ``dpfl.task.checkpoint`` file) and
``summary.json`` (outcome, final and best accuracy, ε spent, wall time) and
``curves.png`` (accuracy and ε by round, accuracy against ε).

The public records hold only what ε covers or what is public by construction
(:data:`PUBLIC_ROUND_KEYS`, :data:`PUBLIC_SUMMARY_KEYS`; the inventory of every file is
:mod:`dpfl.server.public_records`); any other key is refused rather than written. Raw
facts only the server may see (the realised number of clients, drop reasons, the
clipped fraction, and timings: a round's duration grows with the number of clients
that trained in it) go to ``server_private_diagnostics.jsonl``, never mixed into the
public files.

One process at a time writes a run folder: the recorder holds an exclusive lock on
it (a resume of a folder still being written is refused). A resumed recorder
rewrites ``metrics.jsonl`` from the checkpoint's records, so a round that was
recorded but not checkpointed before a crash appears once, from its rerun.
"""

from __future__ import annotations

import fcntl
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from dpfl.errors import UsageError
from dpfl.server.checkpoint import LEDGER_KEY, RunCheckpoint
from dpfl.server.curves import plot_curves
from dpfl.server.public_records import CONFIG_EXTRA_KEYS, PUBLIC_ROUND_KEYS, PUBLIC_SUMMARY_KEYS, pin_public_times
from dpfl.settings import RunSettings
from dpfl.task.checkpoint import Checkpoint, ModelSpec, save_checkpoint
from dpfl.task.files import write_atomically

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
FINAL_MODEL_FILE = "final_model.pt"
PRIVATE_DIAGNOSTICS_FILE = "server_private_diagnostics.jsonl"
CURVES_FILE = "curves.png"
LOCK_FILE = ".dpfl-run.lock"

class NotPublicError(ValueError):
    """A record that would release something neither covered by ε nor public."""


def _public(row: dict[str, Any], allowed: frozenset[str], what: str) -> dict[str, Any]:
    extra = sorted(set(row) - allowed)
    if extra:
        raise NotPublicError(f"{what} would release {', '.join(extra)}, which is not covered by epsilon")
    return row


def format_epsilon(epsilon: float | None) -> str:
    """ε as recorded: None where it is not a valid DP guarantee."""
    return "not valid" if epsilon is None else f"{epsilon:.3f}"


def holds_run(path: Path) -> bool:
    return (path / METRICS_FILE).exists()


def fresh_run_dir(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... if it already holds a run: never overwrite one."""
    candidate, suffix = path, 1
    while holds_run(candidate):
        suffix += 1
        candidate = path.with_name(f"{path.name}-{suffix}")
    return candidate


def lock_run_dir(run_dir: Path):
    """An exclusive lock on ``run_dir``, held while the returned file stays open."""
    lock = (run_dir / LOCK_FILE).open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UsageError(f"run folder {str(run_dir)!r} is being written by another dpfl process; stop it first") from None
    return lock


class RunRecorder:
    """The public and server-private records of a run; ``resume``: continue a checkpointed run in place."""

    def __init__(self, out_dir: str | Path, config: dict[str, Any], resume: RunCheckpoint | None = None) -> None:
        out_dir = Path(out_dir).expanduser().resolve()
        self.out_dir = out_dir if resume else fresh_run_dir(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = lock_run_dir(self.out_dir)
        self.config = _public(config, frozenset(RunSettings().to_run_config()) | CONFIG_EXTRA_KEYS, "config.json")
        (self.out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        self.rounds: list[dict[str, Any]] = list(resume.rounds) if resume else []
        write_atomically(self.out_dir / METRICS_FILE, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rounds)))
        self._metrics = (self.out_dir / METRICS_FILE).open("a")
        self._private = (self.out_dir / PRIVATE_DIAGNOSTICS_FILE).open("a" if resume else "w")
        self._last = time.time()
        self.started = self._last

    def record_round(self, row: dict[str, Any]) -> dict[str, Any]:
        # NaN (an epsilon that is not valid, a loss with no client) is null in JSON.
        row = _public({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()},
                      PUBLIC_ROUND_KEYS, "a round record")  # fmt: skip
        self.rounds.append(row)
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        return row

    def record_private(self, diagnostics: dict[str, Any]) -> dict[str, Any]:
        """Raw server-side facts of a round, with its timings, to the server-private file only."""
        now = time.time()
        diagnostics = {**diagnostics, "round-time": now - self._last, "wall-time": now - self.started}
        self._last = now
        self._private.write(json.dumps(diagnostics) + "\n")
        self._private.flush()
        return diagnostics

    def finish(
        self,
        spec: ModelSpec,
        dataset: str,
        state_dict: dict[str, torch.Tensor],
        outcome: str,
        extra: dict[str, Any],
        ledger: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Write the summary and the final model (with the privacy ledger behind it); release the folder."""
        self._metrics.close()
        self._private.close()
        trained = [r for r in self.rounds if r["round"] > 0]
        final = self.rounds[-1] if self.rounds else {}
        summary = _public({
            "outcome": outcome,
            "rounds-completed": len(trained),
            "final-accuracy": final.get("accuracy"),
            "best-accuracy": max((r["accuracy"] for r in self.rounds), default=None),
            "epsilon": final.get("epsilon", 0.0),
            "epsilon-valid": self.config["epsilon-valid"],
            "delta": self.config["delta"],
            **extra,
        }, PUBLIC_SUMMARY_KEYS, "the summary")
        save_checkpoint(
            self.out_dir / FINAL_MODEL_FILE,
            Checkpoint(spec=spec, dataset=dataset, state_dict=state_dict, extra={"summary": summary, LEDGER_KEY: ledger}),
        )
        write_atomically(self.out_dir / SUMMARY_FILE, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
        self._lock.close()
        if self.rounds:  # drawn last: whatever happens here, the run's records are saved
            title = f"{self.config['strategy']}, {self.config['model']} on {self.config['dataset']}: {outcome}"
            plot_curves(self.rounds, self.out_dir / CURVES_FILE, title)
        pin_public_times(self.out_dir)
        return summary
