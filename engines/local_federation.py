"""Run the ServerApp and ClientApp in Flower's own local simulation, managed.

``flwr run`` would start a detached local SuperLink on fixed ports under the
user's ``~/.flwr`` and leave it running, installing each app's dependencies with
``uv`` on the way. Here each run gets a private Flower home, free ports, runtime
dependency installation off, and a SuperLink process group that is stopped when
the run ends. The app directory holds only a generated ``pyproject.toml`` whose
components point at the installed ``dpfl`` package, so the same ServerApp and
ClientApp objects run as with ``flwr run .`` from a clone.

Flower's log of the run (``flower.log``) is public, so it gets only the ``flwr run``
stream of the ServerApp, and of it only the ServerApp's own lines
(:func:`dpfl.server.public_records.is_public_log_line`). The SuperLink's own log
(timestamped requests) and every other line (Flower's and Ray's notices, the
tracebacks of clients that failed or refused, which may name a node's participation)
go to a server-private file, and the lines Ray forwards from the simulated nodes'
processes (``(ClientAppActor pid=…)``: per-client facts) to the simulated nodes' log.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from dpfl.client.node import SIMULATED_NODE_CONFIGS_ENV, simulated_node_configs_env
from dpfl.server.public_records import is_public_log_line
from dpfl.errors import UsageError
from dpfl.settings import RunSettings
from dpfl.task.devices import cuda_devices

SUPERLINK_START_TIMEOUT_S = 60.0
# One CPU per ClientApp, so a 2-core machine runs two clients at a time.
CLIENT_CPUS = 1
# How Ray marks a line a simulated node's process printed.
NODE_PROCESS_MARK = "ClientAppActor pid="
# Flower's console line: colour codes, a level, a colon, the message.
COLOUR = re.compile(r"\x1b\[[0-9;]*m")
CONSOLE_LINE = re.compile(r"^\s*(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*(.*)$")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app(app_dir: Path, settings: RunSettings) -> None:
    """A minimal Flower app: the dpfl components with ``settings`` as run config."""
    config = "\n".join(f"{key} = {_toml_value(value)}" for key, value in settings.to_run_config().items())
    (app_dir / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "dpfl-simulation"
version = "1.0.0"
dependencies = ["flwr[simulation]==1.41.0"]

[tool.flwr.app]
publisher = "dpfl"

[tool.flwr.app.components]
serverapp = "dpfl.server.app:app"
clientapp = "dpfl.client.app:app"

[tool.flwr.app.config]
{config}
"""
    )


class FederationError(RuntimeError):
    """The local Flower processes failed; the message names the log to read."""


def _environment_bin() -> str:
    # The console scripts of the environment dpfl runs in: the SuperLink starts
    # `flower-superexec` and `flwr-simulation` from PATH, which may not include it.
    return str(Path(sys.executable).parent)


def private_flower_environment(flower_home: Path) -> dict[str, str]:
    """Environment for Flower processes with their own home, free ports and no ``uv`` installs."""
    return {
        **os.environ,
        "PATH": os.pathsep.join([_environment_bin(), os.environ.get("PATH", "")]),
        # Strategy plugins (module:Class) in the current directory import in every process.
        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH", "")])),
        "FLWR_HOME": str(flower_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # Without Ray's warning about a GPU setting that CPU clients do not use.
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        # One thread per process: each ClientApp has one CPU, and oversubscribed
        # OpenMP threads spin-wait (a 10x slowdown measured on 2 cores).
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(CLIENT_CPUS)),
    }


