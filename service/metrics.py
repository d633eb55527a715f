"""The Prometheus metrics both processes keep: communication volume by direction and part, updates and joins by
outcome, Frechet distances, and the HTTP endpoint that serves them. Each process adds its own
(coordinator/metrics.py, worker/metrics.py).

Counters (`*_total`) count what this process did since it started, and restart at zero with it, as
Prometheus's rate() and increase() expect."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from fedcore.model.parts import FLOAT32_BYTES, PART_ORDER
from service import ports

if TYPE_CHECKING:
    from fedcore.federation.engine import Direction
    from fedcore.federation.totals import Ledger


class ProcessMetrics:
    """The metrics both processes keep, in their own registry (a fresh one per test, the process's one in a server)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.payload_bytes = Counter("feddiff_payload_bytes", "Safetensors payload bytes exchanged", ["direction", "part"], registry=r)
        self.wire_bytes = Counter("feddiff_wire_bytes", "Bytes of weight-stream messages sent or received", ["direction"], registry=r)
        self.parameters = Counter("feddiff_parameters", "Parameters (float32 values) exchanged", ["direction", "part"], registry=r)
        self.full_fedavg_parameters = Counter(
            "feddiff_full_fedavg_parameters",
            "Parameters plain FedAvg would have exchanged for the same rounds and participants",
            registry=r,
        )
        # What the payloads stand for in float32 (4 bytes per parameter), beside the bytes they took: a codec's
        # reduction is feddiff_payload_bytes_total / feddiff_payload_fp32_bytes_total, and against plain FedAvg
        # in float32 sum(feddiff_payload_bytes_total) / feddiff_full_fedavg_fp32_bytes_total
        self.payload_fp32_bytes = Counter(
            "feddiff_payload_fp32_bytes", "Bytes the parameters of the payloads exchanged take as float32 (4 per parameter)", ["direction", "part"], registry=r
        )
        self.full_fedavg_fp32_bytes = Counter(
            "feddiff_full_fedavg_fp32_bytes", "Bytes plain FedAvg in float32 would have exchanged for the same rounds and participants", registry=r
        )
        self.updates = Counter("feddiff_updates", "Updates by outcome (accepted, late, or the refusal reason)", ["outcome"], registry=r)
        self.joins = Counter("feddiff_joins", "Joins by outcome (accepted, or the refusal reason)", ["outcome"], registry=r)
        self.fd = Gauge("feddiff_fd", "Frechet distance of a model's samples to real images", ["model"], registry=r)
        for p in PART_ORDER:  # export zeros so dashboards and recording rules see every series from the start
            for d in ("down", "up"):
                self.payload_bytes.labels(d, p.value)
                self.payload_fp32_bytes.labels(d, p.value)
                self.parameters.labels(d, p.value)
        for d in ("down", "up"):
            self.wire_bytes.labels(d)
        for outcome in ("accepted", "bad_worker_info", "unauthenticated", "duplicate_worker"):
            self.joins.labels(outcome)

    def count_transfer(self, direction: Direction, transfer: Ledger) -> None:
        """Count one payload sent or received, as `fedcore.federation.engine.transfer_ledger` accounts it."""
        down = direction == "down"
        parameters = transfer.traffic.down if down else transfer.traffic.up
        payload_bytes = transfer.bytes_down if down else transfer.bytes_up
        full_fedavg = transfer.full_fedavg
        for p in PART_ORDER:
            if parameters.get(p):
                self.parameters.labels(direction, p.value).inc(parameters[p])
                self.payload_fp32_bytes.labels(direction, p.value).inc(FLOAT32_BYTES * parameters[p])
            if payload_bytes.get(p):
                self.payload_bytes.labels(direction, p.value).inc(payload_bytes[p])
        self.full_fedavg_parameters.inc(full_fedavg)
        self.full_fedavg_fp32_bytes.inc(FLOAT32_BYTES * full_fedavg)

    def serve(self, port: int, addr: str = "0.0.0.0", flag: str = "--metrics-port") -> int:
        """Expose /metrics over HTTP; returns the bound port (port 0 picks a free one). CannotListen, naming
        `flag`, when the port is taken."""
        try:
            server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise ports.refusal(flag, f"{addr}:{port}", e) from None
        return int(server.server_port)
