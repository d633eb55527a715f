"""A project certificate authority: the coordinator's server certificate and one client certificate per
worker, whose common name is the worker's identity (mutual TLS). Built on the `cryptography` library."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "feddiff project CA"
VALID_DAYS = 825  # the longest lifetime browsers and most TLS stacks accept for leaf certificates


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "feddiff"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_folder(directory: Path) -> None:
    """`directory` created (with its parents); ValueError naming --out-dir when a file is in the way."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--out-dir {str(directory)!r} is a file, not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out-dir {str(directory)!r}: cannot create the folder ({e.strerror})") from None


def _pair(directory: Path, name: str) -> Issued | None:
    """The key pair `name` already in `directory`, None when neither file is there; ValueError when only one
    of them is (a certificate without its key, or a key without its certificate, is never replaced)."""
    pair = Issued(directory / f"{name}.crt", directory / f"{name}.key")
    there = [p for p in (pair.cert, pair.key) if p.exists()]
    if len(there) == 1:
        missing = pair.key if there[0] == pair.cert else pair.cert
        raise ValueError(
            f"--out-dir {str(directory)!r}: {there[0].name} is there without {missing.name}; delete it to issue the pair again, or use a new --out-dir"
        )
    return pair if there else None


def ensure_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in `directory` (ca.crt, ca.key), created on first use."""
    _make_folder(directory)
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    if _pair(directory, "ca") is not None:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(CA_NAME))
        .issuer_name(_name(CA_NAME))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert, key


def issue(
    directory: Path,
    name: str,
    *,
    server_names: Sequence[str] = (),
    client: bool,
    server: bool,
) -> Issued:
    """A leaf certificate signed by the project CA; `name` is the common name (a worker's identity)."""
    ca_cert, ca_key = ensure_ca(directory)
    key = _key()
    now = dt.datetime.now(dt.UTC)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    alt: list[x509.GeneralName] = []
    for host in server_names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    issued = Issued(directory / f"{name}.crt", directory / f"{name}.key")
    _write_key(issued.key, key)
    _write_cert(issued.cert, cert)
    return issued


def server_names(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses a server certificate holds."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*alt.get_values_for_type(x509.DNSName), *(str(ip) for ip in alt.get_values_for_type(x509.IPAddress))]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def create_project(directory: Path, coordinator_hosts: Sequence[str], workers: Sequence[str], log: Callable[[str], None] = _stderr) -> list[Path]:
    """CA (if missing), the coordinator's certificate for `coordinator_hosts` (plus localhost) and one per
    worker, each issued only where its key pair is missing: a pair already there is kept, never replaced (its
    holder may be using it). ValueError, before anything is written, when the kept coordinator certificate
    lacks a host asked for. Logs one line of what was kept and what issued; returns the certificates written."""
    _make_folder(directory)
    hosts = list(dict.fromkeys([*coordinator_hosts, "localhost", "127.0.0.1"]))
    names = ["coordinator", *dict.fromkeys(workers)]
    kept = {name for name in ["ca", *names] if _pair(directory, name) is not None}
    if "coordinator" in kept:
        cert = directory / "coordinator.crt"
        has = server_names(cert)
        lacking = [h for h in hosts if h not in has]
        if lacking:
            raise ValueError(
                f"--coordinator-host {lacking[0]!r}: the kept coordinator certificate {str(cert)!r} does not name it "
                f"(it names {', '.join(has) or 'no host'}); use a new --out-dir, or delete {cert.name} and coordinator.key to issue it again"
            )
    written = [] if "ca" in kept else [directory / "ca.crt"]
    ensure_ca(directory)
    for name in names:
        if name in kept:
            continue
        if name == "coordinator":
            written.append(issue(directory, name, server_names=hosts, server=True, client=True).cert)
        else:
            written.append(issue(directory, name, client=True, server=False).cert)
    issued = [n for n in ["ca", *names] if n not in kept]
    log(f"{directory}: kept {', '.join(n for n in ['ca', *names] if n in kept) or 'none'} (never replaced); issued {', '.join(issued) or 'none'}")
    return written
