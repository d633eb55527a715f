"""TLS files checked at start: a certificate, key or CA that is not one (or a key that is not the
certificate's) is refused naming its flag, where gRPC would fail later with words that name neither (a
server "cannot listen", a client retrying a "security handshaker" for ever)."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes


def _certificates(flag: str, path: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(Path(path).read_bytes())
    except ValueError:
        raise ValueError(f"{flag} {path}: not a PEM certificate") from None


def _key(flag: str, path: str) -> CertificateIssuerPrivateKeyTypes:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
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