@contextmanager
def local_superlink(env: dict[str, str], log_file: Path, simulation: bool = True) -> Iterator[None]:
    """A SuperLink on the loopback ports in ``env``, stopped (with its children) on exit: for
    Flower's simulation, or (``simulation=False``) for SuperNodes to connect to its HTTP port."""
    http_port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    command = [
        "flower-superlink", "--insecure", *(["--simulation"] if simulation else []), "--isolation", "subprocess",
        "--control-api-address", f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
        "--host", "127.0.0.1", "--port", http_port, "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
        )
    try:
        deadline = time.monotonic() + SUPERLINK_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise FederationError(f"flower-superlink exited with code {process.returncode}; see {log_file}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise FederationError(f"flower-superlink did not start in {SUPERLINK_START_TIMEOUT_S:g} s; see {log_file}")
                time.sleep(0.2)
        yield
    finally:
        _stop_group(process)


# Linux's prctl option that signals a child when its parent dies.
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the SuperLink's process: get SIGTERM when dpfl dies, even by SIGKILL, so no SuperLink
    is left running a federation nobody follows (its own session escapes a group kill)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop_group(process: subprocess.Popen) -> None:
    """Stop a process and everything it started: its session's process group, and any
    descendant that left it (Ray starts its agents in sessions of their own)."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The group may outlive its leader: take the rest down too.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break
    kill_processes(descendants)


def kill_processes(processes: list[psutil.Process]) -> None:
    """SIGKILL each of ``processes`` that still runs, and reap them."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


def client_resources(device: str) -> str:
    """Flower's resources for each ClientApp of a run on ``device``: one CPU, and with GPUs a
    share of them such that a client on every core fits (Ray then shows each ClientApp only
    the GPU it assigned, which is its ``cuda``)."""
    if device.startswith("cuda:"):
        raise UsageError(f"device {device!r}: Flower's engine assigns the GPUs itself; use device cuda (or auto)")
    resources = f"client-resources-num-cpus={CLIENT_CPUS}"
    gpus = cuda_devices(device)
    if gpus:
        resources += f" client-resources-num-gpus={min(1.0, len(gpus) / len(os.sched_getaffinity(0))):.4g}"
    return resources


@contextmanager
def simulation(
    settings: RunSettings, num_supernodes: int, log_file: Path, superlink_log: Path, nodes_log: Path,
    node_configs: Sequence[Mapping[str, Any]] = (),
) -> Iterator[subprocess.Popen]:
    """Start ``flwr run`` on a private local SuperLink; yields the ``flwr run`` process.

    ``log_file`` gets the run's public stream, ``superlink_log`` the SuperLink's own log and
    ``nodes_log`` what the simulated nodes' processes print; ``node_configs`` are the
    simulated data owners' node configs (round robin by partition)."""
    with tempfile.TemporaryDirectory(prefix="dpfl-flower-") as home:
        home_path = Path(home)
        app_dir = home_path / "app"
        app_dir.mkdir()
        write_app(app_dir, settings)
        env = private_flower_environment(home_path / "flwr")
        # Also marks the nodes as simulated: their owner is this simulation's user.
        env[SIMULATED_NODE_CONFIGS_ENV] = simulated_node_configs_env(list(node_configs))
        with local_superlink(env, superlink_log):
            federation = f"num-supernodes={num_supernodes} {client_resources(settings.device)}"
            command = ["flwr", "run", str(app_dir), "--stream", "--federation-config", federation]
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=home)
            splitter = threading.Thread(target=split_stream, args=(process.stdout, log_file, superlink_log, nodes_log),
                                        daemon=True)  # fmt: skip
            splitter.start()
            try:
                yield process
            finally:
                if process.poll() is None:
                    process.terminate()
                    process.wait()
                splitter.join(timeout=10)


def split_stream(stream, public_log: Path, server_log: Path, nodes_log: Path) -> None:
    """Copy ``flwr run``'s output line by line: the simulated nodes' lines to ``nodes_log``, the
    ServerApp's own lines to ``public_log`` (without colour codes), everything else to ``server_log``."""
    nodes_log.parent.mkdir(parents=True, exist_ok=True)
    with public_log.open("ab") as public, server_log.open("ab") as server, nodes_log.open("ab") as nodes:
        for line in iter(stream.readline, b""):
            text = COLOUR.sub("", line.decode(errors="replace"))
            console = CONSOLE_LINE.match(text.rstrip("\n"))
            # The logs are files: plain text, without colour codes.
            if NODE_PROCESS_MARK in text:
                nodes.write(text.encode())
            elif console and is_public_log_line(console.group(1)):
                public.write(text.encode())
            else:
                server.write(text.encode())
            for target in (public, server, nodes):
                target.flush()
