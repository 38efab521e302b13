"""docker/entrypoint.py's checks, without Docker: each mistake in a container's
configuration ends the role at once with exit code 2 and one line naming it.

The entry point is a script copied into the image, not part of the ``dpfl`` package, so
it is loaded from its file. Certificates and keys come from docker/gen_certs.py; the
SuperLink the checks connect to is a TLS listener on loopback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

DOCKER_DIR = Path(__file__).resolve().parents[1] / "docker"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"dpfl_docker_{name}", DOCKER_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


entrypoint = load_script("entrypoint")
gen_certs = load_script("gen_certs")


def run(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of the entry point; stderr must be at most one line."""
    try:
        code = entrypoint.main(list(argv))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert err.count("\n") <= 1, err
    return code, err.strip()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A SuperLink's and one SuperNode's certificates and keys, as gen_certs.py writes them."""
    out = tmp_path_factory.mktemp("certs")
    assert gen_certs.main(["--out", str(out), "--nodes", "1", "--owner", ""]) == 0
    return out


@pytest.fixture
def data_file(tmp_path) -> Path:
    """A SuperNode's partition file with the record of the partition job that wrote it."""
    path = tmp_path / "partition.pt"
    path.write_bytes(b"")
    path.with_suffix(".json").write_text(json.dumps({"partition-id": 0, "num-partitions": 3}))
    return path


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tls_superlink(certs) -> Iterator[int]:
    """A loopback TLS listener with the SuperLink's certificate; yields its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "superlink/server.crt", certs / "superlink/server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)  # so the loop sees `stop` soon after the test
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate: what one test wants

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    thread.join(timeout=10)


def supernode(data_file: Path, *extra: str, partition: tuple[int, int] = (0, 3)) -> list[str]:
    return [
        "supernode", "--partition-id", str(partition[0]), "--num-partitions", str(partition[1]),
        "--data-file", str(data_file), "--connect-timeout", "0", *extra,
    ]  # fmt: skip


# --- partition id and partition file ------------------------------------------------------


@pytest.mark.parametrize(
    "partition, message",
    [
        ((3, 3), "partition-id must be in 0..2 for 3 partitions, got 3"),
        ((-1, 3), "partition-id must be in 0..2 for 3 partitions, got -1"),
        ((0, 0), "num-partitions must be >= 1, got 0"),
    ],
)
@pytest.mark.parametrize("role", ["supernode", "partition"])
def test_partition_id_outside_the_count_is_refused(capsys, tmp_path, data_file, role, partition, message):
    if role == "supernode":
        argv = supernode(data_file, "--superlink", "superlink:8000", partition=partition)
    else:
        argv = ["partition", "--partition-id", str(partition[0]), "--num-partitions", str(partition[1]),
                "--out", str(tmp_path / "p.pt")]  # fmt: skip
    assert run(capsys, *argv) == (2, f"dpfl-docker {role}: error: {message}")
    assert not (tmp_path / "p.pt").exists()


def test_missing_or_foreign_partition_file_is_refused(capsys, tmp_path, data_file):
    missing = tmp_path / "none.pt"
    code, err = run(capsys, *supernode(missing, "--superlink", "superlink:8000"))
    assert code == 2 and err.endswith(f"data file {missing} does not exist; the partition job writes it")
    code, err = run(capsys, *supernode(data_file, "--superlink", "superlink:8000", partition=(1, 3)))
    assert code == 2 and err.endswith(f"{data_file} holds partition 0 of 3, not 1 of 3")


def test_partition_job_writes_once_and_maps_bad_settings_to_one_line(capsys, tmp_path):
    out = tmp_path / "data" / "partition.pt"
    out.parent.mkdir()
    argv = ["partition", "--partition-id", "1", "--num-partitions", "3", "--out", str(out)]
    assert entrypoint.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["partition-id"], meta["num-partitions"], meta["dataset"]) == (1, 3, "digits")
    written = out.read_bytes()
    assert entrypoint.main(argv) == 0  # a restarted job keeps the file
    assert "already holds partition 1" in capsys.readouterr().out and out.read_bytes() == written

    code, err = run(capsys, "partition", "--partition-id", "0", "--num-partitions", "3",
                    "--partition", "sorted", "--out", str(tmp_path / "other.pt"))  # fmt: skip
    assert code == 2 and err.startswith("dpfl-docker partition: error: ") and "sorted" in err
    assert not (tmp_path / "other.pt").exists()


# --- addresses and reachability -----------------------------------------------------------


@pytest.mark.parametrize("address", ["superlink", "superlink:", ":8000", "superlink:http"])
def test_address_that_is_not_host_port_is_refused(capsys, data_file, address):
    code, err = run(capsys, *supernode(data_file, "--superlink", address, "--insecure"))
    assert (code, err) == (2, f"dpfl-docker supernode: error: address {address!r} is not host:port")


def test_addresses_split_into_host_and_port():
    assert entrypoint._split_address("superlink:8000") == ("superlink", 8000)
    assert entrypoint._split_address("[::1]:9092") == ("::1", 9092)


def test_unreachable_superlink_is_named(capsys, data_file):
    port = closed_port()
    code, err = run(capsys, *supernode(data_file, "--superlink", f"127.0.0.1:{port}", "--insecure"))
    assert code == 2
    assert err.startswith(f"dpfl-docker supernode: error: cannot connect to SuperLink 127.0.0.1:{port} after 0s")
    assert err.endswith("check --superlink")


def test_superlink_with_another_ca_fails_the_tls_check(tmp_path, certs, tls_superlink):
    entrypoint._wait_reachable("127.0.0.1", tls_superlink, 5, ca_file=str(certs / "superlink/ca.crt"))
    other = tmp_path / "other"
    gen_certs.main(["--out", str(other), "--nodes", "1", "--owner", ""])
    with pytest.raises(entrypoint.InputError, match=f"TLS with SuperLink 127.0.0.1:{tls_superlink} failed .*is ca.crt"):
        entrypoint._wait_reachable("127.0.0.1", tls_superlink, 5, ca_file=str(other / "superlink/ca.crt"))


def test_healthcheck(capsys):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        assert entrypoint.main(["healthcheck", f"127.0.0.1:{listener.getsockname()[1]}"]) == 0
    port = closed_port()
    code, err = run(capsys, "healthcheck", f"127.0.0.1:{port}")
    assert code == 2 and err.startswith(f"dpfl-docker healthcheck: error: 127.0.0.1:{port} does not accept connections")


# --- certificates and keys ----------------------------------------------------------------


def test_missing_certificates_are_listed(capsys, tmp_path, data_file):
    empty = tmp_path / "certs"
    empty.mkdir()
    code, err = run(capsys, *supernode(data_file, "--superlink", "superlink:8000", "--certs", str(empty)))
    files = ", ".join(str(empty / name) for name in ("ca.crt", "auth.key", "runtime.crt", "runtime.key"))
    assert (code, err) == (2, f"dpfl-docker supernode: error: missing certificate/key file(s) {files}; run docker/gen_certs.py")
    state = tmp_path / "state"
    state.mkdir()
    code, err = run(capsys, "superlink", "--certs", str(empty), "--state-dir", str(state))
    assert code == 2 and err.endswith(f"missing certificate/key file(s) {empty / 'ca.crt'}, {empty / 'server.crt'}, "
                                      f"{empty / 'server.key'}; run docker/gen_certs.py")  # fmt: skip


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_key_names_the_uid(capsys, tmp_path, certs, data_file):
    node = tmp_path / "node"
    node.mkdir()
    for source in (certs / "supernode-1").iterdir():
        (node / source.name).write_bytes(source.read_bytes())
    (node / "auth.key").chmod(0)
    code, err = run(capsys, *supernode(data_file, "--superlink", "superlink:8000", "--certs", str(node)))
    assert code == 2 and err.endswith(f"{node / 'auth.key'} not readable by uid {os.getuid()}; "
                                      f"chown the certificate folders to {os.getuid()} (docker/gen_certs.py does when run as root)")  # fmt: skip


def test_auth_key_must_be_an_openssh_private_key(capsys, tmp_path, certs, data_file):
    entrypoint._check_private_key(str(certs / "supernode-1/auth.key"))
    node = tmp_path / "node"
    node.mkdir()
    for source in (certs / "supernode-1").iterdir():
        (node / source.name).write_bytes(source.read_bytes())
    # A PEM (PKCS#8) key where the OpenSSH one belongs.
    (node / "auth.key").write_bytes((certs / "supernode-1/runtime.key").read_bytes())
    code, err = run(capsys, *supernode(data_file, "--superlink", "superlink:8000", "--certs", str(node)))
    assert code == 2 and f"error: {node / 'auth.key'} is not an unencrypted OpenSSH private key (" in err


def test_superlink_state_folder_must_be_writable(capsys, tmp_path, certs):
    missing = tmp_path / "no-such-folder"
    code, err = run(capsys, "superlink", "--certs", str(certs / "superlink"), "--state-dir", str(missing))
    assert (code, err) == (2, f"dpfl-docker superlink: error: state folder {missing} is not writable by uid {os.getuid()}")


# --- registration and argument errors -----------------------------------------------------


def test_register_needs_public_keys_unless_insecure(capsys, tmp_path, certs):
    only_ca = tmp_path / "public"
    only_ca.mkdir()
    (only_ca / "ca.crt").write_bytes((certs / "public/ca.crt").read_bytes())
    code, err = run(capsys, "register", "--superlink", "superlink:9093", "--certs", str(only_ca))
    assert (code, err) == (2, f"dpfl-docker register: error: no SuperNode public keys (*.pub) in {only_ca}; run docker/gen_certs.py")
    assert entrypoint.main(["register", "--superlink", "superlink:9093", "--insecure"]) == 0
    assert "nothing to register" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["supernode", "--partition-id", "0", "--num-partitions", "3"], "the following arguments are required: --superlink"),
        (["supernode", "--superlink", "a:1", "--partition-id", "x", "--num-partitions", "3"], "invalid int value: 'x'"),
        # No abbreviations: --data is not taken for --data-file.
        (["supernode", "--superlink", "a:1", "--partition-id", "0", "--num-partitions", "3", "--data", "x"],
         "unrecognized arguments: --data x"),
        (["worker"], "invalid choice: 'worker'"),
    ],
)
def test_argument_errors_are_one_line(capsys, argv, message):
    code, err = run(capsys, *argv)
    assert code == 2 and err.startswith("dpfl-docker") and message in err


# --- the node's device for the deployment round --------------------------------------------


@pytest.mark.parametrize(
    "device, message",
    [
        ("device-tile-size=64 lr=0.5", "device settings take device-* keys and compress-method, compress-norm, "
                                       "compress-ratio, deploy-holdout, deploy-run-config-keys, share-accuracy, share-nf, got lr"),
        ("device-tile-size", "device settings 'device-tile-size' are not key=value pairs"),
    ],
)
def test_device_settings_with_other_keys_or_bad_syntax_are_refused(capsys, data_file, device, message):
    code, err = run(capsys, *supernode(data_file, "--superlink", "superlink:8000", "--device", device))
    assert code == 2 and err.startswith(f"dpfl-docker supernode: error: {message}")


def test_device_values_are_left_to_the_deployment_round():
    # An invalid value (R_off below R_on) fails that node's deployment only, never its start.
    entrypoint._check_device('device-name="bad" device-r-on=1e5 device-r-off=1e3 share-accuracy=true')
