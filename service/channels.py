"""A client's channel to the coordinator, TLS or plain text: light to import (grpc alone), for the tools that
only ask the coordinator something (`feddiff health`, `feddiff status`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc


def channel_to(
    address: str,
    tls_ca: str = "",
    tls_key: str = "",
    tls_cert: str = "",
    tls_server_name: str = "",
    options: Sequence[tuple[str, object]] = (),
) -> grpc.Channel:
    """A channel to the coordinator: TLS when a CA is given (mutual when also a key and certificate),
    otherwise plain text."""
    options = list(options)
    if not tls_ca:
        return grpc.insecure_channel(address, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes(),
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
    )
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return grpc.secure_channel(address, creds, options=options)
