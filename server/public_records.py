"""The one inventory of what a run releases, and of what it keeps from whom.

Every file a run writes into its folder is listed here with who may see it. A
public file holds only what ε covers or what is public by construction: the models,
the mechanism's public parameters (σ, q, the expected count qN, C and its noisy
adaptive release), ε, the learning rate, the accuracy and loss of the global model on
the server's own data, the run config and what derives from these. Never a realised
count (sampled, replying or dropped clients), a per-client fact or a timing: a
round's duration grows with the number of clients that trained in it.

``tests/test_public_records.py`` runs every mode on both engines and checks every
public file against this inventory; the recorder refuses any other key as it writes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# One line per round in metrics.jsonl (and the records inside checkpoint.pt).
PUBLIC_ROUND_KEYS = frozenset(
    {"round", "accuracy", "loss", "epsilon", "rdp-order", "lr", "noise-multiplier", "expected-clients",
     "local-epsilon-nominal", "validation-accuracy", "update-skipped",
     # adaptive clipping: the round's C and its noisy clipped fraction, both covered by ε
     "clip-norm", "noisy-clipped-fraction"}
)  # fmt: skip
# summary.json, and the summary inside final_model.pt.
PUBLIC_SUMMARY_KEYS = frozenset(
    {"outcome", "rounds-completed", "final-accuracy", "best-accuracy", "epsilon", "epsilon-valid", "delta",
     "noise-multiplier", "local-steps", "strategy", "final-validation-accuracy",
     # public pretraining on synthetic data: no client is involved
     "pretraining-seconds",
     # the last-iterate heuristic ε: a function of σ, q and the rounds only (public by construction)
     "last-iterate-epsilon"}
)  # fmt: skip
# config.json: the run config (every RunSettings key) and what the server resolved from public values.
CONFIG_EXTRA_KEYS = frozenset(
    {"resolved-noise-multiplier", "local-steps", "epsilon-valid", "recipe", "pretraining-seconds"}
)
# checkpoint.pt: released state only; never the noise or sampling randomness.
CHECKPOINT_KEYS = frozenset(
    {"format", "round", "weights", "strategy_state", "run_config", "noise_multiplier", "epsilon_valid", "rounds",
     "pretraining_seconds", "config-hash"}
)  # fmt: skip
# The strategy's state inside it: the accountant's ledger (σ, q, steps), the mechanism's public C,
# the strategy's own state (from released means only) and the server optimiser's (likewise).
STRATEGY_STATE_KEYS = frozenset({"round", "accountant", "mechanism", "strategy", "server-optimizer"})
# final_model.pt's extra fields beside the weights and the model's spec.
FINAL_MODEL_EXTRA_KEYS = frozenset({"summary", "privacy-ledger"})

# Who may see each file of a run folder. "public": anyone (covered by ε or public by
# construction). "server": the server operator only (raw counts, drop reasons, timings,
# the SuperLink's own log, what nodes chose to share in a deployment round). "nodes":
# each simulated node's own folder, for that node only (its ε, participation, local
# sample-level ε, deployment reports); in a real federation it lives on the node.
PUBLIC_FILES = {
    "metrics.jsonl": "one line per round: PUBLIC_ROUND_KEYS",
    "summary.json": "the run's outcome: PUBLIC_SUMMARY_KEYS",
    "config.json": "the run config and CONFIG_EXTRA_KEYS",
    "final_model.pt": "the final weights, the model's spec, FINAL_MODEL_EXTRA_KEYS",
    "checkpoint.pt": "the last completed round's released state: CHECKPOINT_KEYS",
    "privacy_ledger.json": "the accountant's ledger: (sigma, q, steps) per entry",
    "curves.png": "metrics.jsonl's accuracy and epsilon, plotted",
    "flower.log": "the ServerApp's own lines (they start with 'dpfl'): the run's header and warnings, one line "
    "per round (round, accuracy, loss, epsilon); no timestamps, no per-client line",
}
SERVER_PRIVATE_FILES = {
    "server_private_diagnostics.jsonl": "per round: sampled, replied, accepted, dropped clients and why, "
    "clipped fraction, round and wall time",
    "server_private_flower.log": "every other line Flower logs: the SuperLink's own log (timestamped), "
    "Flower's and Ray's notices, the tracebacks of clients that failed or refused",
    "deployment.json": "the deployment round: what each node chose to share, outside epsilon",
    "server_private_noise_state.json": "under a participation schema: the correlated noise's master key and the "
    "sampler's past (who took part when); as secret as the noise, permissions 0600",
    ".dpfl-run.lock": "the lock that keeps a second process out of the run folder",
}
NODE_PRIVATE_FOLDERS = {"nodes": "one folder per simulated node: its private log and deployment reports"}
# The mark of a line of Flower's log that may be public: the ServerApp's own (dpfl's) lines. Any
# other line (a client's traceback, which may name its refusal or participation, a library's
# notice, a timestamp) goes to the server-private log.
PUBLIC_LOG_MARK = "dpfl"


def is_public_log_line(message: str) -> bool:
    """Whether a log message (its text, without the level) may go to the public flower.log."""
    return message.startswith(PUBLIC_LOG_MARK) and not CLOCK.search(message)


# A clock time or a date: rounds must not be timed by the public log.
CLOCK = re.compile(r"\d{1,2}:\d{2}:\d{2}|\d{4}-\d{2}-\d{2}")

def pin_public_times(run_dir: Path) -> None:
    """Give every public file of a finished run the time ``config.json`` was written.

    A file's modification time is public with it, and the span between the first and the
    last grows with the number of clients that trained (the attack: r = 0.81 over 14 runs).
    While a run is live its files still change round by round: publish a folder once the
    run has ended (README, threat model).
    """
    stamp = (run_dir / "config.json").stat().st_mtime
    for name in PUBLIC_FILES:
        if (run_dir / name).exists():
            os.utime(run_dir / name, (stamp, stamp))


# Where `dpfl audit` writes (a run of its own with canary clients): its report is computed from that
# run's released models and the canaries' public directions.
AUDIT_FOLDER = "audit"
