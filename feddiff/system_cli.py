"""`feddiff coordinator` and `worker`, the processes of the federated system, and the tools around them:
`health`, `status` and `certs`, each tool's flags turned into its typed config at the edge (`flags.build`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from fedcore import settings
from fedcore.settings import ExistingFile, Folder, Seconds
from feddiff.args import OUT_DIR_OLD_SPELLINGS, Command, add_speed_flags
from service import flags, tls
from service.process_settings import HOST_NAME_WORDS, ConnectAddress, HostName, ServerName, TokenFile


def _setup_logging(verbose: bool = False) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _add_coordinator_flags(p: argparse.ArgumentParser) -> None:
    """The coordinator's flags (coordinator.config adds them)."""
    from coordinator import config

    config.add_arguments(p)


def coordinator(args: argparse.Namespace) -> int:
    """The coordinator, serving until its run ends (--exit-when-done) or it is stopped."""
    from coordinator.config import from_args
    from coordinator.server import serve
    from service.allocator import tune_for_streaming

    tune_for_streaming()
    _setup_logging()
    return serve(from_args(args))


def _add_worker_flags(p: argparse.ArgumentParser) -> None:
    """The worker's flags (worker.config adds them) and the speed flags."""
    from worker import config

    config.add_arguments(p)
    add_speed_flags(p)


def worker(args: argparse.Namespace) -> int:
    """A worker daemon, until the run ends (or it is stopped); with --nproc-per-node N, the launcher of its N
    ranks (`worker_rank` each); under torchrun, one of its ranks."""
    from worker.config import from_args
    from worker.launch import launch

    cfg = from_args(args)
    if cfg.ranks_per_node > 1:
        _setup_logging()
        return launch(cfg, worker_rank)
    return worker_rank(cfg)


def worker_rank(cfg) -> int:  # cfg: worker.config.WorkerConfig
    """One worker process, or one rank of a worker (spawned by `launch`, or by torchrun); a rank's uncaught
    error is written where the launcher reads it (torch's @record), so that it names it."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from service.allocator import tune_for_streaming
    from worker.launch import run_worker

    tune_for_streaming()
    _setup_logging()
    exit_code: int = record(run_worker)(cfg)  # type: ignore[assignment]  # record's wrapper keeps no return type
    return exit_code


@dataclass(frozen=True)
class ToolChannel:
    """How health and status reach a coordinator: its address, how long they wait for its answer, and TLS in
    the types of the worker's TLS settings (plain text without --tls-ca)."""

    __pydantic_config__ = settings.CONFIG

    address: ConnectAddress  # HOST:PORT of the coordinator
    timeout: Seconds = 5.0  # seconds to wait for the coordinator's answer
    insecure: bool = False  # plain text, said out loud (it is the default without --tls-ca)
    tls_ca: ExistingFile = ""
    tls_cert: ExistingFile = ""
    tls_key: ExistingFile = ""
    tls_server_name: ServerName = ""  # override the name checked in the coordinator's certificate

    def __post_init__(self) -> None:
        tls.check_tls_settings(tls.TOOL, cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca, insecure=self.insecure, server_name=self.tls_server_name)


TOOL_MEANING = {  # what the flags of ToolChannel mean; their types, ranges and defaults come from its fields
    "address": "the coordinator (--coordinator is the same flag)",
    "timeout": "seconds to wait for the coordinator's answer",
    "insecure": "plain text (the default without --tls-ca)",
    "tls_ca": "CA certificate the coordinator's certificate is checked against",
    "tls_cert": "a client certificate (mutual TLS), e.g. a worker's",
    "tls_key": "its private key",
    "tls_server_name": "name checked in the coordinator's certificate (default: the host of --address)",
}


def _add_tool_flags(p: argparse.ArgumentParser, cls: type[ToolChannel], meaning: dict[str, str]) -> None:
    """The flags of health or status (`cls`): how they reach a coordinator, and their own `meaning`."""
    flags.add_flags(p, cls, {**TOOL_MEANING, **meaning}, aliases={"address": ("--coordinator",)}, metavars={"address": "HOST:PORT"})


def _tool_channel(cfg: ToolChannel):  # -> grpc.Channel
    from service.channels import channel_to

    return channel_to(cfg.address, cfg.tls_ca, cfg.tls_key, cfg.tls_cert, cfg.tls_server_name)


@dataclass(frozen=True)
class HealthConfig(ToolChannel):
    """Every setting of `feddiff health`."""

    service: str = field(default="", metadata=flags.EMPTY_MEANS_SOMETHING)  # the service whose health is asked ('' = the server)


