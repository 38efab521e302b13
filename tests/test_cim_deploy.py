"""End to end: ``dpfl deploy`` through the real console entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from threadpoolctl import threadpool_info

from dpfl.cim.names import MAPPINGS
from dpfl.cim.study import single_threaded
from dpfl.cli.main import main
from dpfl.task.checkpoint import Checkpoint, ModelSpec, save_checkpoint
from dpfl.task.data import load_dataset
from conftest import fit_on_digits


def dpfl(*args: str) -> subprocess.CompletedProcess:
    # A wide terminal, so that rich does not wrap the table cells the test looks for.
    return subprocess.run([sys.executable, "-m", "dpfl.cli", *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "COLUMNS": "160"})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A small CNN trained on digits for a few seconds, saved as a dpfl checkpoint."""
    torch.manual_seed(0)
    data = load_dataset("digits")
    spec = ModelSpec("cnn", data.num_classes, data.in_channels, data.image_size, 8)
    model = fit_on_digits(spec.build(), 6, 3e-3, 64)
    path = tmp_path_factory.mktemp("cim") / "final_model.pt"
    save_checkpoint(path, Checkpoint(spec, "digits", model.state_dict()))
    return str(path)


# Read noise (tested in test_cim_nonideal.py) is left out: it makes every read a solve, which the sweep to 512x512 tiles would pay for.
NOISY_DEVICE = ["--programming-noise", "0.03", "--stuck-off", "0.01", "--drift-nu", "0.05", "--drift-nu-std", "0.01",
                "--drift-time", "86400", "--drift-compensation"]


@pytest.mark.slow
def test_deploy_reports_every_mapping_with_intervals_over_trials(checkpoint, tmp_path):
    out = tmp_path / "deploy"
    result = dpfl("deploy", "--checkpoint", checkpoint, "--dataset", "digits", "--tile", "64",
                  "--mapping", "mdm", "--samples", "40", "--trials", "2", *NOISY_DEVICE, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "NF / output error per layer" in result.stdout and "analog, mdm (deployed)" in result.stdout
    assert "analog mode exact" in result.stdout  # the default mode
    assert "mean ± 95% interval over 2 device instances" in result.stdout and "gain-free err" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == {"digital", "quantised", "quantised_corrected",
                                       *(f"analog_{m}{kind}" for m in MAPPINGS for kind in ("", "_corrected"))}  # fmt: skip
    assert report["accuracy"]["digital"] > 0.6 and report["mode"] == "exact"
    assert report["device"]["programming_noise"] == 0.03 and report["device"]["drift_time"] == 86400
    for mapping in MAPPINGS:
        model = report["distortion"][mapping]
        assert [layer["name"] for layer in model["layers"]] == ["features.0", "features.3", "fc"]
        assert 0 < model["nf"] < 0.1 and 0 < model["output_error"] < 0.2
        # The best common gain can only lower the error (what GroupNorm divides out).
        assert 0 < model["gain_free_error"] <= model["output_error"]
        trials = report["trials"][mapping]
        for metric in ("accuracy", "accuracy_corrected", "nf", "output_error", "gain_free_error"):
            values = trials[metric]["values"]
            assert len(values) == 2 and trials[metric]["mean"] == pytest.approx(sum(values) / 2)
        # Every trial is a new device instance: NF differs between them.
        assert len(set(trials["nf"]["values"])) == 2 and trials["nf"]["half_width"] > 0
        assert report["accuracy"][f"analog_{mapping}"] == trials["accuracy"]["mean"]
    sweep = {(entry["mapping"], entry["tile_size"]): entry["nf"] for entry in report["sweep"]}
    assert sorted(sweep) == sorted((m, t) for m in MAPPINGS for t in (64, 128, 256, 512))
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
        (["--trials", "0"], "--trials must be >= 1"),
        (["--stuck-on", "-0.01"], "stuck_on_rate is a share of cells and must be in [0, 1], got -0.01"),
        (["--stuck-off", "0.2", "--stuck-on", "0.9"], "exceeds 1"),
        (["--programming-noise", "1"], "programming_noise is a relative sigma and must be in [0, 1), got 1.0"),
        (["--read-noise", "-0.1"], "read_noise is a relative sigma"),
        (["--drift-nu", "0.05"], "a drift exponent needs a drift time"),
        (["--drift-nu", "0.05", "--drift-time", "1"], "must be finite and at least drift_t0"),
        (["--drift-compensation"], "drift compensation needs a drift time"),
        (["--dataset", "cifar10"], "needs --data-dir"),
        (["--weight-bits", "4,x"], "--weight-bits '4,x' is not a comma-separated list of positive integers"),
        (["--tile", "64", "--weight-bits", "2,40"], "does not fit one 40-bit signed weight"),
        (["--tile", "64", "--bits-per-cell", "2", "--adc-bits", "7"], "this device needs adc_bits >= 8"),
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


def test_the_study_runs_on_one_thread_and_restores_the_thread_budget():
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="inside"), single_threaded():
            assert torch.get_num_threads() == 1
            assert {pool["num_threads"] for pool in threadpool_info()} == {1}
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)
