#!/usr/bin/env python3
"""Create the local CA, TLS certificates and SuperNode keys for docker/compose.yml.

    python docker/gen_certs.py [--nodes 3] [--san my-host.example.org --san 10.1.2.3]

Writes (default ``docker/certs/``, which git ignores; nothing here is ever committed):

    ca/ca.crt, ca/ca.key          the local CA; ca.key never leaves this folder
    public/ca.crt, public/*.pub   what the registration job and `flwr run` need
    superlink/                    ca.crt, server.crt, server.key
    supernode-<i>/                ca.crt, auth.key (its SuperNode authentication key),
                                  runtime.crt, runtime.key (its loopback Runtime API)

Each container mounts exactly one of these folders, so a SuperNode sees only its own
key. Existing files are kept: re-running with a larger ``--nodes`` adds nodes, and
``--force`` starts over. Run as root, it hands the container folders to the image's
user (UID 49999) so that the non-root containers can read their keys.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shutil
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

IMAGE_UID = 49999
# Names the SuperLink is reached by: compose service name, and loopback for the
# ServerApp subprocess inside its container and for `flwr run` on the host.
SUPERLINK_SANS = ("superlink", "localhost", "127.0.0.1", "::1")
# A SuperNode's Runtime API listens on loopback inside its own container only.
RUNTIME_SANS = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
CERT_DAYS = 825


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "certs")
    parser.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (default 3)")
    parser.add_argument("--san", action="append", default=[],
                        help="extra DNS name or IP of the SuperLink (repeatable), e.g. for SuperNodes on other machines")
    parser.add_argument("--owner", default=f"{IMAGE_UID}:{IMAGE_UID}" if os.geteuid() == 0 else "",
                        help="UID:GID for the container folders (default: the image's user when run as root)")
    parser.add_argument("--force", action="store_true", help="delete everything in --out first")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error(f"--nodes must be >= 1, got {args.nodes}")

    out: Path = args.out
    if args.force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    ca_key, ca_cert = _ca(out / "ca")
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    folders = []

    # Nothing secret in public/: world-readable, so it needs no chown.
    public = _folder(out / "public", ca_pem, mode=0o755)
    link = _folder(out / "superlink", ca_pem)
    folders.append(link)
    if not (link / "server.crt").is_file():
        _issue(link / "server", "superlink", (*SUPERLINK_SANS, *args.san), ca_key, ca_cert)

    for i in range(1, args.nodes + 1):
        name = f"supernode-{i}"
        node = _folder(out / name, ca_pem)
        folders.append(node)
        if not (node / "auth.key").is_file():
            _write_node_key(node / "auth.key", public / f"{name}.pub", name)
        if not (node / "runtime.crt").is_file():
            _issue(node / "runtime", f"{name}-runtime", RUNTIME_SANS, ca_key, ca_cert)

    if args.owner:
        uid, gid = (int(v) for v in args.owner.split(":"))
        for folder in folders:
            for path in (folder, *folder.iterdir()):
                os.chown(path, uid, gid)
    print(f"certificates and keys for a SuperLink and {args.nodes} SuperNodes are in {out}")
    return 0


def _ca(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    folder.mkdir(mode=0o700, exist_ok=True)
    key_file, cert_file = folder / "ca.key", folder / "ca.crt"
    if key_file.is_file() and cert_file.is_file():
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        return key, x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dpfl local CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(key_file, _pem_key(key), 0o600)
    _write(cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return key, cert


def _issue(stem: Path, common_name: str, sans: tuple[str, ...], ca_key, ca_cert: x509.Certificate) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(s) for s in dict.fromkeys(sans)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(stem.with_suffix(".key"), _pem_key(key), 0o600)
    _write(stem.with_suffix(".crt"), cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_node_key(private_file: Path, public_file: Path, name: str) -> None:
    # SuperNode authentication takes an EC key on a NIST curve, in OpenSSH format.
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(private_file, private, 0o600)
    _write(public_file, public + f" {name}\n".encode(), 0o644)


def _folder(folder: Path, ca_pem: bytes, mode: int = 0o700) -> Path:
    folder.mkdir(mode=mode, exist_ok=True)
    if not (folder / "ca.crt").is_file():
        _write(folder / "ca.crt", ca_pem, 0o644)
    return folder


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode, so a key is never readable by others even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


if __name__ == "__main__":
    sys.exit(main())
