"""Every bad input through the real ``dpfl`` console script: exit code 2, one line on stderr
that names the value and what is allowed, no traceback, and nothing on disk changed.

Each case is its own interpreter, as a user's command would be. Most are refused by the
parser before torch loads (well under a second each); the rest (a strategy, a model, a
checkpoint, an unreachable ε) import what checks them. The cases run concurrently, once
per session, and each parametrised test reads its own result.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import DPFL

# Files the cases point at, made in a fresh folder (see `workspace`).
FILE = "a-file.txt"
FOLDER = "a-folder"
TRUNCATED = "truncated.pt"
NOT_UTF8 = os.fsdecode(b"runs/caf\xe9")  # Latin-1 bytes: no valid UTF-8 name
UNWRITABLE = "/proc/dpfl-cannot-write-here"

SMALL = ["--model", "cnn", "--width", "4", "--clients", "10", "--sample-rate", "0.5", "--rounds", "2"]
CHECKPOINT_ARGS = ["--ratio", "0.5", "--out", "compressed"]

# (case id, argv after `dpfl`, fragments the one stderr line must contain: the value and what is allowed)
CASES = [
    ("no-command", [], ["required: COMMAND"]),
    ("unknown-command", ["simulat"], ["'simulat'", "choose from", "simulate"]),
    ("unknown-flag", ["simulate", "--rouns", "3"], ["unrecognized arguments: --rouns"]),
    ("rounds-not-int", ["simulate", "--rounds", "abc"], ["--rounds", "must be an integer", "'abc'"]),
    ("rounds-zero", ["simulate", "--rounds", "0"], ["--rounds", "must be >= 1, got 0"]),
    ("clients-negative", ["simulate", "--clients", "-4"], ["--clients", "must be >= 1, got -4"]),
    ("sample-rate-above-one", ["simulate", "--sample-rate", "1.5"], ["--sample-rate", "must be in (0, 1], got 1.5"]),
    ("sample-rate-nan", ["simulate", "--sample-rate", "nan"], ["--sample-rate", "must be a finite number", "'nan'"]),
    ("delta-one", ["simulate", "--delta", "1"], ["--delta", "must be in (0, 1), got 1"]),
    ("clip-negative", ["simulate", "--clip", "-1"], ["--clip", "must be > 0, got -1"]),
    ("noise-infinite", ["simulate", "--noise-multiplier", "inf"], ["--noise-multiplier", "finite number", "'inf'"]),
    ("noise-and-target", ["simulate", "--noise-multiplier", "1", "--target-epsilon", "8"],
     ["--target-epsilon", "not allowed with argument --noise-multiplier"]),
    ("max-epsilon-negative", ["simulate", "--max-epsilon", "-1"], ["--max-epsilon", "must be >= 0, got -1"]),
    ("engine-unknown", ["simulate", "--engine", "warp"], ["--engine", "'warp'", "flower", "in-process"]),
    ("workers-zero", ["simulate", "--workers", "0"], ["--workers", "must be >= 1, got 0"]),
    ("min-replies-negative", ["simulate", "--min-replies", "-1"], ["--min-replies", "must be >= 0, got -1"]),
    ("aggregation-unknown", ["simulate", "--aggregation", "secure"], ["unknown aggregation 'secure'", "plain", "secagg"]),
    ("secagg-threshold-above-clients", ["simulate", *SMALL, "--aggregation", "secagg", "--secagg-threshold", "11"],
     ["secagg-threshold 11", "between 1 and the number of clients 10"]),
    ("secagg-neighbours-odd", ["simulate", *SMALL, "--aggregation", "secagg", "--secagg-neighbours", "3"],
     ["secagg-neighbours 3", "even number >= 2"]),
    ("secagg-bits-too-few-for-the-sum", ["simulate", *SMALL, "--aggregation", "secagg", "--secagg-bits", "8"],
     ["secagg-bits 8 is too small", "use at least"]),
    ("secagg-without-dp", ["simulate", *SMALL, "--aggregation", "secagg", "--strategy", "fedavg"],
     ["aggregation=secagg needs a private strategy", "fedavg"]),
    ("secagg-with-client-noise", ["simulate", *SMALL, "--aggregation", "secagg", "--noise", "client"],
     ["aggregation=secagg cannot be combined with noise-placement=client"]),
    ("validation-fraction-one", ["simulate", "--validation-fraction", "1"], ["--validation-fraction", "must be in [0, 1), got 1"]),
    ("lr-decay-above-one", ["simulate", "--lr-decay", "2"], ["--lr-decay", "must be in (0, 1], got 2"]),
    ("strategy-unknown", ["simulate", *SMALL, "--strategy", "fedfoo"], ["unknown strategy 'fedfoo'", "dp-fedavg"]),
    ("model-unknown", ["simulate", *SMALL, "--model", "alexnet"], ["unknown model 'alexnet'", "resnet10"]),
    ("dataset-unknown", ["simulate", *SMALL, "--dataset", "imagenet"], ["unknown dataset 'imagenet'", "digits"]),
    ("target-over-budget", ["simulate", *SMALL, "--target-epsilon", "8", "--max-epsilon", "5"],
     ["target-epsilon 8.0 is over the budget max-epsilon 5.0"]),
    ("target-unreachable", ["simulate", *SMALL, "--target-epsilon", "1e-9"],
     ["target epsilon 1e-09 cannot be reached", "smallest epsilon"]),
    ("out-is-a-file", ["simulate", "--out", FILE], ["--out", FILE, "is a file"]),
    ("out-inside-a-file", ["simulate", "--out", f"{FILE}/run"], ["--out", FILE, "which is a file"]),
    ("out-unwritable", ["simulate", "--out", UNWRITABLE], ["--out", UNWRITABLE, "cannot be written"]),
    ("out-not-utf8", ["simulate", "--out", NOT_UTF8], ["--out", "not a valid UTF-8 name"]),
    ("resume-missing", ["simulate", "--resume", "no-such-run"], ["no-such-run"]),
    ("strategy-option-not-key-value", ["simulate", "--strategy-option", "gamma"], ["--strategy-option", "KEY=VALUE", "'gamma'"]),
    ("tensorboard-is-a-file", ["simulate", "--tensorboard", FILE], ["--tensorboard", FILE, "is a file"]),
    ("deploy-ratio-one", ["simulate", "--deploy-ratio", "1"], ["--deploy-ratio", "must be in (0, 1), got 1"]),
    ("privacy-needs-sigma-or-target", ["privacy", "--sample-rate", "0.25", "--rounds", "40"],
     ["one of the arguments --noise-multiplier --target-epsilon is required"]),
    ("privacy-noise-infinite", ["privacy", "--noise-multiplier", "inf", "--sample-rate", "0.25", "--rounds", "40"],
     ["--noise-multiplier", "finite number", "'inf'"]),
    ("privacy-target-unreachable", ["privacy", "--target-epsilon", "0.001", "--sample-rate", "0.25", "--rounds", "40",
                                    "--accountant", "rdp"], ["target epsilon 0.001 cannot be reached", "smallest epsilon"]),
    ("privacy-target-tiny", ["privacy", "--target-epsilon", "1e-9", "--sample-rate", "0.25", "--rounds", "40"],
     ["target epsilon 1e-09 cannot be reached", "smallest epsilon"]),
    ("privacy-accountant-unknown", ["privacy", "--noise-multiplier", "1", "--sample-rate", "0.25", "--rounds", "4",
                                    "--accountant", "gdp"], ["'gdp'", "rdp", "prv", "pld"]),
    ("privacy-rounds-zero", ["privacy", "--noise-multiplier", "1", "--sample-rate", "0.25", "--rounds", "0"],
     ["--rounds", "must be >= 1, got 0"]),
    ("compress-checkpoint-is-a-folder", ["compress", "--checkpoint", FOLDER, *CHECKPOINT_ARGS], [FOLDER, "is a folder"]),
    ("compress-checkpoint-truncated", ["compress", "--checkpoint", TRUNCATED, *CHECKPOINT_ARGS],
     [TRUNCATED, "is not a dpfl checkpoint", "cut short or damaged"]),
    ("compress-checkpoint-missing", ["compress", "--checkpoint", "missing.pt", *CHECKPOINT_ARGS], ["missing.pt", "does not exist"]),
    ("compress-ratio-above-one", ["compress", "--checkpoint", TRUNCATED, "--ratio", "1.5", "--out", "compressed"],
     ["ratio 1.5 is outside (0, 1)"]),
    ("compress-finetune-lr-zero", ["compress", "--checkpoint", TRUNCATED, *CHECKPOINT_ARGS, "--finetune-lr", "0"],
     ["--finetune-lr must be > 0, got 0.0"]),
    ("compress-method-unknown", ["compress", "--checkpoint", TRUNCATED, *CHECKPOINT_ARGS, "--method", "pca"],
     ["--method", "'pca'", "tucker2"]),
    ("compress-rank-not-integer", ["compress", "--checkpoint", TRUNCATED, *CHECKPOINT_ARGS, "--rank", "conv1=a"],
     ["--rank 'conv1=a'", "LAYER=R"]),
    ("compress-out-is-a-file", ["compress", "--checkpoint", TRUNCATED, "--ratio", "0.5", "--out", FILE], ["--out", FILE, "is a file"]),
    ("compress-batches-zero", ["compress", "--checkpoint", TRUNCATED, *CHECKPOINT_ARGS, "--batches", "0"],
     ["--batches must be >= 1, got 0"]),
    ("deploy-tile-unknown", ["deploy", "--checkpoint", TRUNCATED, "--out", "cim", "--tile", "100"], ["--tile", "100", "128"]),
    ("deploy-mapping-unknown", ["deploy", "--checkpoint", TRUNCATED, "--out", "cim", "--mapping", "diagonal"],
     ["--mapping", "'diagonal'", "mdm"]),
    ("deploy-samples-zero", ["deploy", "--checkpoint", TRUNCATED, "--out", "cim", "--samples", "0"], ["--samples must be >= 1, got 0"]),
    ("deploy-r-on-negative", ["deploy", "--checkpoint", TRUNCATED, "--out", "cim", "--r-on", "-1"], ["r_on must be a positive finite number, got -1.0"]),
    ("deploy-r-off-below-r-on", ["deploy", "--checkpoint", TRUNCATED, "--out", "cim", "--r-off", "50000"],
     ["r_off", "must be larger than r_on"]),
    ("deploy-read-noise-one", ["deploy", "--checkpoint", TRUNCATED, "--out", "cim", "--read-noise", "1"],
     ["read_noise", "must be in [0, 1), got 1.0"]),
    ("deploy-checkpoint-is-a-folder", ["deploy", "--checkpoint", FOLDER, "--out", "cim"], [FOLDER, "is a folder"]),
    ("deploy-out-unwritable", ["deploy", "--checkpoint", TRUNCATED, "--out", UNWRITABLE], ["--out", UNWRITABLE, "cannot be written"]),
    ("compare-seeds-zero", ["compare", "--strategies", "dp-fedavg", "--seeds", "0"], ["--seeds", "must be >= 1, got 0"]),
    ("compare-out-is-a-file", ["compare", "--strategies", "dp-fedavg", "--out", FILE], ["--out", FILE, "is a file"]),
    ("audit-canaries-zero", ["audit", "--canaries", "0"], ["--canaries", "must be >= 1, got 0"]),
    ("audit-confidence-one", ["audit", "--confidence", "1"], ["--confidence", "must be in (0, 1), got 1"]),
    ("strategies-extra-argument", ["strategies", "--all"], ["unrecognized arguments: --all"]),
]
# Beyond this many seconds a case is a hang, not a refusal (an unreachable ε once never returned).
CASE_TIMEOUT = 300


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its content (folders: empty)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input")
    (root / FILE).write_text("not a folder\n")
    (root / FOLDER).mkdir()
    (root / FOLDER / "final_model.pt").write_bytes(b"")
    (root / TRUNCATED).write_bytes(b"PK\x03\x04" + bytes(60))  # the start of a zip that torch.save would write
    (root / "runs").mkdir()
    return root


@pytest.fixture(scope="module")
def outcomes(workspace) -> dict[str, tuple[subprocess.CompletedProcess, dict[str, str], dict[str, str]]]:
    """Every case run once, three at a time, each in ``workspace`` (before/after snapshots of it)."""

    def run(case):
        name, argv, _ = case
        before = snapshot(workspace)
        env = {**os.environ, "COLUMNS": "80", "OMP_NUM_THREADS": "1"}
        result = subprocess.run([DPFL, *argv], cwd=workspace, capture_output=True, text=True,
                                errors="backslashreplace", timeout=CASE_TIMEOUT, env=env)  # fmt: skip
        return name, (result, before, snapshot(workspace))

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, CASES))


def test_the_table_is_large_and_every_command_is_in_it():
    assert len(CASES) >= 40 and len({name for name, _, _ in CASES}) == len(CASES)
    commands = {argv[0] for _, argv, _ in CASES if argv}
    assert commands == {"simulate", "privacy", "compress", "deploy", "compare", "audit", "strategies", "simulat"}


@pytest.mark.cli
@pytest.mark.parametrize("name,argv,fragments", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(outcomes, name, argv, fragments):
    result, before, after = outcomes[name]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("dpfl"), lines[0]
    missing = [fragment for fragment in fragments if fragment not in lines[0]]
    assert not missing, f"{lines[0]!r} lacks {missing}"
    assert after == before, "files changed"
