"""End to end: ``dpfl deploy`` through the real console entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from dpfl.cli.main import main
from dpfl.task.checkpoint import Checkpoint, ModelSpec, save_checkpoint
from dpfl.task.data import load_dataset


def dpfl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpfl.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A small CNN trained on digits for a few seconds, saved as a dpfl checkpoint."""
    torch.manual_seed(0)
    data = load_dataset("digits")
    images, labels = data.train.tensors
    spec = ModelSpec("cnn", data.num_classes, data.in_channels, data.image_size, 8)
    model = spec.build()
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(6):
        for start in range(0, len(images), 64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(images[start : start + 64]), labels[start : start + 64]).backward()
            optimiser.step()
    path = tmp_path_factory.mktemp("cim") / "final_model.pt"
    save_checkpoint(path, Checkpoint(spec, "digits", model.state_dict()))
    return str(path)


@pytest.mark.slow
def test_deploy_reports_both_mappings(checkpoint, tmp_path):
    out = tmp_path / "deploy"
    result = dpfl("deploy", "--checkpoint", checkpoint, "--dataset", "digits", "--tile", "64",
                  "--mapping", "mdm", "--samples", "40", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "NF naive" in result.stdout and "analog, MDM mapping (deployed)" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == {"digital", "quantised", "analog_naive", "analog_mdm"}
    assert report["accuracy"]["digital"] > 0.6
    for mapping in ("naive", "mdm"):
        model = report["distortion"][mapping]
        assert [layer["name"] for layer in model["layers"]] == ["features.0", "features.3", "fc"]
        assert 0 < model["nf"] < 0.1 and 0 < model["output_error"] < 0.1
    assert report["distortion"]["mdm"]["nf"] <= report["distortion"]["naive"]["nf"]
    sweep = {(entry["mapping"], entry["tile_size"]): entry["nf"] for entry in report["sweep"]}
    assert sorted(sweep) == sorted((m, t) for m in ("naive", "mdm") for t in (64, 128, 256, 512))
    naive = [sweep[("naive", t)] for t in (64, 128, 256, 512)]
    assert naive == sorted(naive)
    assert (out / "nf_vs_tile.png").stat().st_size > 0 and (out / "cell_loss.png").stat().st_size > 0


# Bad input goes through the same entry point in-process: a subprocess per case would
# spend its time importing torch and Flower.
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--r-on", "0"], "r_on must be a positive"),
        (["--r-on", "1e6", "--r-off", "1e5"], "must be larger than r_on"),
        (["--r-wire", "-1"], "r_wordline must be >= 0"),
        (["--compressed"], "holds no compression record"),
        (["--samples", "0"], "--samples must be >= 1"),
        (["--dataset", "cifar10"], "needs --data-dir"),
    ],
)
def test_deploy_bad_input_is_one_line(checkpoint, tmp_path, capsys, extra, message):
    assert main(["deploy", "--checkpoint", checkpoint, "--out", str(tmp_path), *extra]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and stderr.count("\n") == 1


def test_deploy_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["deploy", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path)]) == 2
    stderr = capsys.readouterr().err
    assert "does not exist" in stderr and stderr.count("\n") == 1


def test_deploy_rejects_tile_sizes_outside_the_menu(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["deploy", "--checkpoint", checkpoint, "--out", str(tmp_path), "--tile", "96"])
    assert exited.value.code == 2 and "--tile: invalid choice: 96" in capsys.readouterr().err
