#!/usr/bin/env python3
"""Entry point of the dpfl image: checks a container's inputs, then runs its role.

Flower's own processes retry a wrong address forever and report a missing file as a
multi-line traceback; every user mistake is caught here first instead, so that the
container exits at once with one line saying what to fix (and, with compose's bounded
``on-failure`` restart policy, ends up shown as exited rather than restarting).

Roles:
  superlink    flower-superlink with TLS, SuperNode authentication and state on disk
  supernode    flower-supernode for one partition, authenticated with its own key
  register     registers every SuperNode public key with the SuperLink (idempotent)
  partition    writes one node's data partition (a one-shot data-owner step)
  healthcheck  succeeds when a TCP port accepts connections
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROG = "dpfl-docker"
SUPERLINK_PORT = 8000
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, like every other mistake here (argparse would print usage first).
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    roles = parser.add_subparsers(dest="role", required=True)

    link = roles.add_parser("superlink", allow_abbrev=False, help="run the SuperLink")
    link.add_argument("--certs", default="/certs", help="folder with ca.crt, server.crt, server.key")
    link.add_argument("--state-dir", default="/var/lib/dpfl", help="folder for the SuperLink database")
    link.add_argument("--insecure", action="store_true", default=INSECURE, help="no TLS and no SuperNode auth (local debugging)")
    link.set_defaults(run=run_superlink)

    node = roles.add_parser("supernode", allow_abbrev=False, help="run one SuperNode")
    node.add_argument("--superlink", required=True, help="SuperLink Fleet API address, host:port")
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

    health = roles.add_parser("healthcheck", allow_abbrev=False, help="exit 0 when host:port accepts TCP connections")
    health.add_argument("address", nargs="?", default=f"127.0.0.1:{SUPERLINK_PORT}")
    health.set_defaults(run=run_healthcheck)
    return parser


# --- roles ---------------------------------------------------------------------------


def run_superlink(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    if not os.access(state_dir, os.W_OK):
        raise InputError(f"state folder {state_dir} is not writable by uid {os.getuid()}")
    cmd = [
        "flower-superlink",
        "--host", "0.0.0.0",
        "--port", str(SUPERLINK_PORT),
        "--database", str(state_dir / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
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
    return _exec(cmd)


def _check_partition_id(args: argparse.Namespace) -> None:
    if args.num_partitions < 1:
        raise InputError(f"num-partitions must be >= 1, got {args.num_partitions}")
    if not 0 <= args.partition_id < args.num_partitions:
        raise InputError(
            f"partition-id must be in 0..{args.num_partitions - 1} for {args.num_partitions} partitions, "
            f"got {args.partition_id}"
        )


def run_supernode(args: argparse.Namespace) -> int:
    _check_partition_id(args)
    _check_partition_file(Path(args.data_file), args.partition_id, args.num_partitions)
    host, port = _split_address(args.superlink)
    cmd = [
        "flower-supernode",
        "--superlink", args.superlink,
        "--node-config",
        f'partition-id={args.partition_id} num-partitions={args.num_partitions} data-file="{args.data_file}"',
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
        # A Flower Configuration of its own, so nothing is read from or left in $HOME.
        Path(flwr_home, "config.toml").write_text(
            f'[superlink]\ndefault = "compose"\n\n[superlink.compose]\naddress = "{args.superlink}"\n'
            f'root-certificates = "{ca}"\n'
        )
        env = {**os.environ, "FLWR_HOME": flwr_home}
        for key in keys:
            name = key.stem
            proc = subprocess.run(
                ["flwr", "supernode", "register", str(key), "compose", "--name", name, "--format", "json"],
                capture_output=True, text=True, env=env, check=False,
            )
            reply = _json_tail(proc.stdout)
            if proc.returncode == 0 and reply.get("success"):
                print(f"{PROG} register: {name} registered as node {reply.get('node-id')}", flush=True)
            elif "already in use" in (proc.stdout + proc.stderr).lower():
                # Registration is kept in the SuperLink's database; a restart re-runs this job.
                print(f"{PROG} register: {name} was already registered", flush=True)
            else:
                reason = reply.get("error-message") or _last_line(proc.stderr or proc.stdout)
                raise InputError(f"registering {key.name} failed: {reason}")
    return 0


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
        count = export_partition(settings, args.partition_id, args.num_partitions, out.with_suffix(".tmp"))
    except UsageError as err:
        raise InputError(str(err)) from None
    out.with_suffix(".tmp").replace(out)
    meta_file.write_text(json.dumps(meta) + "\n")
    print(f"{PROG} partition: wrote {count} {args.dataset} samples (partition {args.partition_id} "
          f"of {args.num_partitions}) to {out}", flush=True)
    return 0


def run_healthcheck(args: argparse.Namespace) -> int:
    host, port = _split_address(args.address)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        raise InputError(f"{args.address} does not accept connections ({err.strerror or err})") from None
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


def _json_tail(text: str) -> dict:
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
