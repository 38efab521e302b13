"""Test accuracy against ε for each noise mechanism and participation schema, at an equal expected cohort.

Every configuration samples the same expected share of the clients per round (``--cohort``,
default 10%): the Poisson Gaussian (today's mechanism) at q = cohort; BandMF, tree
aggregation, BLT and the Gaussian under ``cyclic`` b-groups at q = cohort·b within the group
(b = ``--band``, so q = 1 is no sampling at all at b = 1/cohort; tree and BLT are accounted
with q = 1 whatever q, as they are not banded). σ is calibrated for each to ε ∈ ``--epsilons``
(δ = 1e-5, the run's accountant), with the DP-FedAvg and DP-FedPGN rules, ``--seeds`` seeds,
on the in-process engine. Prints one table (final test accuracy, mean ± std over seeds) and
writes one plot (accuracy against ε, one line per mechanism and rule) and the rows as JSON.

    .venv/bin/python benchmarks/mechanisms.py [--clients 400 --rounds 200] [--seeds 3] [--out DIR]
    .venv/bin/python benchmarks/mechanisms.py --tiny      # a smoke run of a few seconds per configuration
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from dpfl.engines.simulation import run_simulation
from dpfl.settings import RunSettings

STRATEGIES = ("dp-fedavg", "dp-fedpgn")


def configurations(cohort: float, band: int) -> dict[str, dict]:
    """Name → the run-config keys of each mechanism at the expected cohort ``cohort``."""
    within = min(1.0, cohort * band)
    return {
        "gaussian, poisson": dict(sample_rate=cohort),
        f"bandmf, cyclic b={band}": dict(mechanism="bandmf", participation="cyclic", min_separation=band,
                                         sample_rate=within),
        f"tree, cyclic b={band}": dict(mechanism="tree", participation="cyclic", min_separation=band,
                                       sample_rate=within),
        f"blt, cyclic b={band}": dict(mechanism="blt", participation="cyclic", min_separation=band, sample_rate=within),
        f"gaussian, cyclic b={band}": dict(participation="cyclic", min_separation=band, sample_rate=within),
    }  # fmt: skip


def final_accuracy(settings: RunSettings) -> float:
    """The run's final test accuracy; a run folder that already holds a completed run is read, not run
    again (so an interrupted benchmark continues where it stopped)."""
    summary = Path(settings.out_dir) / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("outcome") == "completed":
        return float(json.loads(summary.read_text())["final-accuracy"])
    if Path(settings.out_dir).exists():
        shutil.rmtree(settings.out_dir)  # an interrupted run of this configuration: start it again
    Path(settings.out_dir).mkdir(parents=True)
    failure = run_simulation(settings, "in-process", 1, lambda running: _wait(running), ())
    if failure is not None:
        raise SystemExit(f"{settings.out_dir}: {failure}")
    return float(json.loads((Path(settings.out_dir) / "summary.json").read_text())["final-accuracy"])


def _short_name(name: str) -> str:
    """"bandmf, cyclic b=10" → "bandmf"; the Gaussian is "gaussian-poisson" or "gaussian-cyclic"."""
    mechanism, schema = name.split(", ")
    return f"{mechanism}-{schema.split()[0]}" if mechanism == "gaussian" else mechanism


def _wait(running) -> None:
    while running():
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--cohort", type=float, default=0.1, help="expected share of the clients per round")
    parser.add_argument("--band", type=int, default=10, help="min-separation b (BandMF's band, every schema's b)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--mechanisms", nargs="+", default=None,
                        help="only these configurations' mechanisms (gaussian-poisson, bandmf, tree, blt, gaussian-cyclic)")
    parser.add_argument("--partition", default="iid", help="iid (the default federation's) or dirichlet (alpha 0.5)")
    parser.add_argument("--model", default="resnet10", help="the model (its recipe; cnn for a quick longer regime)")
    parser.add_argument("--out", default="benchmarks/results/mechanisms")
    parser.add_argument("--tiny", action="store_true", help="cnn width 4, 20 clients, 4 rounds, b = 2, one seed")
    args = parser.parse_args()
    base = dict(model=args.model, num_clients=args.clients, num_server_rounds=args.rounds, partition=args.partition,
                max_epsilon=0.0)  # fmt: skip
    if args.tiny:
        base.update(model="cnn", model_width=4, num_clients=20, num_server_rounds=4)
        args.band, args.seeds, args.epsilons, args.cohort = 2, 1, [4.0], 0.25
    out = Path(args.out)
    rows = []
    for name, keys in configurations(args.cohort, args.band).items():
        if args.mechanisms and _short_name(name) not in args.mechanisms:
            continue
        for strategy in args.strategies:
            for epsilon in args.epsilons:
                accuracies = []
                for seed in range(args.seeds):
                    folder = out / f"{name.replace(', ', '-').replace(' ', '').replace('=', '')}-{strategy}-eps{epsilon:g}-seed{seed}"
                    settings = RunSettings(**base, **keys, strategy=strategy, target_epsilon=epsilon, seed=seed,
                                           out_dir=str(folder))  # fmt: skip
                    settings.validate()
                    accuracies.append(final_accuracy(settings))
                row = {"mechanism": name, "strategy": strategy, "epsilon": epsilon, "accuracies": accuracies,
                       "mean": statistics.fmean(accuracies),
                       "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0}  # fmt: skip
                rows.append(row)
                print(f"{name:24s} {strategy:10s} eps {epsilon:g}: {row['mean']:.4f} ± {row['std']:.4f} {accuracies}",
                      flush=True)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, out / "accuracy_vs_epsilon.png")
    print(f"rows: {out / 'rows.json'}, plot: {out / 'accuracy_vs_epsilon.png'}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for key in sorted({(row["mechanism"], row["strategy"]) for row in rows}):
        line = [row for row in rows if (row["mechanism"], row["strategy"]) == key]
        axes.errorbar([row["epsilon"] for row in line], [row["mean"] for row in line],
                      yerr=[row["std"] for row in line], marker="o", capsize=3, label=f"{key[0]} ({key[1]})")  # fmt: skip
    axes.set_xscale("log", base=2)
    axes.set_xlabel("epsilon (delta 1e-5)")
    axes.set_ylabel("final test accuracy")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
