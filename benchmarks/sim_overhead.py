"""Overhead of dpfl's Flower simulation against a plain PyTorch loop of the same work.

Both run the same federated training: 10 clients, 5 rounds, all clients every round
(q = 1), the small GroupNorm CNN on digits, DP-FedPGN with the same local steps,
clipping and noise. (a) is `dpfl simulate` (Flower's local simulation: SuperLink,
SuperExec, Ray actors); (b) calls the same client and server functions in one
process. Prints both wall times, the ratio, and peak memory of each.

    .venv/bin/python benchmarks/sim_overhead.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from flwr.app import ArrayRecord

from dpfl.client.data import cached_dataset, load_client_partition, model_spec
from dpfl.client.training import train_private_update
from dpfl.privacy.mechanism import ClientInstructions
from dpfl.privacy.randomness import Randomness
from dpfl.server.app import resolve_noise_multiplier
from dpfl.server.evaluation import evaluate
from dpfl.settings import RunSettings
from dpfl.strategies import get_strategy_class

CLIENTS, ROUNDS = 10, 5
ARGS = {"num_clients": CLIENTS, "num_server_rounds": ROUNDS, "model": "cnn", "model_width": 16, "sample_rate": 1.0}


def run_flower(out: Path) -> tuple[float, float]:
    """Wall time and peak summed RSS (GiB) of the whole `dpfl simulate` process tree."""
    command = [str(Path(sys.executable).parent / "dpfl"), "simulate", "--rounds", str(ROUNDS), "--clients", str(CLIENTS),
               "--model", "cnn", "--width", "16", "--sample-rate", "1.0", "--out", str(out)]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    peak, done = 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()) / 2**30)
            except psutil.Error:
                pass
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    process.wait()
    done.set()
    elapsed = time.perf_counter() - start
    assert process.returncode == 0, "dpfl simulate failed"
    return elapsed, peak


def run_plain_loop() -> tuple[float, float, float]:
    """The same rounds in one process: wall time, final accuracy, peak RSS (GiB)."""
    start = time.perf_counter()
    settings = RunSettings(**ARGS)
    data = cached_dataset(settings.dataset, settings.data_dir, settings.image_size)
    torch.manual_seed(settings.seed)
    model = model_spec(settings, data).build()
    strategy_cls = get_strategy_class(settings.strategy)
    strategy = strategy_cls.from_settings(
        settings, noise_multiplier=resolve_noise_multiplier(settings), local_steps=settings.local_steps()
    )
    x = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, data.test)
    for server_round in range(1, ROUNDS + 1):
        # What the ServerApp would send: the strategy's extra records and round config.
        strategy.global_arrays = ArrayRecord(x)
        records = {key: record.to_torch_state_dict() for key, record in strategy.extra_records(server_round).items()}
        rule = strategy_cls.local_update_rule(strategy.round_config(server_round), records)
        instructions = ClientInstructions.from_config(strategy.mechanism.instructions(True))
        updates = []
        for client in range(CLIENTS):
            partition = load_client_partition(settings, {"partition-id": client, "num-partitions": CLIENTS})
            model.load_state_dict(x)
            updates.append(
                train_private_update(
                    model, partition.dataset, rule, steps=strategy.local_steps, lr=strategy.round_lr(server_round),
                    batch_size=settings.batch_size, weight_decay=settings.weight_decay, grad_clip=settings.grad_clip,
                    instructions=instructions, generator=torch.Generator().manual_seed(server_round * CLIENTS + client),
                    noise_stream=Randomness().stream("client-noise"),
                ).update
            )  # fmt: skip
        x = strategy.aggregate_updates(server_round, x, updates)
        model.load_state_dict(x)
        _, accuracy = evaluate(model, data.test)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return time.perf_counter() - start, accuracy, peak


def main() -> None:
    plain_time, plain_accuracy, plain_peak = run_plain_loop()
    with tempfile.TemporaryDirectory() as tmp:
        flower_time, flower_peak = run_flower(Path(tmp) / "run")
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
    print(f"{CLIENTS} clients x {ROUNDS} rounds, cnn width 16 on digits, DP-FedPGN")
    print(f"plain PyTorch loop : {plain_time:7.1f} s  peak {plain_peak:.2f} GiB  accuracy {plain_accuracy:.4f}")
    print(f"dpfl simulate      : {flower_time:7.1f} s  peak {flower_peak:.2f} GiB  accuracy {summary['final-accuracy']:.4f}")
    print(f"ratio (simulate / plain): time {flower_time / plain_time:.2f}x, memory {flower_peak / plain_peak:.2f}x")


if __name__ == "__main__":
    main()
