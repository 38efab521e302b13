"""Secure aggregation's cost per round against plain aggregation (issue 28), on the protocol itself.

For each number of clients a round (``--clients``), every client clips a random update of
the default model's size (ResNet-10 of width 8 on digits: 77,858 parameters), encodes it
with the distributed Skellam mechanism (:mod:`dpfl.privacy.distributed_dp`: rotation,
conditional rounding, noise, mod 2^b) and runs SecAgg+ (:mod:`dpfl.secagg.protocol`)
with the complete graph (SecAgg, the default) and a SecAgg+ graph of degree
2⌈log₂ n⌉; the server unmasks and decodes. All in one process, one client after
another: times are CPU seconds of this process (robust on a shared machine), a client's
its own computation (encoding and its four answers), the server's routing, unmasking and
decoding; no network. Printed per setting: the mean
client time, the server time, bytes sent per client (masked vector at b bits, keys,
shares) and their ratio to a plain float32 update, and the round's time against plain
aggregation's (the server summing the float32 updates) on the same machine.

Not measured here (left for the Message-API integration): accuracy at ε = 8 with
distributed vs central DP, and Flower's transport.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/secagg.py [--clients 10 50 100] [--bits 32]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import defaultdict

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--size", type=int, default=DEFAULT_MODEL_PARAMETERS)
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--clip-norm", type=float, default=0.2)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    args = parser.parse_args()
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
