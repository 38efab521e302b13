"""Flower's log lines are printed once in a process that imports dpfl and Opacus."""

from __future__ import annotations

import subprocess
import sys


def test_flower_lines_print_once_after_opacus_configured_the_root_logger():
    code = (
        "import dpfl, opacus.utils.module_utils, logging\n"
        "assert logging.getLogger().handlers, 'opacus no longer configures the root logger'\n"
        "from flwr.common.logger import log\n"
        "log(logging.INFO, 'one-line-marker')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout + proc.stderr).count("one-line-marker") == 1, proc.stderr
