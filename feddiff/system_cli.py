"""`feddiff coordinator` and `worker`, the processes of the federated system, and the tools around them:
`health`, `status` and `certs`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from feddiff.args import Command, add_speed_flags

TOOL_TIMEOUT = 5.0  # seconds health and status wait for the coordinator's answer


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


def _add_tool_flags(p: argparse.ArgumentParser) -> None:
    """How health and status reach a coordinator."""
    p.add_argument("--address", "--coordinator", dest="address", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--timeout", type=float, default=TOOL_TIMEOUT, help="seconds to wait for the coordinator's answer: default %(default)s")
    p.add_argument("--insecure", action="store_true", help="plain text (the default without --tls-ca)")
    p.add_argument("--tls-ca", default="", help="CA certificate the coordinator's certificate is checked against (TLS)")
    p.add_argument("--tls-cert", default="", help="a client certificate, for a coordinator that asks for one (mutual TLS)")
    p.add_argument("--tls-key", default="", help="its private key")
    p.add_argument("--tls-server-name", default="", help="name checked in the coordinator's certificate (default: the host of --address)")


def _tool_channel(args: argparse.Namespace):  # -> grpc.Channel
    from service.channels import channel_to

    return channel_to(args.address, args.tls_ca, args.tls_key, args.tls_cert, args.tls_server_name)


def _add_health_flags(p: argparse.ArgumentParser) -> None:
    """health's flags."""
    _add_tool_flags(p)
    p.add_argument("--service", default="", help="service name to check ('' = the server)")


def health(args: argparse.Namespace) -> int:
    """0 when the coordinator's gRPC health service says SERVING, else 1."""
    import grpc
    from grpc_health.v1 import health_pb2

    from service.health import health_check

    with _tool_channel(args) as channel:
        try:
            resp = health_check(channel)(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{args.address}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def _add_status_flags(p: argparse.ArgumentParser) -> None:
    """status's flags."""
    _add_tool_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object for scripts")
    p.add_argument("--token-file", default="", help="file holding the operator's status token (the coordinator's --status-token-file)")


def status(args: argparse.Namespace) -> int:
    """A coordinator's round, workers, bytes and reduction, as lines or (--json) one object."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
    from fedcore.wire.proto.feddiff.v1 import feddiff_pb2_grpc as pb_grpc

    metadata: tuple[tuple[str, str], ...] = ()
    if args.token_file:
        try:
            metadata = (("authorization", f"Bearer {Path(args.token_file).read_text().strip()}"),)
        except OSError as e:
            print(f"feddiff status: error: --token-file {args.token_file}: cannot read it ({e.strerror or e})", file=sys.stderr)
            return 2
    with _tool_channel(args) as channel:
        try:
            s = pb_grpc.CoordinatorStub(channel).GetStatus(pb.StatusRequest(), timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as e:
            print(f"{args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        reply = MessageToDict(s, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        print(json.dumps({**reply, "bytes_vs_fp32_fedavg": _bytes_vs_fp32_fedavg(s)}))
    else:
        _print_status(s)
    return 0


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


def _add_certs_flags(p: argparse.ArgumentParser) -> None:
    """certs' flags."""
    p.add_argument("--out", required=True, help="folder for ca.crt/ca.key (reused when present) and the issued pairs")
    p.add_argument("--coordinator-host", action="append", default=[], help="DNS name or IP the workers dial (repeatable)")
    p.add_argument("--worker", action="append", default=[], help="a worker id: its certificate's common name (repeatable)")


def certs(args: argparse.Namespace) -> int:
    """A project CA, the coordinator's certificate and one per worker; the paths written, one a line."""
    from pathlib import Path

    from fedcore.wire.convert import valid_worker_id
    from feddiff.certs import create_project

    bad = [w for w in args.worker if not valid_worker_id(w) or w in ("ca", "coordinator")]
    if bad:
        raise ValueError(f"worker ids {bad} must be letters, digits, '-', '_' or '.', and not 'ca' or 'coordinator'")
    for path in create_project(Path(args.out), args.coordinator_host, args.worker):
        print(path)
    return 0


COMMANDS = {
    "coordinator": Command(_add_coordinator_flags, coordinator),
    "worker": Command(_add_worker_flags, worker),
    "health": Command(_add_health_flags, health),
    "status": Command(_add_status_flags, status),
    "certs": Command(_add_certs_flags, certs),
}
