"""TLS settings checked at start, one way for every process that takes them (the coordinator, a worker, and
`feddiff health` and `status`): flags that go together given together, and a certificate, key or CA that is not
one (or a key that is not the certificate's) refused naming its flag and file, where gRPC would fail later with
words that name neither (a server "cannot listen", a client retrying a "security handshaker" for ever)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes


@dataclass(frozen=True)
class TlsRole:
    """Which end of a connection the TLS flags set up, and the words a refusal uses for it."""

    server: bool  # the coordinator: --tls-cert is its own certificate, --tls-ca checks its clients
    pair: str  # what --tls-cert and --tls-key are, said when one comes without the other
    neither: str = ""  # what giving neither takes (a server: --insecure)
    without_ca: str = ""  # what a client is without --tls-ca, said when a flag needs it


COORDINATOR = TlsRole(server=True, pair="the coordinator's certificate and its key", neither=" with --insecure")
WORKER = TlsRole(server=False, pair="this worker's certificate and its key")
TOOL = TlsRole(server=False, pair="a client certificate and its key", without_ca=" (without it: plain text)")


def check_tls_settings(role: TlsRole, *, cert: str, key: str, ca: str, insecure: bool, server_name: str = "") -> None:
    """ValueError, one line naming the flags, when the TLS settings (empty: not given) do not go together, or
    when a given file is not what its flag says (`check_tls_files`). A server's --tls-ca (mutual TLS) needs its
    own certificate; a client's certificate and --tls-server-name need the --tls-ca its server is checked
    against, and --insecure (plain text) contradicts that CA."""
    if bool(cert) != bool(key):
        raise ValueError(f"--tls-cert and --tls-key go together: give both ({role.pair}), or neither{role.neither}")
    if role.server and ca and not cert:
        raise ValueError("--tls-ca (mutual TLS) needs the coordinator's own --tls-cert and --tls-key")
    if not role.server and insecure and ca:
        raise ValueError("--insecure and --tls-ca: give one, plain text or TLS checked against this CA")
    if not role.server and (cert or server_name) and not ca:
        flag = "--tls-cert" if cert else "--tls-server-name"
        raise ValueError(f"{flag} needs --tls-ca, the CA the coordinator's certificate is checked against{role.without_ca}")
    check_tls_files(cert, key, ca)


def _certificates(flag: str, path: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(Path(path).read_bytes())
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    except ValueError:
        raise ValueError(f"{flag} {path}: not a PEM certificate") from None


def _key(flag: str, path: str) -> CertificateIssuerPrivateKeyTypes:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, TypeError) as e:  # TypeError: a key that needs a password
        raise ValueError(f"{flag} {path}: not an unencrypted PEM private key ({e})") from None
    return key  # type: ignore[return-value]  # every key type gRPC takes is one a certificate is issued for


def check_tls_files(cert: str, key: str, ca: str, *, cert_flag: str = "--tls-cert", key_flag: str = "--tls-key", ca_flag: str = "--tls-ca") -> None:
    """ValueError naming the flag when a given file (empty: not given) is not what it should be: the
    certificate and the CA PEM certificates, the key an unencrypted PEM private key whose public half is the
    certificate's."""
    if ca:
        _certificates(ca_flag, ca)
    if cert and key:
        certificate = _certificates(cert_flag, cert)[0]
        private = _key(key_flag, key)
        if private.public_key() != certificate.public_key():
            raise ValueError(f"{key_flag} {key}: not the key of the certificate in {cert_flag} {cert}")
