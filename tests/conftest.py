"""Shared helpers: run the real ``dpfl`` console script, or its ``main`` in this process."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dpfl.cli.main import main
from dpfl.task.data import load_dataset

DPFL = str(Path(sys.executable).parent / "dpfl")


def run_dpfl(*args: str, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([DPFL, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def run_dpfl_in_process(*args: str, cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    """``dpfl ARGS`` through the same ``main`` the console script calls, without a new interpreter.

    For what ends before any federation starts (bad input, help, refused plugins):
    those cost seconds of imports each as subprocesses.
    """
    stdout, stderr = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    try:
        os.chdir(cwd or previous)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's own errors and --help
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(["dpfl", *args], code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture
def dpfl():
    return run_dpfl


@pytest.fixture
def dpfl_quick():
    return run_dpfl_in_process


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test that runs the console script pays a fresh interpreter's imports (~6 s) per
    # call: `make test-fast` leaves these out by their marker.
    for item in items:
        if "dpfl" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cli)


def fit_on_digits(model: nn.Module, epochs: int, lr: float, batch_size: int) -> nn.Module:
    """``model`` trained with Adam on the digits training set in a few seconds (full
    batches in order, nothing random), in eval mode: trained, bell-shaped weights for
    the crossbar tests."""
    images, labels = load_dataset("digits").train.tensors
    optimiser = torch.optim.Adam(model.parameters(), lr)
    for _ in range(epochs):
        for start in range(0, len(images), batch_size):
            optimiser.zero_grad()
            batch = slice(start, start + batch_size)
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimiser.step()
    return model.eval()


def accounted_history(schema, sigma: float, sample_rate: float, delta: float = 1e-5) -> list:
    """The accountant's history after every round of ``schema`` ran through the real mechanism
    (10 nodes, sampled by the schema's own sampler, nothing replied)."""
    from dpfl.privacy.accountants import create_accountant
    from dpfl.privacy.mechanism import ClientLevelMechanism, MechanismParams
    from dpfl.privacy.randomness import Randomness

    params = MechanismParams(noise_multiplier=sigma, clip_norm=1.0, sample_rate=sample_rate, num_clients=10,
                             delta=delta, schema=schema)  # fmt: skip
    mechanism = ClientLevelMechanism(params, create_accountant("rdp", delta), Randomness())
    for server_round in range(1, schema.rounds + 1):
        mechanism.sample(list(range(10)), server_round)
        mechanism.release([], {"w": torch.zeros(3)}, server_round)
    return mechanism.accountant.history
