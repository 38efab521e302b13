"""Secure aggregation's cost per round against plain aggregation (issue 28), on the protocol itself.

For each number of clients a round (``--clients``), every client clips a random update of
the default model's size (ResNet-10 of width 8 on digits: 77,858 parameters), encodes it
with the distributed Skellam mechanism (:mod:`dpfl.privacy.distributed_dp`: rotation,
conditional rounding, noise, mod 2^b) and runs SecAgg+ (:mod:`dpfl.secagg.protocol`)
with the default neighbourhood degree (:func:`dpfl.privacy.secure_sum.default_degree`) and a
SecAgg+ graph of degree 2⌈log₂ n⌉; the server unmasks and decodes. All in one process, one client after
another: times are CPU seconds of this process (robust on a shared machine), a client's
its own computation (encoding and its four answers), the server's routing, unmasking and
decoding; no network. Printed per setting: the mean
client time, the server time, bytes sent per client (masked vector at b bits, keys,
shares) and their ratio to a plain float32 update, and the round's time against plain
aggregation's (the server summing the float32 updates) on the same machine.

``--accuracy``: instead, the default federation (``make run``'s settings, ε = 8) with
central DP (``aggregation=plain``) and with secure aggregation and distributed DP
(``aggregation=secagg``), one run per seed, through the real ServerApp and ClientApp on the
in-process engine: final test accuracy and the mean wall time of a round (from the
server-private diagnostics). Results are kept in ``--out``/accuracy.json, so an interrupted
benchmark resumes where it stopped. ``--neighbours`` sets k: the masks cancel exactly, so the
released sum (hence accuracy) does not depend on k, only the cost does; a small k keeps the
simulation of all 400 clients on one machine short.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/secagg.py [--clients 10 50 100] [--bits 32]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/secagg.py --accuracy [--seeds 0 1 2] [--neighbours 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from dpfl.privacy.distributed_dp import DistributedDPParams, decode, encode
from dpfl.privacy.randomness import RandomStream
from dpfl.privacy.secure_sum import default_degree, default_min_inputs
from dpfl.secagg.protocol import SecAggSetup, run_round

DEFAULT_MODEL_PARAMETERS = 77_858  # resnet10, width 8, digits (dpfl.task.models.count_parameters)


def measure(clients: int, degree: int, size: int, bits: int, clip_norm: float, noise_multiplier: float) -> dict:
    threshold = default_min_inputs(clients)
    params = DistributedDPParams(clip_norm=clip_norm, noise_multiplier=noise_multiplier, size=size,
                                 threshold=threshold, max_inputs=clients, bits=bits)  # fmt: skip
    rng = np.random.default_rng(0)
    updates = rng.normal(size=(clients, size))
    updates *= clip_norm / np.linalg.norm(updates, axis=1, keepdims=True)
    started = time.process_time()
    plain = updates.astype(np.float32).sum(axis=0)
    plain_seconds = time.process_time() - started

    seed = os.urandom(32)
    nodes = tuple(range(1, clients + 1))
    client_seconds: dict[int, float] = defaultdict(float)
    sent: dict[int, int] = defaultdict(int)
    inputs = {}
    for node, update in zip(nodes, updates):
        started = time.process_time()
        inputs[node] = encode(update, params, seed, RandomStream(os.urandom(32)))
        client_seconds[node] += time.process_time() - started

    answering = 0.0  # the clients' CPU time inside the protocol, to tell the server's apart

    def observe(stage: int, node: int, seconds: float, size_sent: int) -> None:
        nonlocal answering
        client_seconds[node] += seconds
        sent[node] += size_sent
        answering += seconds

    setup = SecAggSetup(nodes, degree, threshold, bits, os.urandom(32))
    started = time.process_time()
    total, survivors = run_round(setup, inputs, observe=observe)
    decoded = decode(total, params, seed)
    server_seconds = time.process_time() - started - answering
    assert len(survivors) == clients
    # The decoded sum's distance from the plain sum, per coordinate: the noise (and rounding).
    error = float(np.linalg.norm(decoded - plain) / math.sqrt(size))
    return {
        "clients": clients, "degree": degree, "threshold": threshold, "bits": bits,
        "client_s": sum(client_seconds.values()) / clients, "server_s": server_seconds, "plain_s": plain_seconds,
        "bytes_per_client": sum(sent.values()) / clients, "plain_bytes": 4 * size,
        "noise_per_coordinate": error, "central_noise": noise_multiplier * clip_norm, "params": params,
    }


def accuracy(seeds: list[int], neighbours: int, out: Path, workers: int) -> None:
    """Final accuracy and round time of the default federation at ε = 8, central vs distributed DP."""
    from dpfl.engines.simulation import run_simulation
    from dpfl.settings import RunSettings

    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "accuracy.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for aggregation in ("plain", "secagg"):
        for seed in seeds:
            key = f"{aggregation}-{seed}"
            if key not in results:
                run_dir = out / key
                settings = RunSettings(aggregation=aggregation, seed=seed, out_dir=str(run_dir),
                                       secagg_neighbours=neighbours if aggregation == "secagg" else 0)  # fmt: skip
                run_dir.mkdir(parents=True, exist_ok=True)
                failure = run_simulation(settings, "in-process", workers, _wait)
                if failure:
                    raise SystemExit(f"{key}: {failure}")
                summary = json.loads((run_dir / "summary.json").read_text())
                rounds = [json.loads(line) for line in (run_dir / "server_private_diagnostics.jsonl").read_text().splitlines()]
                results[key] = {"accuracy": summary["final-accuracy"], "epsilon": summary["epsilon"],
                                "noise-multiplier": summary["noise-multiplier"],
                                "round-seconds": statistics.mean(row["round-time"] for row in rounds)}  # fmt: skip
                results_path.write_text(json.dumps(results, indent=1))
            row = results[key]
            print(f"{aggregation:>7} seed {seed}: accuracy {row['accuracy']:.4f}, epsilon {row['epsilon']:.3f}, "
                  f"sigma {row['noise-multiplier']:.4f}, {row['round-seconds']:.2f} s a round", flush=True)  # fmt: skip
    for aggregation in ("plain", "secagg"):
        values = [results[f"{aggregation}-{seed}"]["accuracy"] for seed in seeds if f"{aggregation}-{seed}" in results]
        if values:
            print(f"{aggregation:>7}: mean accuracy {statistics.mean(values):.4f} over seeds {seeds}")


def _wait(running) -> None:
    while running():
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--size", type=int, default=DEFAULT_MODEL_PARAMETERS)
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--clip-norm", type=float, default=0.2)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--accuracy", action="store_true", help="central vs distributed DP on the default federation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--neighbours", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark-secagg"))
    args = parser.parse_args()
    if args.accuracy:
        accuracy(args.seeds, args.neighbours, args.out, args.workers)
        return
    print(f"update of {args.size} parameters, C={args.clip_norm}, sigma={args.noise_multiplier}, b={args.bits}, "
          f"threshold t = ceil(2n/3)")  # fmt: skip
    header = ("n", "k", "client s", "server s", "plain s", "KB/client", "x plain", "noise/coord", "central")
    print(" ".join(f"{h:>11}" for h in header))
    for clients in args.clients:
        sparse = min(clients - 1, 2 * math.ceil(math.log2(clients)))
        sparse += sparse % 2 and sparse < clients - 1
        for degree in sorted({default_degree(clients), sparse}, reverse=True):
            row = measure(clients, degree, args.size, args.bits, args.clip_norm, args.noise_multiplier)
            print(" ".join(f"{value:>11}" for value in (
                row["clients"], row["degree"], f"{row['client_s']:.3f}", f"{row['server_s']:.3f}",
                f"{row['plain_s']:.4f}", f"{row['bytes_per_client'] / 1024:.0f}",
                f"{row['bytes_per_client'] / row['plain_bytes']:.2f}", f"{row['noise_per_coordinate']:.4f}",
                f"{row['central_noise']:.4f}")), flush=True)  # fmt: skip
        params = row["params"]
        per_coordinate, l2 = params.hostile_shift_bound
        print(f"{'':>11} grid {params.granularity:.3g}, rounded sensitivity {params.l2_sensitivity:.5g} "
              f"(C/grid {params.clip_norm / params.granularity:.5g}), mu per client {params.mu_per_input:.5g}, "
              f"wrap probability <= {params.wrap_probability:.2g}; one hostile client can move the sum by up to "
              f"{per_coordinate:.4g} per rotated coordinate, {l2:.4g} in norm (an honest one: C = {params.clip_norm:g})",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
