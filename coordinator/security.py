"""Transport security and worker identity: TLS, mutual TLS (identity = certificate common name), per-worker
tokens, or explicit plain text."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import grpc
import yaml

from coordinator.config import CoordinatorConfig
from fedcore.errors import UnknownWorker
from fedcore.wire.bounds import WORKER_ID
from service import flags

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


def load_tokens(path: str | Path) -> dict[str, str]:
    """worker id -> token, from a YAML or JSON mapping."""
    try:
        raw = flags.load_yaml(Path(path).read_text())  # JSON is YAML
    except yaml.YAMLError as e:
        raise ValueError(f"--tokens-file {path}: not valid YAML or JSON: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in raw.items()):
        raise ValueError(f"--tokens-file {path}: expected a mapping of worker id to a non-empty token")
    bad = next((k for k in raw if WORKER_ID.problem(k)), None)
    if bad is not None:
        raise ValueError(f"--tokens-file {path}: {bad[:40]!r} is no worker id ({WORKER_ID.describe()}): no worker could join with it")
    owners: dict[str, str] = {}
    for worker_id, token in raw.items():
        if owners.setdefault(token, worker_id) != worker_id:  # its holder could join as either worker
            raise ValueError(f"--tokens-file {path}: workers {owners[token]!r} and {worker_id!r} have the same token; each needs its own")
    return raw


def load_status_token(path: str | Path, worker_tokens: dict[str, str]) -> str:
    """The operator's GetStatus token: the file's text, stripped; ValueError when it is empty or a worker's."""
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"--status-token-file {path}: the file is empty")
    if token in worker_tokens.values():
        raise ValueError(f"--status-token-file {path}: it is the token of a worker in --tokens-file; the operator's must be its own")
    return token


def bearer_token(context: grpc.aio.ServicerContext) -> str:
    """The token a call carries (`authorization: Bearer ...`), or ""."""
    presented = ""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            presented = value[len("Bearer ") :]
    return presented


class Authenticator:
    """Who is calling: the common name of the client certificate (mutual TLS), else the worker whose token
    the call carries (`authorization: Bearer ...`), else nobody can tell (plain text or one-way TLS). And who
    may read the run's status (`check_status`)."""

    def __init__(self, cfg: CoordinatorConfig):
        self.mutual_tls = bool(cfg.tls_ca and cfg.tls_cert)
        self.tokens = load_tokens(cfg.tokens_file) if cfg.tokens_file else {}
        self.status_token = load_status_token(cfg.status_token_file, self.tokens) if cfg.status_token_file else ""

    def warn_of_gaps(self) -> None:
        """Log what this coordinator cannot verify: called once it starts, after every check at start passed."""
        if not self.mutual_tls and not self.tokens:
            log.warning("worker identities are not verified (no mutual TLS, no --tokens-file): any caller may claim any worker id")
        if self.tokens and not self.mutual_tls and not self.status_token:
            log.warning("GetStatus (feddiff status) is refused to every caller: --tokens-file without --status-token-file")

    def check_status(self, context: grpc.aio.ServicerContext) -> None:
        """GetStatus lists the workers: with a status token it needs that token; with worker tokens and no mutual
        TLS it needs one (a worker's token does not do: workers are not trusted); otherwise anyone connected
        may ask (with mutual TLS, only holders of a certificate of the run's CA connect). UnknownWorker if not."""
        if self.status_token:
            if not hmac.compare_digest(bearer_token(context).encode(), self.status_token.encode()):
                raise UnknownWorker("GetStatus needs the operator's status token (--status-token-file) in the call's metadata")
        elif self.tokens and not self.mutual_tls:
            raise UnknownWorker("GetStatus needs the operator's status token: this coordinator verifies callers by token and has no --status-token-file")

    def identity(self, context: grpc.aio.ServicerContext) -> str | None:
        """The verified identity of the caller; UnknownWorker when verification is on and fails."""
        if self.mutual_tls:
            names = list(context.auth_context().get("x509_common_name") or [])
            if not names:
                raise UnknownWorker("the client certificate carries no common name")
            return names[0].decode()
        if self.tokens:
            presented = bearer_token(context)
            found = None
            for worker_id, token in self.tokens.items():  # compare against every token: no timing hint
                if hmac.compare_digest(token.encode(), presented.encode()):
                    found = worker_id
            if found is None:
                raise UnknownWorker("no valid worker token in the call's metadata")
            return found
        return None

    def check(self, context: grpc.aio.ServicerContext, claimed: str) -> None:
        """The caller must be `claimed` whenever identities are verified."""
        verified = self.identity(context)
        if verified is not None and verified != claimed:
            raise UnknownWorker(f"caller is {verified!r}, not worker {claimed!r}")