def _quiet_grpc() -> None:
    """gRPC's C core logs a failed TLS handshake on stderr at its info level: a tool says what failed in its own
    one line (`_failed_call`), so the core logs errors only, unless GRPC_VERBOSITY says otherwise. Read when
    grpc is first imported."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def _failed_call(cfg: ToolChannel, e) -> str:  # e: grpc.RpcError
    """The one line a tool prints when its call fails: the address, the status code and what it means, with a
    hint where the cause is likely (TLS against a plain-text port; a health or status service the server does not
    have)."""
    import grpc

    code, details = e.code(), (e.details() or "").strip()
    if code == grpc.StatusCode.UNAVAILABLE and cfg.tls_ca and "WRONG_VERSION_NUMBER" in details:
        return f"{cfg.address}: UNAVAILABLE: the TLS handshake failed (the server did not answer in TLS): if it serves plain text, give --insecure instead of --tls-ca"
    if code == grpc.StatusCode.UNAVAILABLE and "Failed parsing HTTP/2" in details:
        return f"{cfg.address}: UNAVAILABLE: the server there does not speak gRPC (an HTTP/1 server, such as a /metrics port?); give the coordinator's --listen address"
    if code == grpc.StatusCode.NOT_FOUND and isinstance(cfg, HealthConfig):
        return f"{cfg.address}: NOT_FOUND: the server has no health service {cfg.service!r} (leave out --service for the server's own)"
    if code == grpc.StatusCode.UNIMPLEMENTED and isinstance(cfg, StatusConfig):
        return f"{cfg.address}: UNIMPLEMENTED: the gRPC server there is not a feddiff coordinator (no status service); give the coordinator's --listen address"
    return f"{cfg.address}: {code.name}: {details or 'no details given'}"


def _add_health_flags(p: argparse.ArgumentParser) -> None:
    """health's flags: one per setting of HealthConfig."""
    _add_tool_flags(p, HealthConfig, {"service": "service name to check ('' = the server)"})


