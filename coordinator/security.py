"""Transport security of the coordinator: TLS, mutual TLS, or explicit plain text."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from coordinator.config import CoordinatorConfig

log = logging.getLogger("feddiff.coordinator")


def server_credentials(cfg: CoordinatorConfig) -> grpc.ServerCredentials | None:
    """TLS credentials (mutual when a CA is given), or None for plain text, which needs `insecure`."""
    if cfg.tls_cert and cfg.tls_key:
        key = Path(cfg.tls_key).read_bytes()
        cert = Path(cfg.tls_cert).read_bytes()
        ca = Path(cfg.tls_ca).read_bytes() if cfg.tls_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
    if not cfg.insecure:
        raise ValueError("no TLS certificate given: pass --tls-cert/--tls-key (and --tls-ca for mutual TLS), or --insecure for plain text")
    log.warning("serving plain-text gRPC (--insecure): traffic and worker identities are not protected")
    return None
