"""A gRPC health prober in a process of its own: `python -m tests.reliability.health_probe ADDRESS EVERY_S`
asks the health service every EVERY_S seconds and prints each answer's latency in seconds (or "fail" and the
status code) on a line, until it is terminated. A process of its own, so that the test's clients do not delay
its calls."""

from __future__ import annotations

import signal
import sys
import time

import grpc
from grpc_health.v1 import health_pb2

from service.health import health_check

TIMEOUT = 2.0  # seconds one check may take before it counts as failed


def main() -> int:
    address, every = sys.argv[1], float(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with grpc.insecure_channel(address) as channel:
        check = health_check(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        while True:
            start = time.perf_counter()
            try:
                reply = check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
                line = f"{time.perf_counter() - start:.6f}" if reply.status == health_pb2.HealthCheckResponse.SERVING else "fail NOT_SERVING"
            except grpc.RpcError as e:
                line = f"fail {e.code().name}"
            print(line, flush=True)
            time.sleep(every)


if __name__ == "__main__":
    raise SystemExit(main())
