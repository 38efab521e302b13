#!/usr/bin/env bash
# What needs a GPU, for a machine that has one to run as is (a few minutes; at most 10).
#
#   benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. The CPU reference: DP-FedAvg on ResNet-18 (width 64) with 32x32 fakedata, 8 clients
#    every round, 2 local steps, 2 rounds, --reproducible-noise, on the CPU.
# 2. With a CUDA GPU, the same run on it: the in-process engine client by client, in
#    vectorised cohorts, in two spawned workers (round robin over the GPUs), and Flower's
#    engine (client-resources-num-gpus); each run's final model against the CPU's.
#    cuDNN's TF32 convolutions and other kernels round differently, so the models agree
#    to about 1e-3, not bit for bit: a difference above 1e-2 (relative) fails the check.
# 3. With a GPU, the vectorised cohort's speed-up: 64 clients, q = 0.5, client by client
#    against in cohorts, each the run's own time from its server-private records.
# Without a CUDA GPU it runs part 1, says so, and exits 0.
#
# Needs the repository's .venv (`make venv`). Exit status: 0 when every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=.venv/bin/python
DPFL=.venv/bin/dpfl
OUT=${1:-$(mktemp -d -t dpfl-gpu-check-XXXX)}
mkdir -p "$OUT"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

CHECK=(--strategy dp-fedavg --model resnet18 --width 64 --dataset fakedata --clients 8 --sample-rate 1
       --client-size 32 --batch-size 16 --rounds 2 --noise-multiplier 1 --max-epsilon 0 --reproducible-noise --seed 0)
SPEED=(--strategy dp-fedavg --model resnet18 --width 64 --dataset fakedata --clients 64 --sample-rate 0.5
       --client-size 32 --batch-size 16 --rounds 2 --noise-multiplier 1 --max-epsilon 0 --seed 0)

run() {  # name, then dpfl simulate's arguments
    local name=$1
    shift
    echo "== $name: dpfl simulate $*"
    "$DPFL" simulate "$@" --out "$OUT/$name" >"$OUT/$name.log" 2>&1 || { tail -20 "$OUT/$name.log"; exit 1; }
    grep -E "clients train on|^completed" "$OUT/$name.log" | sed 's/^/   /'
}

run cpu "${CHECK[@]}" --device cpu --engine in-process --workers 1 --cohort-batching off

GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$GPUS" = 0 ]; then
    echo "no CUDA GPU here (torch.cuda.is_available() is False): the GPU checks were skipped; CPU reference in $OUT/cpu"
    exit 0
fi
"$PYTHON" -c "import torch; print('GPUs:', ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))"

run gpu-loop "${CHECK[@]}" --device cuda --engine in-process --workers 1 --cohort-batching off
run gpu-cohort "${CHECK[@]}" --device cuda --engine in-process --workers 1 --cohort-batching on
run gpu-workers "${CHECK[@]}" --device cuda --engine in-process --workers 2 --cohort-batching on
run gpu-flower "${CHECK[@]}" --device cuda --engine flower
run speed-loop "${SPEED[@]}" --device cuda --engine in-process --workers 1 --cohort-batching off
run speed-cohort "${SPEED[@]}" --device cuda --engine in-process --workers 1 --cohort-batching on

"$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

from dpfl.task.checkpoint import load_checkpoint

out = Path(sys.argv[1])
TOLERANCE = 1e-2


def model(name):
    return load_checkpoint(out / name / "final_model.pt").state_dict


def metrics(name):
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


reference, failed = model("cpu"), False
print(f"\n{'run':12} {'max |dw| / max |w|':>20} {'final accuracy':>15}  (CPU: {metrics('cpu')[-1]['accuracy']:.4f})")
for name in ("gpu-loop", "gpu-cohort", "gpu-workers", "gpu-flower"):
    weights = model(name)
    scale = max(float(t.abs().max()) for t in reference.values())
    difference = max(float((weights[k].double() - reference[k].double()).abs().max()) for k in reference) / scale
    failed |= not difference <= TOLERANCE
    print(f"{name:12} {difference:20.2e} {metrics(name)[-1]['accuracy']:15.4f}" + ("  FAILED" if difference > TOLERANCE else ""))


def run_time(name):
    rows = [json.loads(line) for line in (out / name / "server_private_diagnostics.jsonl").read_text().splitlines()]
    return rows[-1]["wall-time"]


loop, cohort = run_time("speed-loop"), run_time("speed-cohort")
print(f"\nvectorised cohorts on the GPU, 64 clients, q=0.5, 2 rounds: {loop:.1f} s client by client, "
      f"{cohort:.1f} s in cohorts: {loop / cohort:.2f}x")
print(f"records in {out}")
sys.exit(1 if failed else 0)
EOF
