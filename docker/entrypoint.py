#!/usr/bin/env python3
"""Entry point of the dpfl image: checks a container's inputs, then runs its role.

Flower's own processes retry a wrong address forever and report a missing file as a
multi-line traceback; every user mistake is caught here first instead, so that the
container exits at once with one line saying what to fix (and, with compose's bounded
``on-failure`` restart policy, ends up shown as exited rather than restarting).

Roles:
  superlink    flower-superlink with TLS, SuperNode authentication and state on disk, all
               of its APIs on the container's loopback; an nginx gateway publishes only
               the Fleet API (the SuperNodes' part) on FLEET_PORT
  supernode    flower-supernode for one partition, authenticated with its own key, with
               the data owner's privacy policy in its node config
  register     registers every SuperNode public key with the SuperLink (idempotent)
  flwr         Flower's CLI against the SuperLink's Control API (inside its network
               namespace), with a Flower configuration of its own
  partition    writes one node's data partition (a one-shot data-owner step)
  healthcheck  succeeds when TCP ports accept connections
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpfl.cli.options import OneLineErrorParser

PROG = "dpfl-docker"
# flower-superlink serves its Fleet, Control and Runtime APIs on one port; it listens
# on loopback only, so the Control API (unauthenticated in Flower 1.41) and the
# Runtime API are reachable from inside the SuperLink's network namespace alone.
SUPERLINK_PORT = 8000
# The Fleet gateway's port: the only one other containers and machines can reach.
FLEET_PORT = 9092
# What the SuperNodes need, and all the gateway forwards (flwr/supernode/fleet_http_client.py).
FLEET_PATH = "/v1/fleet/"
# The Flower connection name the `flwr` role registers.
CONNECTION = "dpfl-docker"
# compose.insecure.yml sets it for every container at once.
INSECURE = os.environ.get("DPFL_INSECURE") == "1"
# Loopback inside a SuperNode container: its ClientApp subprocess is the only client.
SUPERNODE_RUNTIME_ADDRESS = ("127.0.0.1", 9094)


class InputError(Exception):
    """A mistake in the container's configuration, reported as one line."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except InputError as err:
        print(f"{PROG} {args.role}: error: {err}", file=sys.stderr, flush=True)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    roles = parser.add_subparsers(dest="role", required=True)

    link = roles.add_parser("superlink", allow_abbrev=False, help="run the SuperLink")
    link.add_argument("--certs", default="/certs", help="folder with ca.crt, server.crt, server.key")
    link.add_argument("--state-dir", default="/var/lib/dpfl", help="folder for the SuperLink database")
    link.add_argument("--insecure", action="store_true", default=INSECURE, help="no TLS and no SuperNode auth (local debugging)")
    link.set_defaults(run=run_superlink)

    tool = roles.add_parser("flwr", allow_abbrev=False, add_help=False,
                            help=f"run `flwr ARGS` with a connection {CONNECTION!r} to the SuperLink's Control API")
    tool.add_argument("flwr_args", nargs=argparse.REMAINDER)
    tool.set_defaults(run=run_flwr)

    node = roles.add_parser("supernode", allow_abbrev=False, help="run one SuperNode")
    node.add_argument("--superlink", required=True, help="SuperLink Fleet API address, host:port")
    node.add_argument("--policy", default=os.environ.get("DPFL_NODE_POLICY", ""),
                      help='privacy policy, node-config style: "policy-min-noise-multiplier=1.0 policy-max-epsilon=8"')
    node.add_argument("--device", default=os.environ.get("DPFL_NODE_DEVICE", ""),
                      help='this node\'s simulated CIM device and compression for the deployment round, node-config style: '
                      '"device-name=edge device-tile-size=64 device-r-wire=1 share-accuracy=false" (docs/cim.md)')
    node.add_argument("--reports", default="/reports",
                      help="the node's private folder (its own volume): its private log and deployment reports, one subfolder per run")
    node.add_argument("--partition-id", type=int, required=True)
    node.add_argument("--num-partitions", type=int, required=True)
    node.add_argument("--data-file", default="/data/partition.pt", help="this node's partition")
    node.add_argument("--certs", default="/certs", help="folder with ca.crt, auth.key, runtime.crt, runtime.key")
    node.add_argument("--connect-timeout", type=float, default=float(os.environ.get("DPFL_CONNECT_TIMEOUT", 30)))
    node.add_argument("--insecure", action="store_true", default=INSECURE, help="no TLS and no SuperNode auth (local debugging)")
    node.set_defaults(run=run_supernode)

    reg = roles.add_parser("register", allow_abbrev=False, help="register SuperNode public keys with the SuperLink")
    reg.add_argument("--superlink", required=True, help="SuperLink Control API address, host:port")
    reg.add_argument("--certs", default="/certs", help="folder with ca.crt and one <name>.pub per SuperNode")
    reg.add_argument("--connect-timeout", type=float, default=float(os.environ.get("DPFL_CONNECT_TIMEOUT", 30)))
    reg.add_argument("--insecure", action="store_true", default=INSECURE, help="SuperNode auth is off: nothing to register")
    reg.set_defaults(run=run_register)

    part = roles.add_parser("partition", allow_abbrev=False, help="write one node's partition of a data set")
    part.add_argument("--partition-id", type=int, required=True)
    part.add_argument("--num-partitions", type=int, required=True)
    # Named as the run-config keys they match.
    part.add_argument("--dataset", default="digits")
    part.add_argument("--data-dir", default="", help="folder holding a torchvision or imagefolder data set")
    part.add_argument("--partition", default="iid", help="iid or dirichlet")
    part.add_argument("--dirichlet-alpha", type=float, default=0.5)
    part.add_argument("--seed", type=int, default=0)
    part.add_argument("--out", default="/data/partition.pt")
    part.set_defaults(run=run_partition)

    health = roles.add_parser("healthcheck", allow_abbrev=False, help="exit 0 when every host:port accepts TCP connections")
    health.add_argument("address", nargs="*", default=[f"127.0.0.1:{SUPERLINK_PORT}", f"127.0.0.1:{FLEET_PORT}"])
    health.set_defaults(run=run_healthcheck)
    return parser


