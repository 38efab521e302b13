"""The deployment round: every node compresses the final model with its own data and
runs it on its own simulated CIM device (``dpfl simulate --deploy``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from torch.utils.data import Subset
from dpfl.cli.main import main
from dpfl.deployment.federation import choose_nodes, screen_summary
from dpfl.deployment.node import (
    ALREADY_DEPLOYED, CONFIG_FAILURE, DEPLOY_FAILURE, DEPLOYMENT_KEY, NF_KEYS, NOT_LAST_WEIGHTS, SHARED_ACCURACY_KEYS,
    STUDIED_MAPPINGS, SUMMARY_KEYS, shared_accuracy_keys,
    device_from_config, effective_node_config, run_config_proposal, run_node_deployment,
)  # fmt: skip
from dpfl.errors import UsageError
from dpfl.settings import RunSettings, parse_node_configs
from dpfl.engines.inprocess import InProcessGrid
from dpfl.task.checkpoint import ModelSpec
from dpfl.task.data import load_dataset

QUIET_DEVICE = "device-name=quiet device-tile-size=64 device-r-wire=0.5"
LOSSY_DEVICE = "device-name=lossy device-tile-size=64 device-r-wire=4 device-r-on=50000"
# The simulated data owners' own choices (round robin by partition, as the devices): only the
# owners of the lossy devices share their local accuracies; all share their NF.
OWNERS = ["--node-config", "share-nf=true", "--node-config", "share-nf=true share-accuracy=true"]
# One tile size in the nodes' NF sweep keeps the test short (every size is a distortion pass).
SWEEP = ["--deploy-sweep-tiles", "64"]
REPORT_FILES = ("report.json", "nf_vs_tile.png", "cell_loss.png", "compression_report.json", "compressed_model.pt")


@pytest.fixture
def received(monkeypatch) -> list:
    """Every reply the server pulls from the in-process grid."""
    replies: list = []
    pull = InProcessGrid.pull_messages

    def recording(self, message_ids):
        messages = list(pull(self, message_ids))
        replies.extend(messages)
        return messages

    monkeypatch.setattr(InProcessGrid, "pull_messages", recording)
    return replies


def deployment_replies(replies: list) -> list:
    return [r for r in replies if not r.has_error() and DEPLOYMENT_KEY in r.content]


@pytest.mark.slow
def test_simulate_deploy_reports_per_node_and_shares_only_the_summary(tmp_path, capsys, received):
    out = tmp_path / "run"
    code = main([
        "simulate", "--engine", "in-process", "--model", "resnet10", "--width", "4", "--clients", "4",
        "--sample-rate", "1.0", "--rounds", "3", "--noise-multiplier", "1.0", "--max-epsilon", "0",
        "--deploy", "--deploy-ratio", "0.5", *SWEEP, "--deploy-node-config", QUIET_DEVICE, "--deploy-node-config", LOSSY_DEVICE,
        *OWNERS, "--out", str(out),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    for partition in range(4):
        node_dir = out / "nodes" / f"partition-{partition}"
        assert all((node_dir / name).stat().st_size > 0 for name in REPORT_FILES), node_dir
        report = json.loads((node_dir / "report.json").read_text())
        assert report["device"]["r_wordline"] == (0.5 if partition % 2 == 0 else 4.0)
        assert {"digital", "quantised", "analog_naive", "analog_mdm"} <= set(report["accuracy"])
    deployment = json.loads((out / "deployment.json").read_text())
    rows = deployment["nodes"]
    assert len(rows) == 4 and all(row["status"] == "deployed" for row in rows)
    by_device = {name: [row for row in rows if row["device-name"] == name] for name in ("quiet", "lossy")}
    assert all(len(group) == 2 for group in by_device.values())
    assert {row["device-r-on"] for row in by_device["lossy"]} == {50000.0}
    # More wire resistance and a lower R_on distort more, for both mappings.
    for key in ("nf-naive", "nf-mdm"):
        assert max(row[key] for row in by_device["quiet"]) < min(row[key] for row in by_device["lossy"])
    # Local accuracy only from the nodes that opted in.
    assert all(not set(SHARED_ACCURACY_KEYS) & row.keys() for row in by_device["quiet"])
    assert all(set(shared_accuracy_keys(STUDIED_MAPPINGS)) <= row.keys() for row in by_device["lossy"])
    assert "Deployment round" in printed and "quiet" in printed and "lossy" in printed
    # What reached the server: one config record of allowed scalar keys per node, no arrays.
    replies = deployment_replies(received)
    assert len(replies) == 4
    for reply in replies:
        assert list(reply.content.keys()) == [DEPLOYMENT_KEY] and not reply.content.array_records
        summary = reply.content.config_records[DEPLOYMENT_KEY]
        assert set(summary) <= SUMMARY_KEYS
        assert all(isinstance(value, (int, float, str, bool)) for value in summary.values())


@pytest.mark.slow
def test_a_bad_node_config_fails_only_that_node(tmp_path, capsys, received):
    out = tmp_path / "run"
    bad_tile = "device-name=tiny device-tile-size=8"
    bad_ratio = "device-name=greedy compress-ratio=1.5"
    code = main([
        "simulate", "--engine", "in-process", "--model", "cnn", "--width", "4", "--clients", "3", "--sample-rate", "1.0",
        "--rounds", "1", "--noise-multiplier", "1.0", "--deploy", *SWEEP, "--deploy-node-config", QUIET_DEVICE,
        "--deploy-node-config", bad_tile, "--deploy-node-config", bad_ratio, "--out", str(out),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert (out / "final_model.pt").exists()
    rows = {row["device-name"]: row for row in json.loads((out / "deployment.json").read_text())["nodes"]}
    assert rows["quiet"]["status"] == "deployed" and not set(NF_KEYS) & rows["quiet"].keys()  # no one opted in
    # The server learns a fixed reason; the node's private log has the details.
    assert rows["tiny"]["status"] == "failed" and rows["tiny"]["reason"] in (CONFIG_FAILURE, DEPLOY_FAILURE)
    assert rows["greedy"]["status"] == "failed" and rows["greedy"]["reason"] == CONFIG_FAILURE
    assert "tile size 8 does not fit" in (out / "nodes" / "partition-1" / "node_private_log.jsonl").read_text()
    assert "compress-ratio must be in (0, 1), got 1.5" in (out / "nodes" / "partition-2" / "node_private_log.jsonl").read_text()
    assert "failed:" in printed
    assert (out / "nodes" / "partition-0" / "report.json").exists()
    assert not (out / "nodes" / "partition-1" / "report.json").exists()
    assert not (out / "nodes" / "partition-2" / "report.json").exists()


@dataclass(frozen=True)
class CircularPaddingCNN(ModelSpec):
    """The small CNN with a circularly padded first conv, which no crossbar mapping places."""

    def build(self):
        model = super().build()
        model.features[0].padding_mode = "circular"
        return model


def test_an_unmappable_layer_fails_the_node_with_a_fixed_reason_and_its_details_for_the_node(tmp_path):
    data = load_dataset("digits")
    spec = CircularPaddingCNN("cnn", data.num_classes, data.in_channels, data.image_size, 4)
    summary, detail = run_node_deployment(
        RunSettings(out_dir=str(tmp_path)), {"partition-id": 0, "num-partitions": 1, "device-name": "edge"},
        tmp_path / "node", lambda: (spec, "digits", Subset(data.train, range(80))), spec.build().state_dict(),
    )  # fmt: skip
    assert summary == {"status": "failed", "device-name": "edge", "reason": DEPLOY_FAILURE}
    assert "padding mode 'circular' is not supported; only zero padding maps to im2col" in detail
    assert not any(tmp_path.iterdir())


def test_a_holdout_that_would_state_the_nodes_data_size_fails_with_a_fixed_reason(tmp_path):
    # The attack was deploy-holdout 0.9999 in the run config: the reason said "72 local examples are too
    # few ...". The holdout is now the node's own; a node that chose a bad one learns why, privately.
    data = load_dataset("digits")
    spec = ModelSpec("cnn", data.num_classes, data.in_channels, data.image_size, 2)
    summary, detail = run_node_deployment(
        RunSettings(out_dir=str(tmp_path)), {"partition-id": 0, "num-partitions": 1, "deploy-holdout": 0.9999},
        tmp_path / "node", lambda: (spec, "digits", Subset(data.train, range(72))), spec.build().state_dict(),
    )  # fmt: skip
    assert summary == {"status": "failed", "reason": DEPLOY_FAILURE}
    assert not any(ch.isdigit() for ch in summary["reason"]) and "72 local examples" in detail


def test_what_a_node_shares_and_where_it_writes_never_come_from_the_run_config():
    # The attack: a submitter turns on share-accuracy for a node that never opted in.
    settings = RunSettings(deploy_node_configs="device-tile-size=64")
    node = {"partition-id": 0, "num-partitions": 1}
    hostile = {**run_config_proposal(settings, node), "share-accuracy": "true", "share-nf": "true", "node-dir": "/tmp/x",
               "policy-max-epsilon": "100", "deploy-holdout": "0.9999"}  # fmt: skip
    config = effective_node_config(node, hostile)
    assert not {"share-accuracy", "share-nf", "node-dir", "policy-max-epsilon", "deploy-holdout"} & config.keys()
    assert config["device-tile-size"] == "64" and config["compress-method"] == settings.deploy_method
    # A node accepts only the run-config keys it allows; its own keys always win.
    assert "device-tile-size" not in effective_node_config({**node, "deploy-run-config-keys": "compress-*"}, hostile)
    assert effective_node_config({**node, "deploy-run-config-keys": "none"}, hostile) == {**node, "deploy-run-config-keys": "none"}
    assert effective_node_config({**node, "device-tile-size": 128}, hostile)["device-tile-size"] == 128
    # And a run config that names them is refused before the run, in one line.
    for key in ("share-accuracy=true", "node-dir=/tmp", "policy-max-epsilon=9", "deploy-holdout=0.9"):
        with pytest.raises(UsageError, match="is the node's own choice and cannot come from the run config"):
            RunSettings(deploy_node_configs=f"device-tile-size=64 {key}").validate()


def test_node_configs_resolve_devices_and_refuse_bad_values():
    simulated = parse_node_configs(f"{QUIET_DEVICE}; {LOSSY_DEVICE}")
    config = effective_node_config({"partition-id": 3, "num-partitions": 4, "device-adc-bits": 6}, simulated[1])
    device = device_from_config(config)
    assert (device.r_on, device.r_wordline, device.r_bitline, device.adc_bits) == (50000.0, 4.0, 4.0, 6)
    assert device_from_config({"device-adc-bits": 0}).adc_bits is None
    noisy = device_from_config({"device-read-noise": "0.02", "device-drift-time": "3600", "device-drift-compensation": "true"})
    assert (noisy.read_noise, noisy.drift_time, noisy.drift_compensation) == (0.02, 3600.0, True)
    for config, message in [
        ({"device-r-off": "1e4"}, "must be larger than r_on"),
        ({"device-r-wire": "-1"}, "r_wordline must be >= 0"),
        ({"device-tile-size": "12.5"}, "device-tile-size must be int"),
        ({"device-colour": "red"}, "unknown node config key(s) device-colour"),
    ]:
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            device_from_config(config)
    with pytest.raises(UsageError, match="is not key=value"):
        parse_node_configs("device-tile-size 64")


def test_the_server_refuses_replies_with_keys_beyond_the_summary():
    row = screen_summary(7, {"status": "deployed", "nf-naive": 0.1, "sigma": 1.0})
    assert row["status"] == "failed" and "sigma" in row["reason"] and "nf-naive" not in row
    assert screen_summary(7, {"status": "deployed", "nf-naive": 0.1}) == {"node": 7, "status": "deployed", "nf-naive": 0.1}
    assert choose_nodes([5, 3, 9, 1], 0, 0) == [1, 3, 5, 9]
    chosen = choose_nodes([5, 3, 9, 1], 2, 0)
    assert len(chosen) == 2 and set(chosen) <= {1, 3, 5, 9} and chosen == choose_nodes([1, 3, 5, 9], 2, 0)


@pytest.mark.slow
def test_a_node_deploys_only_the_weights_of_its_last_train_message_once_per_run(tmp_path):
    # The attack: queries with crafted models (a constant-class model turns "accuracy" into a label share).
    from flwr.app import ArrayRecord, Message, MessageType, RecordDict

    from dpfl.client.app import app as client_app
    from dpfl.engines.inprocess import in_process_grid
    from dpfl.strategies.base import ARRAYS_KEY
    from dpfl.strategies.dp_fedavg import DPFedAvg

    settings = RunSettings(model="cnn", model_width=2, num_clients=1, sample_rate=1.0, num_server_rounds=1,
                           deploy=True, deploy_sweep_tiles="64", deploy_ratio=0.8, out_dir=str(tmp_path / "run"))  # fmt: skip
    grid = in_process_grid(client_app, settings.to_run_config(), 1)
    node = next(iter(grid.get_node_ids()))
    data = load_dataset("digits")
    model = ModelSpec("cnn", data.num_classes, data.in_channels, data.image_size, 2).build()
    released = ArrayRecord(model.state_dict())
    crafted = ArrayRecord({name: t + 1 for name, t in model.state_dict().items()})

    def query(arrays: ArrayRecord) -> dict:
        message = Message(RecordDict({ARRAYS_KEY: arrays}), dst_node_id=node, message_type=MessageType.QUERY)
        (reply,) = grid.send_and_receive([message])
        return dict(reply.content.config_records[DEPLOYMENT_KEY])

    assert query(released)["reason"] == NOT_LAST_WEIGHTS  # no train message yet
    strategy = DPFedAvg(noise_multiplier=1.0, clip_norm=0.2, sample_rate=1.0, num_clients=1, local_steps=1, lr=0.1,
                        lr_decay=1.0, delta=1e-5)  # fmt: skip
    grid.send_and_receive(strategy.final_model_messages(released, [node]))
    assert query(crafted)["reason"] == NOT_LAST_WEIGHTS
    deployed = query(released)
    assert deployed["status"] == "deployed", (tmp_path / "run" / "nodes" / "partition-0" / "node_private_log.jsonl").read_text()
    assert query(released)["reason"] == ALREADY_DEPLOYED  # once per run
    grid.send_and_receive(strategy.final_model_messages(crafted, [node]))  # even with another train message
    assert query(crafted)["reason"] == ALREADY_DEPLOYED
