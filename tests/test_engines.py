"""The engines are interchangeable: with --reproducible-noise, the same seed gives the same run
under Flower's engine and the in-process engine, with one worker process or several."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from dpfl.client.app import app as client_app
from dpfl.client.cache import resident_model
from dpfl.client.data import load_client_partition
from dpfl.client.training import train_private_update
from dpfl.privacy.mechanism import ClientInstructions
from dpfl.privacy.randomness import Randomness
from dpfl.server.app import app as server_app
from dpfl.engines.inprocess import ClientWorkers, RunStopped, in_process_grid, run_in_process
from dpfl.server.recorder import PRIVATE_DIAGNOSTICS_FILE
from dpfl.settings import RunSettings
from dpfl.strategies.base import LocalUpdateRule
from dpfl.task.checkpoint import load_checkpoint

# Client-side noise placement: every node gets a message each round (noise-only ones too).
REPRODUCIBLE = dict(model="cnn", model_width=4, num_clients=12, sample_rate=0.5, num_server_rounds=3,
                    target_epsilon=0.0, noise_multiplier=1.0, max_epsilon=0.0, reproducible_noise=True,
                    noise_placement="client")  # fmt: skip


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def public_rows(out: Path) -> list[dict]:
    return lines(out / "metrics.jsonl")


def assert_same_run(first: Path, second: Path) -> None:
    # Accuracy and loss come from the final weights, which may differ in the last bits
    # where torch runs with another number of threads.
    for a, b in zip(public_rows(first), public_rows(second), strict=True):
        assert a.keys() == b.keys()
        numbers = [key for key, value in a.items() if isinstance(value, float)]
        assert {k: a[k] for k in numbers} == pytest.approx({k: b[k] for k in numbers}, rel=1e-4, abs=1e-4)
        assert {k: v for k, v in a.items() if k not in numbers} == {k: v for k, v in b.items() if k not in numbers}
    a, b = (load_checkpoint(out / "final_model.pt").state_dict for out in (first, second))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_worker_processes_do_not_change_a_run(tmp_path):
    outs = []
    for workers in (1, 2):
        settings = RunSettings(**REPRODUCIBLE, out_dir=str(tmp_path / f"workers-{workers}"))
        run_in_process(server_app, client_app, settings.to_run_config(), settings.num_clients, workers=workers)
        outs.append(Path(settings.out_dir))
    assert_same_run(*outs)
    # The same clients each round: the sample comes from the seed's stream over the same nodes.
    sampled = [[row["sampled"] for row in lines(out / PRIVATE_DIAGNOSTICS_FILE)] for out in outs]
    assert sampled[0] == sampled[1] and len(set(sampled[0])) > 1
    assert (outs[0] / "curves.png").read_bytes().startswith(b"\x89PNG")  # every run draws its curves


def test_worker_processes_carry_each_nodes_state_and_keep_the_order_of_replies():
    counting = ClientApp()

    @counting.train()
    def train(msg: Message, context) -> Message:
        if context.node_config["partition-id"] == 3:
            raise RuntimeError("partition 3 fails")
        seen = int(context.state["count"]["n"]) + 1 if "count" in context.state else 1
        context.state["count"] = ConfigRecord({"n": seen})
        return Message(RecordDict({"reply": ConfigRecord({"node": msg.metadata.dst_node_id, "n": seen})}), reply_to=msg)

    workers = ClientWorkers(counting, 2)
    try:
        grid = in_process_grid(counting, {}, 5, workers)
        nodes = sorted(grid.get_node_ids())
        for _ in range(3):
            messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]
            replies = list(grid.send_and_receive(messages))
            failed = [reply for reply in replies if reply.has_error()]
            assert len(failed) == 1 and "partition 3 fails" in failed[0].error.reason
            assert [r.content["reply"]["node"] for r in replies if not r.has_error()] == nodes[:3] + nodes[4:]
    finally:
        workers.close()
    counts = {node: context.state["count"]["n"] for node, context in grid.node_contexts.items() if "count" in context.state}
    assert counts == {node: 3 for node in nodes if node != nodes[3]}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stopped_run_ends_before_its_next_client(tmp_path, workers):
    stop = threading.Event()
    stop.set()  # as the CLI does on Ctrl-C or SIGTERM, here before the first round
    settings = RunSettings(**REPRODUCIBLE, out_dir=str(tmp_path / "stopped"))
    with pytest.raises(RunStopped):
        run_in_process(server_app, client_app, settings.to_run_config(), settings.num_clients, workers, stop)
    assert [row["round"] for row in lines(tmp_path / "stopped" / "metrics.jsonl")] == [0]


@pytest.mark.slow
def test_flowers_engine_and_the_in_process_engine_give_the_same_run(dpfl, tmp_path):
    # Every client every round (q = 1): Flower gives its nodes random ids, so the seed's
    # sampling stream, drawn over the sorted ids, picks other partitions under each engine.
    common = ["--model", "cnn", "--width", "4", "--clients", "4", "--sample-rate", "1.0", "--rounds", "3",
              "--noise-multiplier", "1.0", "--max-epsilon", "0", "--reproducible-noise"]  # fmt: skip
    outs = [tmp_path / "flower", tmp_path / "in-process"]
    for out, engine in zip(outs, (["--engine", "flower"], ["--engine", "in-process", "--workers", "2"])):
        result = dpfl("simulate", *common, *engine, "--out", str(out))
        assert result.returncode == 0, result.stdout + result.stderr
    assert_same_run(*outs)


# --- what one engine process reuses between messages ----------------------------------------


def test_a_reused_model_trains_as_a_freshly_built_one():
    settings = RunSettings(model="cnn", model_width=4, num_clients=4)
    partitions = [load_client_partition(settings, {"partition-id": i, "num-partitions": 4}) for i in range(2)]
    spec = partitions[0].spec
    torch.manual_seed(0)
    weights = spec.build().state_dict()

    def update(model, partition):
        model.load_state_dict(weights)
        return train_private_update(
            model, partition.dataset, LocalUpdateRule({}, {}), steps=3, lr=0.1, batch_size=4, weight_decay=1e-3,
            grad_clip=10.0, instructions=ClientInstructions.flat(1.0), generator=torch.Generator().manual_seed(1),
            noise_stream=Randomness(0).stream("test"),
        ).update  # fmt: skip

    resident = resident_model(spec)
    update(resident, partitions[1])  # another client trained on it before
    assert resident_model(spec) is resident
    reused, fresh = update(resident, partitions[0]), update(spec.build(), partitions[0])
    for name in fresh:
        assert torch.equal(reused[name], fresh[name])
