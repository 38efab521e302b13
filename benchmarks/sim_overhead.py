"""Overhead of dpfl's simulation engines against a plain PyTorch loop of the same federated training.

For each scale it runs, each as its own process, with one torch thread per process:
  (a) a minimal plain PyTorch loop, written here independently of dpfl's engine, client
      and strategy code: the model, the data, local SGD, clip-and-noise and the mean;
  (b) `dpfl simulate --engine in-process --workers 1 --cohort-batching off` (clients one by one);
  (c) the same with `--workers <usable cores>`;
  (d) `dpfl simulate --engine flower`;
  (e) `dpfl simulate --engine in-process --workers 1 --cohort-batching on`: each round's
      clients trained as one vectorised computation (torch.func);
  (f) the same with `--workers <usable cores>`;
all DP-FedAvg with the same model, data, partition, local steps, learning-rate schedule,
clip norm and noise multiplier (σ given, so no run spends time calibrating it). It prints
each command's wall time (start-up included), the run's own time (from its records, or the
loop's), the median round time, the CPU time of the command's process tree, the peak RSS
and PSS summed over that tree, the final accuracy, and the ratios to (a).

Scales (client-size sets a client's local steps, K = ⌈size/batch⌉; the data is each
client's partition of the data set, cycled):
  10x600   10 clients × 600 samples, every client every round, 5 rounds, ResNet-10 w8, digits
  50x120   50 clients × 120 samples (the same data per round), 5 rounds, ResNet-10 w8, digits
  default  the default federation: 400 clients, q = 0.25, 40 rounds, ResNet-10 w8, digits
  1000x20  1000 clients × 20 samples, q = 0.25, 3 rounds, the small CNN, digits: memory
  mnist5k  400 clients of mnist5k (10 real 28x28 digits each), q = 0.25, 10 rounds, ResNet-10 w8
  1k-fake  1,000 clients of fakedata (batch 2), q = 0.1, 5 rounds, the small CNN: 100 clients a round
  10k-fake 10,000 clients of fakedata (2 images each, batch 2), q = 0.01, 5 rounds, the small
           CNN: the same 100 clients a round as 1k-fake, so its round time should not grow

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/sim_overhead.py [--scales ...] [--engines ...] [--repeat N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil

DPFL = str(Path(sys.executable).parent / "dpfl")
NOISE_MULTIPLIER = 1.0


@dataclass(frozen=True)
class Scale:
    clients: int
    client_size: int  # 0: the data set's size / clients (dpfl's default)
    sample_rate: float
    rounds: int
    model: str
    width: int
    dataset: str = "digits"
    batch_size: int = 0  # 0: the model's recipe


SCALES = {
    "10x600": Scale(10, 600, 1.0, 5, "resnet10", 8),
    "50x120": Scale(50, 120, 1.0, 5, "resnet10", 8),
    "default": Scale(400, 0, 0.25, 40, "resnet10", 8),
    "1000x20": Scale(1000, 20, 0.25, 3, "cnn", 8),
    "mnist5k": Scale(400, 0, 0.25, 10, "resnet10", 8, "mnist5k"),
    "1k-fake": Scale(1000, 2, 0.1, 5, "cnn", 8, "fakedata", batch_size=2),
    "10k-fake": Scale(10_000, 2, 0.01, 5, "cnn", 8, "fakedata", batch_size=2),
}
CORES = len(os.sched_getaffinity(0))
ENGINES = {
    "plain": "(a) plain loop",
    "in-process-1": "(b) in-process, 1 worker",
    "in-process-n": f"(c) in-process, {CORES} workers",
    "flower": "(d) Flower engine",
    "cohort-1": "(e) cohorts, 1 worker",
    "cohort-n": f"(f) cohorts, {CORES} workers",
}


def plain_loop(scale: Scale) -> dict:
    """DP-FedAvg in plain PyTorch, one process, one thread: the baseline."""
    import torch
    from torch import nn

    from dpfl.settings import RunSettings
    from dpfl.task.data import load_dataset
    from dpfl.task.models import build_model
    from dpfl.task.partition import partition_indices

    start = time.perf_counter()
    # The recipe's hyper-parameters, the data and the model are shared with dpfl; the loop is not.
    settings = RunSettings(num_clients=scale.clients, client_size=scale.client_size, model=scale.model,
                           model_width=scale.width, dataset=scale.dataset, batch_size=scale.batch_size)  # fmt: skip
    steps, clip, lr0 = settings.local_steps(), settings.clip_norm, settings.lr
    data = load_dataset(scale.dataset)
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    parts = [torch.from_numpy(p) for p in partition_indices(data.train_labels, scale.clients, "iid", seed=0)]
    torch.manual_seed(0)
    model = build_model(scale.model, data.num_classes, data.in_channels, data.image_size, scale.width)
    weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)

    def batches(part: torch.Tensor):
        while True:
            for idx in part[torch.randperm(len(part), generator=generator)].split(settings.batch_size):
                yield x_train[idx], y_train[idx]

    accuracy, round_times = 0.0, []
    for server_round in range(1, scale.rounds + 1):
        round_start = time.perf_counter()
        lr = lr0 * settings.lr_decay**server_round
        sampled = (torch.rand(scale.clients, generator=generator) < scale.sample_rate).nonzero().flatten()
        total = {name: torch.zeros_like(t) for name, t in weights.items()}
        for client in sampled.tolist():
            model.load_state_dict(weights)
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=settings.weight_decay)
            local = batches(parts[client])
            for _ in range(steps):
                inputs, targets = next(local)
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(inputs), targets).backward()
                nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                optimizer.step()
            delta = {name: weights[name] - t for name, t in model.state_dict().items()}
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in delta.values()]))
            scale_by = min(1.0, clip / float(norm))
            for name, d in delta.items():
                total[name] += scale_by * d
        expected = scale.sample_rate * scale.clients
        weights = {
            name: weights[name] - (t + NOISE_MULTIPLIER * clip * torch.randn(t.shape, generator=generator)) / expected
            for name, t in total.items()
        }
        model.load_state_dict(weights)
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        model.train()
        round_times.append(time.perf_counter() - round_start)
    return {"run-time": time.perf_counter() - start, "accuracy": accuracy, "round-time": statistics.median(round_times)}


def dpfl_command(scale: Scale, engine: str, out: Path) -> list[str]:
    engine_args = {
        "in-process-1": ["--engine", "in-process", "--workers", "1", "--cohort-batching", "off"],
        "in-process-n": ["--engine", "in-process", "--workers", str(CORES), "--cohort-batching", "off"],
        "flower": ["--engine", "flower"],
        "cohort-1": ["--engine", "in-process", "--workers", "1", "--cohort-batching", "on"],
        "cohort-n": ["--engine", "in-process", "--workers", str(CORES), "--cohort-batching", "on"],
    }[engine]
    return [DPFL, "simulate", "--strategy", "dp-fedavg", "--model", scale.model, "--width", str(scale.width),
            "--dataset", scale.dataset, "--clients", str(scale.clients), "--client-size", str(scale.client_size),
            *(["--batch-size", str(scale.batch_size)] if scale.batch_size else []),
            "--sample-rate", str(scale.sample_rate), "--rounds", str(scale.rounds), "--device", "cpu",
            "--noise-multiplier", str(NOISE_MULTIPLIER), "--max-epsilon", "0", *engine_args, "--out", str(out)]  # fmt: skip


def measure(command: list[str]) -> tuple[float, float, float, float, str]:
    """Wall time, CPU time, peak RSS and peak PSS (GiB) summed over the process tree, and
    stdout of ``command``. The CPU time counts every process of the tree that was waited for
    (the in-process engine's workers; not the Ray processes Flower's engine leaves behind).

    RSS counts a page shared by several processes (the in-process engine's forked
    workers share their parent's) once per process; PSS splits it between them, so
    its sum is the memory the tree really holds.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak_rss, peak_pss, done = 0.0, 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_pss
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                memory = [p.memory_full_info() for p in [root, *root.children(recursive=True)]]
                peak_rss = max(peak_rss, sum(m.rss for m in memory) / 2**30)
                peak_pss = max(peak_pss, sum(m.pss for m in memory) / 2**30)
            except psutil.Error:  # a process ended while being read
                pass
            time.sleep(0.5)  # reading smaps costs CPU: sample no more often than this

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, cpu, peak_rss, peak_pss, output


def run_engine(scale: Scale, engine: str, tmp: Path) -> dict:
    if engine == "plain":
        command = [sys.executable, __file__, "--plain-loop", json.dumps(asdict(scale))]
        wall, cpu, rss, pss, output = measure(command)
        return {"wall": wall, "cpu": cpu, "rss": rss, "pss": pss, **json.loads(output.strip().splitlines()[-1])}
    out = tmp / f"{engine}-{time.monotonic_ns()}"
    wall, cpu, rss, pss, _ = measure(dpfl_command(scale, engine, out))
    summary = json.loads((out / "summary.json").read_text())
    # Timings are server-private (a round's duration grows with its cohort), read from there.
    rounds = [json.loads(line) for line in (out / "server_private_diagnostics.jsonl").read_text().splitlines()]
    return {"wall": wall, "cpu": cpu, "rss": rss, "pss": pss, "run-time": rounds[-1]["wall-time"],
            "round-time": statistics.median(row["round-time"] for row in rounds), "accuracy": summary["final-accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", nargs="+", choices=SCALES, default=list(SCALES))
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--repeat", type=int, default=1, help="measure every engine this many times, keep its fastest")
    parser.add_argument("--rounds", type=int, default=0,
                        help="run every scale for this many rounds instead of its own (a shorter measurement)")
    parser.add_argument("--plain-loop", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_loop:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(plain_loop(Scale(**json.loads(args.plain_loop)))))
        return
    engines = ["plain", *[engine for engine in args.engines if engine != "plain"]]
    print(f"DP-FedAvg, sigma {NOISE_MULTIPLIER}, one torch thread per process, {CORES} usable cores, "
          f"load average {os.getloadavg()[0]:.2f} at the start")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scales:
            scale = replace(SCALES[name], rounds=args.rounds) if args.rounds > 0 else SCALES[name]
            print(f"\n{name}: {scale.clients} clients of {scale.dataset}, client-size {scale.client_size or 'default'}, "
                  f"q={scale.sample_rate}, {scale.rounds} rounds, {scale.model} w{scale.width}, "
                  f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
            print(f"  {'':28} {'wall s':>7} {'run s':>7} {'round s':>8} {'CPU s':>7} {'RSS GiB':>8} {'PSS GiB':>8} "
                  f"{'accuracy':>9} {'run/(a)':>8} {'CPU/(a)':>8} {'PSS/(a)':>8}")  # fmt: skip
            # Rounds of every engine in turn, each engine's fastest kept: on a shared machine
            # the load changes between measurements, and it only ever slows one down.
            best: dict[str, dict] = {}
            for _ in range(args.repeat):
                for engine in engines:
                    result = run_engine(scale, engine, Path(tmp))
                    if engine not in best or result["wall"] < best[engine]["wall"]:
                        best[engine] = result
            baseline = best["plain"]
            for engine, result in best.items():
                print(f"  {ENGINES[engine]:28} {result['wall']:7.1f} {result['run-time']:7.1f} "
                      f"{result['round-time']:8.3f} {result['cpu']:7.1f} {result['rss']:8.2f} {result['pss']:8.2f} "
                      f"{result['accuracy']:9.4f} {result['run-time'] / baseline['run-time']:7.2f}x "
                      f"{result['cpu'] / baseline['cpu']:7.2f}x {result['pss'] / baseline['pss']:7.2f}x",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