# --- roles ---------------------------------------------------------------------------


def run_superlink(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    if not os.access(state_dir, os.W_OK):
        raise InputError(f"state folder {state_dir} is not writable by uid {os.getuid()}")
    cmd = [
        "flower-superlink",
        "--host", "127.0.0.1",
        "--port", str(SUPERLINK_PORT),
        "--database", str(state_dir / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    certs = None
    if args.insecure:
        cmd.append("--insecure")
    else:
        certs = _require_files(args.certs, "ca.crt", "server.crt", "server.key")
        cmd += [
            "--ssl-ca-certfile", certs["ca.crt"],
            "--ssl-certfile", certs["server.crt"],
            "--ssl-keyfile", certs["server.key"],
            "--enable-supernode-auth",
        ]
    gateway = _write_fleet_gateway_config(Path(tempfile.mkdtemp(prefix="fleet-gateway-")), certs)
    return _supervise([cmd, ["nginx", "-e", "stderr", "-c", str(gateway), "-g", "daemon off;"]])


def _write_fleet_gateway_config(folder: Path, certs: dict[str, str] | None) -> Path:
    """nginx: FLEET_PORT forwards the Fleet API's paths to the SuperLink, and nothing else.

    Flower 1.41 serves all of the SuperLink's APIs on one port and cannot split them,
    so the split is made by path in front of it (TLS is terminated here with the
    SuperLink's own certificate and re-established to it on loopback).
    """
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (folder / sub).mkdir()
    scheme = "http" if certs is None else "https"
    tls_in = "" if certs is None else (
        f"ssl_certificate {certs['server.crt']};\n        ssl_certificate_key {certs['server.key']};"
    )
    tls_out = "" if certs is None else (
        f"proxy_ssl_verify on;\n            proxy_ssl_trusted_certificate {certs['ca.crt']};\n"
        "            proxy_ssl_name localhost;"
    )
    config = folder / "nginx.conf"
    config.write_text(f"""worker_processes 1;
pid {folder}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    # Model updates and FABs pass through; their size is the SuperLink's to limit.
    client_max_body_size 0;
    proxy_read_timeout 600s;
    proxy_send_timeout 600s;
    server {{
        listen {FLEET_PORT}{'' if certs is None else ' ssl'};
        {tls_in}
        location {FLEET_PATH} {{
            proxy_pass {scheme}://127.0.0.1:{SUPERLINK_PORT};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
            {tls_out}
        }}
        # The Control and Runtime APIs (and anything else) are not served here.
        location / {{ return 404; }}
    }}
}}
""")
    return config


def _supervise(commands: list[list[str]]) -> int:
    """Run the commands side by side; when one exits, stop the others and exit with its code."""
    procs = [subprocess.Popen(cmd) for cmd in commands]

    def forward(signum, _frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while all(proc.poll() is None for proc in procs):
        time.sleep(0.5)
    first = next(proc for proc in procs if proc.returncode is not None)
    forward(signal.SIGTERM, None)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return first.returncode


def _check_partition_id(args: argparse.Namespace) -> None:
    from dpfl.errors import UsageError
    from dpfl.task.partition import check_partition_id

    try:
        check_partition_id(args.partition_id, args.num_partitions)
    except UsageError as err:
        raise InputError(str(err)) from None


def run_supernode(args: argparse.Namespace) -> int:
    _check_partition_id(args)
    _check_partition_file(Path(args.data_file), args.partition_id, args.num_partitions)
    _check_policy(args.policy)
    _check_device(args.device)
    host, port = _split_address(args.superlink)
    cmd = [
        "flower-supernode",
        "--superlink", args.superlink,
        "--node-config",
        f'partition-id={args.partition_id} num-partitions={args.num_partitions} data-file="{args.data_file}" '
        f'node-dir="{args.reports}" {args.policy} {args.device}',
        "--host", SUPERNODE_RUNTIME_ADDRESS[0],
        "--port", str(SUPERNODE_RUNTIME_ADDRESS[1]),
    ]
    if args.insecure:
        _wait_reachable(host, port, args.connect_timeout, ca_file=None)
        cmd.append("--insecure")
    else:
        certs = _require_files(args.certs, "ca.crt", "auth.key", "runtime.crt", "runtime.key")
        _check_private_key(certs["auth.key"])
        _wait_reachable(host, port, args.connect_timeout, ca_file=certs["ca.crt"])
        cmd += [
            "--root-certificates", certs["ca.crt"],
            "--auth-supernode-private-key", certs["auth.key"],
            # TLS on the loopback Runtime API too, so no hop is in clear text.
            "--ssl-ca-certfile", certs["ca.crt"],
            "--ssl-certfile", certs["runtime.crt"],
            "--ssl-keyfile", certs["runtime.key"],
        ]
    return _exec(cmd)


def run_register(args: argparse.Namespace) -> int:
    if args.insecure:
        print(f"{PROG} register: SuperNode authentication is off (insecure); nothing to register", flush=True)
        return 0
    certs = Path(args.certs)
    ca = _require_files(args.certs, "ca.crt")["ca.crt"]
    keys = sorted(certs.glob("*.pub"))
    if not keys:
        raise InputError(f"no SuperNode public keys (*.pub) in {certs}; run docker/gen_certs.py")
    host, port = _split_address(args.superlink)
    _wait_reachable(host, port, args.connect_timeout, ca_file=ca)
    with tempfile.TemporaryDirectory() as flwr_home:
        _write_flower_config(Path(flwr_home), args.superlink, ca)
        env = {**os.environ, "FLWR_HOME": flwr_home}
        for key in keys:
            name = key.stem
            proc = subprocess.run(
                ["flwr", "supernode", "register", str(key), CONNECTION, "--name", name, "--format", "json"],
                capture_output=True, text=True, env=env, check=False,
            )
            reply = json_tail(proc.stdout)
            if proc.returncode == 0 and reply.get("success"):
                print(f"{PROG} register: {name} registered as node {reply.get('node-id')}", flush=True)
            elif "already in use" in (proc.stdout + proc.stderr).lower():
                # Registration is kept in the SuperLink's database; a restart re-runs this job.
                print(f"{PROG} register: {name} was already registered", flush=True)
            else:
                reason = reply.get("error-message") or _last_line(proc.stderr or proc.stdout)
                raise InputError(f"registering {key.name} failed: {reason}")
    return 0


def run_flwr(args: argparse.Namespace) -> int:
    """`flwr ARGS` against the Control API on the SuperLink's loopback.

    This container shares the SuperLink's network namespace (compose.yml), the only
    place the Control API is reachable. Its Flower configuration is written fresh into
    a folder of its own: no user's configuration is read or changed.
    """
    address = f"127.0.0.1:{SUPERLINK_PORT}"
    ca = None if INSECURE else _require_files("/certs", "ca.crt")["ca.crt"]
    _wait_reachable(*_split_address(address), float(os.environ.get("DPFL_CONNECT_TIMEOUT", 30)), ca_file=ca)
    flwr_home = Path(tempfile.mkdtemp(prefix="flwr-home-"))
    _write_flower_config(flwr_home, address, ca)
    os.environ["FLWR_HOME"] = str(flwr_home)
    return _exec(["flwr", *args.flwr_args])


def _write_flower_config(flwr_home: Path, address: str, ca: str | None) -> None:
    tls = "insecure = true" if ca is None else f'root-certificates = "{ca}"'
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{tls}\n'
    )


def run_partition(args: argparse.Namespace) -> int:
    _check_partition_id(args)
    out = Path(args.out)
    run_config = {
        "dataset": args.dataset, "data-dir": args.data_dir, "partition": args.partition,
        "dirichlet-alpha": args.dirichlet_alpha, "seed": args.seed,
    }
    meta = {**run_config, "partition-id": args.partition_id, "num-partitions": args.num_partitions}
    meta_file = out.with_suffix(".json")
    if out.is_file() and meta_file.is_file() and json.loads(meta_file.read_text()) == meta:
        print(f"{PROG} partition: {out} already holds partition {args.partition_id}", flush=True)
        return 0

    from dpfl.client.data import export_partition
    from dpfl.errors import UsageError
    from dpfl.settings import RunSettings

    try:
        # The same split a simulation of this run config would make.
        settings = RunSettings.from_run_config(run_config)
        count = export_partition(settings, args.partition_id, args.num_partitions, out)
    except UsageError as err:
        raise InputError(str(err)) from None
    meta_file.write_text(json.dumps(meta) + "\n")
    print(f"{PROG} partition: wrote {count} {args.dataset} samples (partition {args.partition_id} "
          f"of {args.num_partitions}) to {out}", flush=True)
    return 0


def run_healthcheck(args: argparse.Namespace) -> int:
    for address in args.address:
        try:
            socket.create_connection(_split_address(address), timeout=3).close()
        except OSError as err:
            raise InputError(f"{address} does not accept connections ({err.strerror or err})") from None
    return 0


# --- checks ----------------------------------------------------------------------------


def _require_files(folder: str, *names: str) -> dict[str, str]:
    paths = {name: Path(folder) / name for name in names}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise InputError(f"missing certificate/key file(s) {', '.join(missing)}; run docker/gen_certs.py")
    unreadable = [str(p) for p in paths.values() if not os.access(p, os.R_OK)]
    if unreadable:
        raise InputError(
            f"{', '.join(unreadable)} not readable by uid {os.getuid()}; "
            f"chown the certificate folders to {os.getuid()} (docker/gen_certs.py does when run as root)"
        )
    return {name: str(p) for name, p in paths.items()}


def _check_policy(policy: str) -> None:
    """The data owner's privacy policy, parsed as Flower parses node config, checked at start."""
    from flwr.common.config import parse_config_args

    from dpfl.errors import UsageError
    from dpfl.privacy.node_policy import POLICY_PREFIX, NodePrivacyPolicy

    try:
        values = parse_config_args([policy])
    except Exception as err:  # noqa: BLE001 - Flower raises click's exception for bad syntax
        raise InputError(f"privacy policy {policy!r} is not key=value pairs ({err})") from None
    stray = [key for key in values if not key.startswith(POLICY_PREFIX)]
    if stray:
        raise InputError(f"privacy policy keys start with {POLICY_PREFIX!r}, got {', '.join(stray)}")
    try:
        NodePrivacyPolicy.from_node_config(values)
    except UsageError as err:
        raise InputError(str(err)) from None


def _check_device(device: str) -> None:
    """The syntax and keys of the node's device settings, checked at start. Their values are
    judged by the deployment round itself: a bad device fails that node's deployment only,
    with its reason in the server's table, and never stops the node from training."""
    from flwr.common.config import parse_config_args

    from dpfl.deployment.node import (
        ACCEPTED_KEY, DEVICE_PREFIX, HOLDOUT_KEY, METHOD_KEY, NORM_KEY, RATIO_KEY, SHARE_ACCURACY_KEY, SHARE_NF_KEY,
    )  # fmt: skip

    try:
        values = parse_config_args([device])
    except Exception as err:  # noqa: BLE001 - Flower raises click's exception for bad syntax
        raise InputError(f"device settings {device!r} are not key=value pairs ({err})") from None
    if device.strip() and not values:  # Flower reads a lone word as nothing at all
        raise InputError(f"device settings {device!r} are not key=value pairs (strings in double quotes)")
    allowed = {METHOD_KEY, NORM_KEY, RATIO_KEY, SHARE_ACCURACY_KEY, SHARE_NF_KEY, ACCEPTED_KEY, HOLDOUT_KEY}
    stray = [key for key in values if not key.startswith(DEVICE_PREFIX) and key not in allowed]
    if stray:
        raise InputError(f"device settings take {DEVICE_PREFIX}* keys and {', '.join(sorted(allowed))}, got {', '.join(stray)}")


def _check_private_key(path: str) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise InputError(f"{path} is not an unencrypted OpenSSH private key ({err})") from None


def _check_partition_file(path: Path, partition_id: int, num_partitions: int) -> None:
    if not path.is_file():
        raise InputError(f"data file {path} does not exist; the partition job writes it")
    meta_file = path.with_suffix(".json")
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        written = (meta.get("partition-id"), meta.get("num-partitions"))
        if written != (partition_id, num_partitions):
            raise InputError(
                f"{path} holds partition {written[0]} of {written[1]}, not {partition_id} of {num_partitions}"
            )


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _wait_reachable(host: str, port: int, timeout: float, ca_file: str | None) -> None:
    """Wait up to ``timeout`` s for the SuperLink, then check its certificate once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5)
            break
        except OSError as err:
            if time.monotonic() >= deadline:
                what = "cannot resolve" if isinstance(err, socket.gaierror) else "cannot connect to"
                raise InputError(
                    f"{what} SuperLink {host}:{port} after {timeout:g}s ({err.strerror or err}); check --superlink"
                ) from None
            time.sleep(1)
    if ca_file is None:
        sock.close()
        return
    context = ssl.create_default_context(cafile=ca_file)
    try:
        with context.wrap_socket(sock, server_hostname=host):
            pass
    except (ssl.SSLError, OSError) as err:
        raise InputError(f"TLS with SuperLink {host}:{port} failed ({err}); is ca.crt the SuperLink's CA?") from None


# --- helpers ---------------------------------------------------------------------------


def _exec(cmd: list[str]) -> int:
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)
    return 1  # not reached: execvp replaces this process


def json_tail(text: str) -> dict:
    """The JSON object that `flwr ... --format json` prints after its progress lines."""
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


if __name__ == "__main__":
    sys.exit(main())
