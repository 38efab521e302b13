"""The crossbar solvers against a circuit simulator: ngspice solves the same netlist.

Needs ngspice (Debian's ``ngspice`` package). As root (CI) the test installs it with
apt-get when it is missing; otherwise it fails saying how to install it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dpfl.cim.circuit import NodalSolver, solve_fixed_point

pytestmark = pytest.mark.slow


def _run(*cmd: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


@pytest.fixture(scope="module")
def ngspice() -> str:
    """Path of the ngspice binary, installed here (as root) if need be."""
    if shutil.which("ngspice") is None:
        if os.geteuid() != 0:
            pytest.fail("ngspice is not installed and this test is not root, so it cannot install it: "
                        "run `apt-get install -y ngspice` (or run the test as root)")
        installed = _run("apt-get", "install", "-y", "ngspice")
        if installed.returncode != 0:  # a stale package index: refresh it once
            _run("apt-get", "update")
            installed = _run("apt-get", "install", "-y", "ngspice")
        if installed.returncode != 0 or shutil.which("ngspice") is None:
            tail = "\n".join((installed.stdout + installed.stderr).strip().splitlines()[-10:])
            pytest.fail(f"could not install ngspice with `apt-get install -y ngspice`:\n{tail}")
    return shutil.which("ngspice")


def crossbar_netlist(conductance: np.ndarray, voltages: np.ndarray, r_wordline: float, r_bitline: float) -> str:
    """The crossbar of dpfl.cim.circuit as a SPICE netlist: a source per driver, a
    resistor per wire segment and per cell, and a 0 V source per sense amplifier
    (virtual ground) whose branch current is the column current."""
    rows, cols = conductance.shape
    lines = ["* dpfl crossbar cross-check"]
    for i in range(rows):
        lines.append(f"vd{i} d{i} 0 dc {voltages[i]:.17g}")
        for j in range(cols):
            left = f"d{i}" if j == 0 else f"w{i}_{j - 1}"
            lines.append(f"rw{i}_{j} {left} w{i}_{j} {r_wordline:.17g}")
            lines.append(f"rc{i}_{j} w{i}_{j} b{i}_{j} {1 / conductance[i, j]:.17g}")
            below = f"b{i + 1}_{j}" if i < rows - 1 else f"s{j}"
            lines.append(f"rb{i}_{j} b{i}_{j} {below} {r_bitline:.17g}")
    lines += [f"vs{j} s{j} 0 dc 0" for j in range(cols)]
    lines += [".control", "set numdgt=16", "op"]
    lines += [f"print vs{j}#branch" for j in range(cols)]
    lines += ["quit 0", ".endc", ".end"]  # quit: batch mode would otherwise miss .print lines and exit 1
    return "\n".join(lines) + "\n"


def spice_column_currents(ngspice: str, netlist: str, cols: int, workdir: Path) -> np.ndarray:
    path = workdir / "crossbar.cir"
    path.write_text(netlist)
    result = _run(ngspice, "-b", str(path), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    found = dict(re.findall(r"vs(\d+)#branch\s*=\s*(\S+)", result.stdout))
    assert len(found) == cols, result.stdout[-2000:]
    # SPICE counts a source's current from its + node through it: into vs from the bitline.
    return np.array([float(found[str(j)]) for j in range(cols)])


@pytest.mark.parametrize("r_wordline, r_bitline", [(5.0, 5.0), (2.0, 10.0)])
def test_both_solvers_match_ngspice_on_a_16x16_crossbar(ngspice, tmp_path, r_wordline, r_bitline):
    rng = np.random.default_rng(16)
    size = 16
    # Random conductances between 10 kOhm and 1 MOhm, log-uniform; random binary inputs.
    conductance = 1 / 10 ** rng.uniform(4, 6, (size, size))
    voltages = np.where(rng.random(size) < 0.6, 0.2, 0.0)
    spice = spice_column_currents(ngspice, crossbar_netlist(conductance, voltages, r_wordline, r_bitline), size, tmp_path)
    ideal = voltages @ conductance
    assert np.abs(spice - ideal).max() > 1e-3 * np.abs(ideal).max()  # the wires matter here

    nodal = NodalSolver(conductance, r_wordline, r_bitline).cell_currents(voltages[None])[0].sum(0)
    fast = solve_fixed_point(torch.tensor(conductance), torch.tensor(voltages[None]), r_wordline, r_bitline)[0].sum(0).numpy()
    for name, columns in (("nodal", nodal), ("fixed point", fast)):
        relative = np.abs(columns - spice).max() / np.abs(spice).max()
        assert relative <= 1e-6, (name, relative)
