"""--device: the CPU path, and the one-line refusals of a device that is not there.

No GPU is needed (nor used in CI): what needs one is checked by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import pytest
import torch

from dpfl.engines.local_federation import client_resources
from dpfl.errors import UsageError
from dpfl.settings import RunSettings
from dpfl.task.devices import available_devices, cuda_devices, device_name, resolve_device

NO_GPU = not torch.cuda.is_available()


def test_the_cpu_and_auto_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert available_devices()[0] == "cpu"
    if NO_GPU and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu") and cuda_devices("auto") == []


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_an_absent_gpu_is_refused_in_one_line_naming_what_is_available(name):
    with pytest.raises(UsageError) as refusal:
        device_name(name)
    message = str(refusal.value)
    assert "\n" not in message and f"device {name!r} is not available here" in message
    assert message.endswith(f"available: {', '.join(available_devices())}")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", ""])
def test_a_device_name_that_is_not_one_is_refused_with_the_choices(name):
    with pytest.raises(UsageError, match="choose one of auto, cpu, cuda, cuda:N, mps"):
        RunSettings(device=name).validate()


def test_flowers_engine_gets_gpus_as_client_resources_and_assigns_them_itself():
    assert client_resources("cpu") == "client-resources-num-cpus=1"
    with pytest.raises(UsageError, match="Flower's engine assigns the GPUs itself"):
        client_resources("cuda:1")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_dpfl_simulate_refuses_an_absent_gpu_before_the_run(dpfl_quick, tmp_path):
    result = dpfl_quick("simulate", "--device", "cuda", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "device 'cuda' is not available here; available: cpu" in result.stderr
    assert not (tmp_path / "run").exists()


def test_cohort_batching_on_is_refused_where_clients_cannot_train_as_one(dpfl_quick, tmp_path):
    result = dpfl_quick("simulate", "--cohort-batching", "on", "--local-dp", "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "local DP (Opacus) trains each client on its own" in result.stderr
    from dpfl.engines.simulation import client_training

    assert "in vectorised cohorts" in client_training(RunSettings(device="cpu"), "in-process")
    assert "one by one (Flower's engine" in client_training(RunSettings(device="cpu"), "flower")
    assert "one by one (cohort-batching off)" in client_training(RunSettings(cohort_batching="off"), "in-process")


@pytest.mark.slow
def test_spawned_workers_as_on_gpus_give_the_same_run(tmp_path):
    """The start method a CUDA run's workers use, checked on the CPU: the same run as one process."""
    from flwr.app import Context, RecordDict
    from test_engines import REPRODUCIBLE, assert_same_run

    from dpfl.client.app import app as client_app, train_cohort
    from dpfl.engines.inprocess import RUN_ID, SERVER_NODE_ID, ClientWorkers, in_process_grid, run_in_process
    from dpfl.server.app import app as server_app

    settings = RunSettings(**REPRODUCIBLE, device="cpu", out_dir=str(tmp_path / "one"))
    run_in_process(server_app, client_app, settings.to_run_config(), settings.num_clients)
    spawned = RunSettings(**REPRODUCIBLE, device="cpu", out_dir=str(tmp_path / "spawned")).to_run_config()
    workers = ClientWorkers(client_app, 2, train_cohort, start_method="spawn")
    try:
        grid = in_process_grid(client_app, spawned, settings.num_clients, workers, cohort=train_cohort)
        server_app(grid, Context(run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                                 run_config=spawned))  # fmt: skip
    finally:
        workers.close()
    assert_same_run(tmp_path / "one", tmp_path / "spawned")
