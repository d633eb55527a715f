"""The standard gRPC health check, grpc.health.v1.Health/Check, as a caller makes it (`feddiff health`, probes)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2


def health_check(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]:
    """The Check call over `channel`, as grpc_health's HealthStub makes it (whose stubs declare no methods)."""
    return channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
