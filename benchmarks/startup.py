"""Start-up of the ``dpfl`` console script (not a test): python benchmarks/startup.py

Times the real console script, each command in a fresh interpreter as a user types it:
``--version``, ``--help``, every subcommand's ``--help``, and mistyped arguments, which
must fail before torch, Flower and Opacus load (goal: ``--version`` and ``--help`` under
1 s). The baseline, measured in the same run, is a bare interpreter (``python -c pass``)
and one that imports what a run needs (torch, Flower, Opacus: what every command paid
before it imported them lazily); each line prints its median wall time over
``--repeats`` runs and its ratio to both.

Run it niced on a shared machine and read the ratios:
``OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/startup.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DPFL = str(Path(sys.executable).parent / "dpfl")
BASELINES = {
    "bare interpreter": [sys.executable, "-c", "pass"],
    "import torch, Flower, Opacus": [sys.executable, "-c", "import torch, flwr.serverapp, opacus"],
}
COMMANDS = {
    "--version": ["--version"],
    "--help": ["--help"],
    **{f"{command} --help": [command, "--help"] for command in
       ("simulate", "audit", "compare", "privacy", "strategies", "compress", "deploy")},  # fmt: skip
    "simulate --rounds abc": ["simulate", "--rounds", "abc"],
    "simulate --sample-rate 2": ["simulate", "--sample-rate", "2"],
    "privacy --noise-multiplier inf ...": ["privacy", "--noise-multiplier", "inf", "--sample-rate", "0.25", "--rounds", "40"],
    "deploy --tile 100 ...": ["deploy", "--checkpoint", "x.pt", "--out", "x", "--tile", "100"],
    "compress --ratio 2 ...": ["compress", "--checkpoint", "x.pt", "--out", "x", "--ratio", "2"],
}


def wall_time(argv: list[str], repeats: int) -> float:
    """Median seconds of ``argv`` over ``repeats`` runs (output discarded, exit code ignored)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "100"})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command; the median is printed")
    args = parser.parse_args()
    bare, heavy = (wall_time(argv, args.repeats) for argv in BASELINES.values())
    print(f"load: {os.getloadavg()[0]:.2f} (1 min), median of {args.repeats} runs each")
    print(f"{'command':40} {'wall s':>8} {'/ bare':>8} {'/ imports':>10}")
    for name, seconds in zip(BASELINES, (bare, heavy)):
        print(f"{name:40} {seconds:8.2f} {seconds / bare:8.1f} {seconds / heavy:10.2f}")
    for name, argv in COMMANDS.items():
        seconds = wall_time([DPFL, *argv], args.repeats)
        print(f"dpfl {name:35} {seconds:8.2f} {seconds / bare:8.1f} {seconds / heavy:10.2f}")


if __name__ == "__main__":
    main()
