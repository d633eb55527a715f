"""Workers waiting for a task hold no server thread: with more long polls pending than the synchronous
server's pool had threads (256), the coordinator still answers health checks and status at once."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2_grpc as pb_grpc
from service.health import health_check

WAITING = 300
CONNECTIONS = 10  # the coordinator serves 100 calls per connection at once (max_streams_per_connection)


def test_hundreds_of_long_polls_leave_the_coordinator_responsive(tmp_path: Path) -> None:
    cfg = CoordinatorConfig(
        model="tiny",
        rounds=1,
        min_workers=WAITING + 1,
        listen="localhost:0",
        metrics_port=-1,
        insecure=True,
        progress="off",
        checkpoint_dir=str(tmp_path / "ckpt"),
    )  # fmt: skip  (one worker short of a round: every poll waits until its timeout)
    coord = Coordinator(cfg, Metrics()).start()
    try:
        channels = [grpc.insecure_channel(coord.address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CONNECTIONS)]
        with contextlib.ExitStack() as stack, grpc.insecure_channel(coord.address) as channel:
            for c in channels:
                stack.enter_context(c)
            stub = pb_grpc.CoordinatorStub(channel)
            sessions = [
                stub.Join(pb.JoinRequest(worker=pb.WorkerInfo(worker_id=f"w{i:03d}", device="cpu", num_examples=10)), timeout=10).session_id
                for i in range(WAITING)
            ]
            stubs = [pb_grpc.CoordinatorStub(c) for c in channels]
            polls = [stubs[i % CONNECTIONS].WaitTask.future(pb.WaitTaskRequest(session_id=s, timeout_ms=4000), timeout=30) for i, s in enumerate(sessions)]
            time.sleep(0.5)
            assert not any(p.done() for p in polls)

            start = time.monotonic()
            health = health_check(channel)(health_pb2.HealthCheckRequest(service=""), timeout=5)
            status = stub.GetStatus(pb.StatusRequest(), timeout=5)
            answered = time.monotonic() - start

            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert status.state == "waiting_for_workers" and len(status.workers) == WAITING
            assert answered < 1.0, f"health and status took {answered:.2f} s beside {WAITING} long polls"
            assert not any(p.done() for p in polls)  # still waiting while the others were answered
            assert [p.result().WhichOneof("outcome") for p in polls] == ["idle"] * WAITING
    finally:
        coord.stop(grace=0)
