"""Crash safety of a run: the per-round checkpoint, the privacy-ledger journal, resume and init-from.

After every round the ServerApp writes ``checkpoint.pt`` in the run folder,
atomically (:func:`dpfl.task.files.write_atomically`): the global weights, the
strategy's state (its round, the accountant's full ledger, e.g. DP-FedPGN's
global direction), the run config and its hash, the resolved noise multiplier
and the public round records so far. It never holds the noise or sampling
randomness: their keys are drawn afresh by the resumed process.

Before each round's noise is drawn, the mechanism calls its journal, which
writes the accountant's ledger to ``privacy_ledger.json`` (atomically too). A
run that dies after a round was accounted but before its checkpoint therefore
resumes with that round counted: a crash can over-count ε, never under-count it.

Under a participation schema (:mod:`dpfl.privacy.participation`) the mechanism
also keeps a secret state: the master key of its correlated noise and its
sampler's past. It never enters ``checkpoint.pt`` (released state only); the
mechanism hands it, before each round's noise and right after the ledger, to
:func:`write_private_state`, which writes ``server_private_noise_state.json``
atomically with permissions 0600. A resume restores it (:func:`load_private_state`)
or, when it is missing or ahead of the checkpoint, refuses in one line.

``resume-from`` continues a run folder from its last checkpoint with the same
run config (only :data:`RESUMABLE_KEYS` may change); ``init-from`` starts a new
run from a checkpoint's weights and carries its privacy ledger.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dpfl.errors import UsageError
from dpfl.privacy.participation import CorrelatedMechanism, ParticipationSchema
from dpfl.task.checkpoint import CHECKPOINT_FORMAT
from dpfl.task.files import load_tagged, save_tagged, write_atomically

CHECKPOINT_FILE = "checkpoint.pt"
LEDGER_FILE = "privacy_ledger.json"
# The mechanism's secret state under a participation schema: as secret as the noise.
PRIVATE_STATE_FILE = "server_private_noise_state.json"
RUN_CHECKPOINT_FORMAT = "dpfl-run-checkpoint-v1"
# The key of a final model's (``final_model.pt``) privacy ledger in its extra fields.
LEDGER_KEY = "privacy-ledger"
# What a resumed run may change: more rounds, a larger budget, a longer reply timeout.
# Where the records go and where to resume from are the resume itself.
RESUMABLE_KEYS = frozenset({"num-server-rounds", "max-epsilon", "round-timeout"})
LOCATION_KEYS = frozenset({"resume-from", "out-dir"})


def config_hash(run_config: Mapping[str, Any]) -> str:
    """SHA-256 of the run config, as canonical JSON: what a resume must match."""
    return hashlib.sha256(json.dumps(dict(run_config), sort_keys=True).encode()).hexdigest()


@dataclass
class RunCheckpoint:
    """Everything a run needs to continue after its last completed round."""

    round: int
    weights: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]
    run_config: dict[str, Any]
    noise_multiplier: float
    epsilon_valid: bool
    rounds: list[dict[str, Any]]  # the public round records so far, round 0 included
    pretraining_seconds: float

    @property
    def ledger(self) -> dict[str, Any]:
        return self.strategy_state["accountant"]


def save_run_checkpoint(run_dir: Path, checkpoint: RunCheckpoint) -> None:
    payload = asdict(checkpoint)
    payload["weights"] = {name: t.detach().cpu() for name, t in checkpoint.weights.items()}
    save_tagged(run_dir / CHECKPOINT_FILE, RUN_CHECKPOINT_FORMAT, {**payload, "config-hash": config_hash(checkpoint.run_config)})


def load_run_checkpoint(path: str | Path) -> RunCheckpoint:
    """The checkpoint of a run folder (or a ``checkpoint.pt`` path); a one-line error if there is none."""
    path = Path(path).expanduser()
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if path.is_dir() and not file.exists():
        raise UsageError(f"{str(path)!r} holds no {CHECKPOINT_FILE}: no completed round to resume from")
    payload = load_tagged(file, RUN_CHECKPOINT_FORMAT, "run checkpoint")
    if payload.get("config-hash") != config_hash(payload.get("run_config", {})):
        raise UsageError(f"run checkpoint {str(file)!r} is corrupted: its run config does not match its hash")
    return RunCheckpoint(**{key: payload[key] for key in RunCheckpoint.__dataclass_fields__})


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key saved -> current`` for every run-config key a resume may not change."""
    fixed = sorted((saved.keys() | current.keys()) - RESUMABLE_KEYS - LOCATION_KEYS)
    return [f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in fixed if saved.get(key) != current.get(key)]


def check_resumable(checkpoint: RunCheckpoint, run_config: Mapping[str, Any], run_dir: Path) -> None:
    changes = config_changes(checkpoint.run_config, run_config)
    if changes:
        raise UsageError(
            f"cannot resume {str(run_dir)!r} with a changed run config ({'; '.join(changes)}); "
            f"only {', '.join(sorted(RESUMABLE_KEYS))} may change"
        )
    if run_config["num-server-rounds"] < checkpoint.round:
        raise UsageError(
            f"num-server-rounds {run_config['num-server-rounds']} is below the {checkpoint.round} rounds "
            f"{str(run_dir)!r} already completed"
        )


