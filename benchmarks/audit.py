"""The privacy audit's goals (issue 31), through `dpfl audit`'s library function on the real mechanism.

Three parts, each a function of :func:`dpfl.analysis.audit.run_audit` (white-box
gradient canaries, 95% confidence):

``default``: one audit per strategy (DP-FedAvg, DP-FedPGN) on the default federation
(400 clients on digits, ResNet-10 of width 8, 40 rounds at q = 0.25, C = 0.2), σ
calibrated to ε = 8 at δ = 1e-5, 2000 canaries (the default). Goal: the Gaussian lower bound is at
least half the accountant's ε.

``broken``: a mechanism that adds σ/2 while its accountant counts σ (the tests'
:func:`broken_mechanism.scaled_noise`, a test-only path) on a small federation (CNN of
width 16 with 5,226 parameters, 20 clients, 4 rounds at q = 0.5, ε = 8, 2000
canaries), ``--broken-runs`` times. Goal: flagged (bound > ε) in at least 90% of runs.

``null``: the correct mechanism on the same small federation, ``--null-runs`` times.
Goal: each statistic's bound exceeds ε no more often than its 5% error allows (more
than :func:`allowed_exceedances` of 100 would reject a 5% rate at the 1% level).

The small federation's σ is calibrated once and passed as the noise multiplier, so
the many runs do not repeat the calibration. Results go to ``--out``
(``results.json``, ``audit_benchmark.png``), with wall and CPU times and the load.

    nice -n 10 .venv/bin/python benchmarks/audit.py [--parts default broken null]
        [--broken-runs 20] [--null-runs 100] [--out benchmarks/results/audit]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from scipy.stats import binom

from dpfl.analysis.audit import AuditOptions, AuditReport, run_audit
from dpfl.privacy.audit import STATISTICS
from dpfl.privacy.calibration import calibrate_noise_multiplier
from dpfl.settings import RunSettings

# The σ/2 mechanism is the tests' own (tests/broken_mechanism.py): no run config reaches it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from broken_mechanism import scaled_noise  # noqa: E402

EPSILON = 8.0
CONFIDENCE = 0.95
DEFAULT_STRATEGIES = ("dp-fedavg", "dp-fedpgn")
SMALL = dict(model="cnn", model_width=16, num_clients=20, sample_rate=0.5, num_server_rounds=4, strategy="dp-fedavg")


def allowed_exceedances(runs: int, error: float = 1 - CONFIDENCE, level: float = 0.01) -> int:
    """The most exceedances of ``runs`` that a true rate ``error`` produces with probability ≥ 1 − ``level``."""
    return int(binom.ppf(1 - level, runs, error))


def summarise(report: AuditReport, seconds: float, cpu: float) -> dict:
    return {
        "strategy": report.strategy, "accountant-epsilon": report.accountant_epsilon,
        "last-iterate-epsilon": report.last_iterate_epsilon, "noise-multiplier": report.noise_multiplier,
        "bounds": {name: bound.epsilon_lower for name, bound in report.bounds.items()},
        "mu-lower": report.bounds["gaussian"].mu_lower, "estimate": report.estimate.epsilon,
        "estimate-mu": report.estimate.mu, "flagged": report.flagged, "wall-seconds": seconds, "cpu-seconds": cpu,
    }  # fmt: skip


def timed_audit(settings: RunSettings, out: Path, scale: float = 1.0) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    with scaled_noise(scale) if scale != 1.0 else nullcontext():
        report = run_audit(settings, AuditOptions(confidence=CONFIDENCE), out)
    return summarise(report, time.perf_counter() - wall, time.process_time() - cpu)


def default_part(out: Path, strategies: list[str], log: Callable[[str], None]) -> list[dict]:
    rows = []
    for strategy in strategies:
        settings = RunSettings(strategy=strategy, target_epsilon=EPSILON, max_epsilon=0.0)
        row = timed_audit(settings, out / f"default-{strategy}")
        rows.append(row)
        log(f"default federation, {strategy}: accountant {row['accountant-epsilon']:.3f}, last-iterate "
            f"{row['last-iterate-epsilon']:.3f}, gaussian bound {row['bounds']['gaussian']:.3f} "
            f"({row['bounds']['gaussian'] / row['accountant-epsilon']:.0%} of epsilon; goal >= 50%), fdp "
            f"{row['bounds']['fdp']:.3f}, threshold {row['bounds']['threshold']:.3f}, estimate {row['estimate']:.3f}; "
            f"{row['wall-seconds']:.0f} s wall, {row['cpu-seconds']:.0f} s CPU")  # fmt: skip
    return rows


def repeated_part(
    name: str, runs: int, scale: float, scratch: Path, log: Callable[[str], None], save: Callable[[list[dict]], None]
) -> list[dict]:
    """``runs`` audits of the small federation whose noise is ``scale`` times σ (``save``d after each)."""
    sigma = calibrate_noise_multiplier(EPSILON, RunSettings.delta, SMALL["sample_rate"], SMALL["num_server_rounds"])
    settings = RunSettings(**SMALL, noise_multiplier=sigma, target_epsilon=0.0, max_epsilon=0.0)
    rows: list[dict] = []
    for run in range(runs):
        rows.append(row := timed_audit(settings, scratch / f"{name}-{run}", scale))
        save(rows)
        log(f"{name} {run + 1}/{runs}: " + ", ".join(f"{s} {row['bounds'][s]:.3f}" for s in STATISTICS)
            + f", flagged {row['flagged']}, {row['wall-seconds']:.0f} s")  # fmt: skip
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    parts = (["default"] if results.get("default") else []) + (["repeated"] if results.get("broken") or results.get("null") else [])
    figure, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.5), squeeze=False)
    for axis, part in zip(axes[0], parts):
        if part == "default":
            rows = results["default"]
            names = ["accountant", "last iterate\n(heuristic)", "gaussian\n(95%)", "fdp\n(95%)", "threshold\n(95%)",
                     "one-shot\nestimate"]  # fmt: skip
            width = 0.8 / len(rows)
            for index, row in enumerate(rows):
                values = [row["accountant-epsilon"], row["last-iterate-epsilon"], row["bounds"]["gaussian"],
                          row["bounds"]["fdp"], row["bounds"]["threshold"], row["estimate"]]  # fmt: skip
                bars = axis.bar([i + index * width for i in range(len(values))], values, width, label=row["strategy"])
                axis.bar_label(bars, fmt="%.2f", fontsize=7)
            axis.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(names))], names, fontsize=8)
            axis.axhline(EPSILON / 2, color="gray", linestyle=":", label="goal: half of epsilon")
            axis.set(ylabel="epsilon (delta 1e-5)", title="default federation, white-box, one run each")
        else:
            for name, color in (("null", "tab:green"), ("broken", "tab:red")):
                values = [row["bounds"]["gaussian"] for row in results.get(name, [])]
                if values:
                    label = "correct mechanism" if name == "null" else "sigma/2, accounted as sigma"
                    axis.hist(values, bins=20, color=color, alpha=0.7, label=f"{label} ({len(values)} runs)")
            axis.axvline(EPSILON, color="black", linestyle="--", label="accountant epsilon")
            axis.set(xlabel="gaussian lower bound (95%)", ylabel="runs", title="small federation, white-box")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="*", choices=["default", "broken", "null"], default=["default", "broken", "null"],
                        help="parts to run (none: summarise and plot the saved results.json)")
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES), help="for the default part")
    parser.add_argument("--broken-runs", type=int, default=20)
    parser.add_argument("--null-runs", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/audit")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}

    def log(line: str) -> None:
        print(line, flush=True)

    def save(part: str, rows: list[dict]) -> None:  # after every run: an interrupted benchmark keeps what it did
        results[part] = rows
        results["load-average"] = os.getloadavg()
        results_file.write_text(json.dumps(results, indent=2) + "\n")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dpfl-audit-benchmark-") as scratch:
        for part in args.parts:
            if part == "default":
                save(part, default_part(out, args.strategies, log))
            else:
                runs = args.broken_runs if part == "broken" else args.null_runs
                repeated_part(part, runs, 0.5 if part == "broken" else 1.0, Path(scratch), log,
                              lambda rows, part=part: save(part, rows))  # fmt: skip
    if results.get("broken"):
        flagged = sum(row["flagged"] for row in results["broken"])
        log(f"sigma/2 flagged in {flagged} of {len(results['broken'])} runs ({flagged / len(results['broken']):.0%}; goal >= 90%)")
    if results.get("null"):
        runs = len(results["null"])
        for statistic in STATISTICS:
            over = sum(row["bounds"][statistic] > row["accountant-epsilon"] for row in results["null"])
            log(f"correct mechanism, {statistic}: bound > epsilon in {over} of {runs} runs "
                f"(at most {allowed_exceedances(runs)} expected of a 5% error rate, at the 1% level)")  # fmt: skip
        gaussian = sorted(row["bounds"]["gaussian"] for row in results["null"])
        log(f"  gaussian bound over the correct runs: median {gaussian[runs // 2]:.3f}, max {gaussian[-1]:.3f}; "
            f"last-iterate epsilon {results['null'][0]['last-iterate-epsilon']:.3f}")  # fmt: skip
    plot(results, out / "audit_benchmark.png")
    log(f"{time.perf_counter() - started:.0f} s in all, load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"{results_file}, {out / 'audit_benchmark.png'}")  # fmt: skip


if __name__ == "__main__":
    main()