def health(args: argparse.Namespace) -> int:
    """0 when the coordinator's gRPC health service says SERVING, else 1."""
    _quiet_grpc()
    import grpc
    from grpc_health.v1 import health_pb2

    from service.health import health_check

    cfg = flags.build(HealthConfig, args)
    with _tool_channel(cfg) as channel:
        try:
            resp = health_check(channel)(health_pb2.HealthCheckRequest(service=cfg.service), timeout=cfg.timeout)
        except grpc.RpcError as e:
            print(_failed_call(cfg, e), file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{cfg.address}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


@dataclass(frozen=True)
class StatusConfig(ToolChannel):
    """Every setting of `feddiff status`."""

    json: bool = False  # one JSON object, for scripts
    token_file: TokenFile = ""  # the operator's status token (the coordinator's --status-token-file)


def _add_status_flags(p: argparse.ArgumentParser) -> None:
    """status's flags: one per setting of StatusConfig."""
    meaning = {"json": "one JSON object for scripts", "token_file": "file holding the operator's status token (the coordinator's --status-token-file)"}
    _add_tool_flags(p, StatusConfig, meaning)


def status(args: argparse.Namespace) -> int:
    """A coordinator's round, workers, bytes and reduction, as lines or (--json) one object."""
    _quiet_grpc()
    import grpc

    cfg = flags.build(StatusConfig, args)
    try:
        s = ask_status(cfg)
    except grpc.RpcError as e:
        print(_failed_call(cfg, e), file=sys.stderr)
        return 1
    if cfg.json:
        print(json.dumps({**status_dict(s), "bytes_vs_fp32_fedavg": _bytes_vs_fp32_fedavg(s)}))
    else:
        _print_status(s)
    return 0


def ask_status(cfg: StatusConfig):  # -> feddiff_pb2.StatusResponse
    """The coordinator's GetStatus, with the operator's token when --token-file names one; grpc.RpcError when
    it does not answer. `feddiff status` and the local cluster (feddiff/local.py) ask with it."""
    from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
    from fedcore.wire.proto.feddiff.v1 import feddiff_pb2_grpc as pb_grpc

    metadata: tuple[tuple[str, str], ...] = ()
    if cfg.token_file:
        try:
            metadata = (("authorization", f"Bearer {Path(cfg.token_file).read_text().strip()}"),)
        except OSError as e:  # readable when the setting was built, no more now
            raise ValueError(f"--token-file {cfg.token_file}: cannot read it ({e.strerror or e})") from None
    with _tool_channel(cfg) as channel:
        return pb_grpc.CoordinatorStub(channel).GetStatus(pb.StatusRequest(), timeout=cfg.timeout, metadata=metadata)


def status_dict(s) -> dict:  # s: feddiff_pb2.StatusResponse
    """A StatusResponse as a JSON object: every field by its name, those at their default too."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(s, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _bytes_vs_fp32_fedavg(s) -> float | None:  # s: feddiff_pb2.StatusResponse
    """How many times fewer bytes the run sent (both ways) than plain FedAvg in float32 (4 bytes for each of
    its parameters) would have; None before any byte was sent."""
    payload = s.payload_bytes_down + s.payload_bytes_up
    return 4 * s.full_fedavg_parameters / payload if payload else None


def _print_status(s) -> None:  # s: feddiff_pb2.StatusResponse
    """A StatusResponse as lines for a person."""
    codec = f", {s.compression}" if s.compression not in ("", "none") else ""  # empty from a coordinator that predates the field
    print(f"{s.state}: round {s.completed_rounds}/{s.rounds} ({s.strategy}, {s.model}{codec})")
    if s.error:
        print(f"  error: {s.error}")
    if s.round_selected:
        print(f"  current round: {s.round_done}/{s.round_selected} updates in")
    connected = s.workers_connected or sum(w.connected for w in s.workers)  # 0 from a coordinator that predates the field
    print(f"  workers: {connected} connected of {len(s.workers) + s.workers_omitted} known")
    for w in s.workers:
        gpu = f" {w.gpu_name}" if w.gpu_name else ""
        print(f"    {w.worker_id:<20} {'up' if w.connected else 'down':<5} {w.device}{gpu}, {w.num_examples} images, seen {w.last_seen_seconds_ago:.0f}s ago")
    if s.workers_omitted:
        print(f"    ... and {s.workers_omitted} more not listed (the least recently heard)")
    ratio = _bytes_vs_fp32_fedavg(s)
    fewer = f": {ratio:.1f}x fewer than plain FedAvg in float32 ({4 * s.full_fedavg_parameters / 1e6:.2f} MB)" if ratio else ""
    print(f"  bytes: {s.payload_bytes_down / 1e6:.2f} MB down, {s.payload_bytes_up / 1e6:.2f} MB up{fewer}")
    print(f"  parameters: {s.parameters_exchanged:,} exchanged, plain FedAvg {s.full_fedavg_parameters:,}: {s.reduction_vs_full:.1%} less")
    if s.run_id:  # empty from a coordinator that predates run ids
        print(f"  run: {s.run_id}")


def _certificate_holder(worker_id: str) -> str:
    """`worker_id` when it can name a worker's certificate and key files: a worker id, and neither the CA's
    files' name nor the coordinator's."""
    from fedcore.wire.bounds import WORKER_ID  # with torch: the one command that needs it imports it

    if WORKER_ID.problem(worker_id) is not None:
        raise ValueError(f"a worker id takes {WORKER_ID.describe()}")
    if worker_id in ("ca", "coordinator"):
        raise ValueError()  # the type's words say it all
    return worker_id


CertificateHolder = Annotated[str, AfterValidator(_certificate_holder), settings.Described("a worker id other than 'ca' and 'coordinator'")]
CertificateHolders = Annotated[tuple[CertificateHolder, ...], settings.Described("a worker id other than 'ca' and 'coordinator', each")]


@dataclass(frozen=True)
class CertsConfig:
    """Every setting of `feddiff certs`."""

    __pydantic_config__ = settings.CONFIG

    out_dir: Folder  # ca.crt/ca.key (reused when present) and the issued pairs
    coordinator_host: Annotated[
        tuple[HostName, ...], settings.Described(f"{HOST_NAME_WORDS}, each")
    ] = ()  # the DNS names and IPs the workers dial (localhost and 127.0.0.1 always)
    worker: CertificateHolders = ()  # one certificate each, its common name the worker id


CERTS_MEANING = {
    "out_dir": "folder for ca.crt/ca.key (reused when present) and the issued pairs",
    "coordinator_host": "DNS name or IP the workers dial (repeatable)",
    "worker": "a worker to issue a certificate for, its id the common name (repeatable)",
}


def _add_certs_flags(p: argparse.ArgumentParser) -> None:
    """certs' flags: one per setting of CertsConfig, --coordinator-host and --worker repeatable."""
    repeatable = {"coordinator_host": "HOST", "worker": "ID"}
    flags.add_flags(p, CertsConfig, CERTS_MEANING, skip=repeatable, metavars={"out_dir": "DIR"}, old=OUT_DIR_OLD_SPELLINGS)
    for name, tp, default in flags.settings_of(CertsConfig):
        if name in repeatable:
            flags.add_flag(p, name, tp, default, CERTS_MEANING[name], action="append", metavar=repeatable[name])


def certs(args: argparse.Namespace) -> int:
    """A project CA, the coordinator's certificate and one per worker; the paths written, one a line."""
    from feddiff.certs import create_project

    cfg = flags.build(CertsConfig, args)
    for path in create_project(Path(cfg.out_dir), cfg.coordinator_host, cfg.worker):
        print(path)
    return 0


COMMANDS = {
    "coordinator": Command(_add_coordinator_flags, coordinator),
    "worker": Command(_add_worker_flags, worker),
    "health": Command(_add_health_flags, health),
    "status": Command(_add_status_flags, status),
    "certs": Command(_add_certs_flags, certs),
}
