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
     "pretraining-seconds"}
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
    "flower.log": "the ServerApp's log: the run's header and warnings, one line per round (round, accuracy, "
    "loss, epsilon); no timestamps, no per-client line",
}
SERVER_PRIVATE_FILES = {
    "server_private_diagnostics.jsonl": "per round: sampled, replied, accepted, dropped clients and why, "
    "clipped fraction, round and wall time",
    "server_private_superlink.log": "Flower's engine: the SuperLink's own log, timestamped",
    "deployment.json": "the deployment round: what each node chose to share, outside epsilon",
    ".dpfl-run.lock": "the lock that keeps a second process out of the run folder",
}
NODE_PRIVATE_FOLDERS = {"nodes": "one folder per simulated node: its private log and deployment reports"}
# Where `dpfl audit` writes (a run of its own with canary clients): its report is computed from that
# run's released models and the canaries' public directions.
AUDIT_FOLDER = "audit"
