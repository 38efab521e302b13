"""Shared helpers: run the real ``dpfl`` console script of this environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DPFL = str(Path(sys.executable).parent / "dpfl")


def run_dpfl(*args: str, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([DPFL, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def dpfl():
    return run_dpfl