def budget_change_warning(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """One line when a resume lifts the run's ε budget or raises it, else None."""
    before, after = float(saved.get("max-epsilon", 0.0)), float(current["max-epsilon"])
    if before > 0 and after == 0:
        return f"this resume lifts the run's epsilon budget of {before:g}: nothing stops it before any epsilon"
    if before > 0 and after > before:
        return f"this resume raises the run's epsilon budget from {before:g} to {after:g}"
    return None


def write_ledger(run_dir: Path, ledger: Mapping[str, Any]) -> None:
    """The journal: the accountant's ledger, written before the round's noise is drawn."""
    write_atomically(run_dir / LEDGER_FILE, lambda tmp: tmp.write_text(json.dumps(ledger) + "\n"))


def write_private_state(run_dir: Path, state: Mapping[str, Any]) -> None:
    """The mechanism's secret state, written before the round's noise is drawn; readable by the owner only."""

    def write(tmp: Path) -> None:
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(descriptor, 0o600)  # also when a stale temporary file was there
        with os.fdopen(descriptor, "w") as file:
            file.write(json.dumps(dict(state)) + "\n")

    write_atomically(run_dir / PRIVATE_STATE_FILE, write)


def load_private_state(run_dir: Path) -> dict[str, Any]:
    """The secret state a resume needs; a one-line error when it is lost or unreadable."""
    path = run_dir / PRIVATE_STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(
            f"cannot resume {str(run_dir)!r}: its correlated-noise state {PRIVATE_STATE_FILE} is lost, and without it "
            "the noise of the next rounds cannot continue the factorisation; start a new run with --init-from "
            f"{str(run_dir)!r}, which carries the privacy ledger and restarts the factorisation"
        ) from None
    except (OSError, ValueError):
        raise UsageError(f"cannot resume {str(run_dir)!r}: its correlated-noise state {str(path)!r} is unreadable") from None


def correlated_resume_state(
    run_dir: Path, completed_round: int, schema: ParticipationSchema | None, saved_rounds: int
) -> dict[str, Any] | None:
    """The secret state a resume after ``completed_round`` continues from under a participation schema, checked
    (None without one); a one-line error when it is lost, is not this run's, or is ahead of the checkpoint."""
    if schema is None or not schema.scheduled:
        return None
    if schema.correlated and schema.rounds != saved_rounds:
        raise UsageError(f"num-server-rounds cannot change from {saved_rounds} when resuming mechanism "
                         f"{schema.mechanism}: its factorisation is optimised and normalised for the run's rounds")  # fmt: skip
    state = load_private_state(run_dir)
    try:  # a throwaway mechanism runs the same checks the run's will
        CorrelatedMechanism(schema, bytes(32)).restore(state, completed_round)
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"cannot resume {str(run_dir)!r}: {err}; start a new run with --init-from "
                         f"{str(run_dir)!r}, which carries the privacy ledger") from None  # fmt: skip
    return state


def rounds_in(ledger: Mapping[str, Any]) -> int:
    return sum(int(steps) for _, _, steps in ledger["history"])


def resumed_ledger(checkpoint: RunCheckpoint, run_dir: Path) -> dict[str, Any]:
    """The checkpoint's ledger, or the journal's if it counts more rounds (a crash after accounting)."""
    return journaled_ledger(checkpoint.ledger, run_dir)


def journaled_ledger(ledger: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """``ledger``, or the journal in ``run_dir`` if it counts more rounds: a round accounted
    (its noise about to be drawn) after the checkpoint was written, then a crash."""
    path = run_dir / LEDGER_FILE
    if not path.exists():
        return dict(ledger)
    try:
        journal = json.loads(path.read_text())
        journaled = rounds_in(journal)
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"privacy ledger {str(path)!r} is corrupted; it cannot be trusted") from None
    return journal if journaled > rounds_in(ledger) else dict(ledger)


@dataclass
class InitialState:
    """What ``init-from`` takes from a checkpoint: weights, and the ledger of the rounds behind them."""

    weights: dict[str, torch.Tensor]
    history: list[tuple[float, float, int]]


def load_initial_state(path: str | Path, new_data: bool) -> InitialState:
    """The weights and privacy ledger of a run folder, ``checkpoint.pt`` or ``final_model.pt``.

    A checkpoint without a ledger is refused unless ``new_data`` says that this
    run's clients hold other data than the ones it was trained on.
    """
    path = Path(path).expanduser()
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"init-from {str(path)!r}: no such checkpoint (a run folder, checkpoint.pt or final_model.pt)")
    try:
        run = load_run_checkpoint(file)
        # A run whose ε is not valid has no ledger that bounds what it spent.
        weights, ledger = run.weights, run.ledger if run.epsilon_valid else None
    except UsageError:
        payload = load_tagged(file, CHECKPOINT_FORMAT, "checkpoint")
        if payload.get("compression"):
            raise UsageError(f"init-from {str(file)!r} is a compressed model; start from an uncompressed federated model") from None
        weights, ledger = payload["state_dict"], (payload.get("extra") or {}).get(LEDGER_KEY)
    if ledger is not None:  # as --resume does: a round accounted after the checkpoint counts too
        ledger = journaled_ledger(ledger, file.parent)
    if ledger is None and not new_data:
        raise UsageError(
            f"init-from {str(file)!r} carries no privacy ledger, so the privacy already spent on its clients is "
            "unknown; pass init-new-data (--init-new-data) only if this run's clients hold other data"
        )
    # New data: the rounds behind the weights spent nothing of this run's clients' privacy.
    history = [] if ledger is None or new_data else [(float(s), float(q), int(n)) for s, q, n in ledger["history"]]
    return InitialState(weights=weights, history=history)
