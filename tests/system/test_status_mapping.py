"""Every RPC's refusals go through the one mapping of domain errors to status codes (coordinator/status.py):
a call on an ended or unknown session is UNAUTHENTICATED, never UNKNOWN, and leaves no traceback in the
coordinator's log. The RPCs are read from the service descriptor, so an RPC added later is covered."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator
from coordinator.servicer import SERVICE
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2_grpc as pb_grpc

# RPCs whose request carries no session, with the reason. A new RPC without a session fails
# test_every_rpc_is_classified until it is added here.
SESSIONLESS = {
    "Join": "it creates the session; its identity refusals are checked in test_a_join_with_a_wrong_token_is_unauthenticated",
    "GetStatus": "public progress for tools (`feddiff status`)",
}
TOKENS = {"w": "token-of-w"}


def _session_field(message: Descriptor, seen: frozenset[str] = frozenset()) -> list[str] | None:
    """The field names that lead from `message` to its `session_id` (through nested messages), or None."""
    if "session_id" in message.fields_by_name:
        return ["session_id"]
    for field in message.fields:
        nested = field.message_type
        if nested is not None and nested.full_name not in seen:
            path = _session_field(nested, seen | {message.full_name})
            if path is not None:
                return [field.name, *path]
    return None


def _request(method: MethodDescriptor, session_id: str) -> Message:
    """The method's request message with only its session id set."""
    path = _session_field(method.input_type)
    assert path is not None, method.name
    request = getattr(pb, method.input_type.name)()
    target = request
    for name in path[:-1]:
        target = getattr(target, name)
    setattr(target, path[-1], session_id)
    return request


def _call(channel: grpc.Channel, method: MethodDescriptor, request: Message, metadata: tuple[tuple[str, str], ...]) -> None:
    """Call `method` as a generic client does (one request message; a response stream read to its end)."""
    kind: dict[tuple[bool, bool], Callable[..., Callable[..., Any]]] = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    stub = kind[method.client_streaming, method.server_streaming](
        f"/{SERVICE.full_name}/{method.name}",
        request_serializer=type(request).SerializeToString,
        response_deserializer=getattr(pb, method.output_type.name).FromString,
    )
    answer = stub(iter([request]) if method.client_streaming else request, timeout=10, metadata=metadata)
    if method.server_streaming:
        list(answer)


def _coordinator(tmp_path: Path, tokens: bool) -> Coordinator:
    settings: dict[str, Any] = {}
    if tokens:
        path = tmp_path / "tokens.json"
        path.write_text(json.dumps(TOKENS))
        settings["tokens_file"] = str(path)
    cfg = CoordinatorConfig(
        model="tiny", rounds=1, min_workers=2, listen="localhost:0", metrics_port=-1, insecure=True, progress="off",
        checkpoint_dir=str(tmp_path / "ckpt"), **settings,
    )  # fmt: skip
    return Coordinator(cfg, Metrics()).start()


def _join(stub: pb_grpc.CoordinatorStub, metadata: tuple[tuple[str, str], ...], installation: str, instance: str) -> str:
    info = pb.WorkerInfo(worker_id="w", device="cpu", num_examples=10, installation_id=installation, instance_id=instance)
    return stub.Join(pb.JoinRequest(worker=info), timeout=10, metadata=metadata).session_id


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


Served = tuple[Coordinator, grpc.Channel, tuple[tuple[str, str], ...]]


@pytest.fixture(params=["insecure", "tokens"])
def served(request: pytest.FixtureRequest, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Served]:
    """A coordinator (plain, or with worker tokens) and a channel to it; the metadata carries w's token."""
    caplog.set_level(logging.DEBUG)
    tokens = request.param == "tokens"
    coord = _coordinator(tmp_path, tokens)
    metadata = (("authorization", f"Bearer {TOKENS['w']}"),) if tokens else ()
    try:
        with grpc.insecure_channel(coord.address) as channel:
            yield coord, channel, metadata
    finally:
        coord.stop(grace=0)


def _counted(coord: Coordinator, rpc: str, outcome: str) -> float:
    """A refusal as the metrics count it: uploads by outcome, the other calls by RPC and outcome."""
    if rpc == "UploadUpdate":
        return coord.metrics.registry.get_sample_value("feddiff_updates_total", {"outcome": outcome}) or 0.0
    return coord.metrics.registry.get_sample_value("feddiff_refusals_total", {"rpc": rpc, "outcome": outcome}) or 0.0


def test_every_rpc_is_classified() -> None:
    with_session = {m.name for m in SERVICE.methods if _session_field(m.input_type) is not None}
    assert {m.name for m in SERVICE.methods} - with_session == set(SESSIONLESS)


def _dead_sessions(stub: pb_grpc.CoordinatorStub, metadata: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Sessions that are no longer valid: never issued, ended by Leave, ended by a restart of the worker."""
    left = _join(stub, metadata, "a" * 32, "1")
    stub.Leave(pb.LeaveRequest(session_id=left), timeout=10, metadata=metadata)
    replaced = _join(stub, metadata, "a" * 32, "2")
    _join(stub, metadata, "a" * 32, "3")  # the same installation again: replaced's process restarted
    return {"unknown": secrets.token_hex(16), "left": left, "replaced": replaced}


@pytest.mark.parametrize("method", [m for m in SERVICE.methods if m.name not in SESSIONLESS], ids=lambda m: m.name)
def test_every_rpc_on_a_dead_session_is_unauthenticated_counted_and_without_a_traceback(
    method: MethodDescriptor, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    coord, channel, metadata = served
    dead = _dead_sessions(pb_grpc.CoordinatorStub(channel), metadata)
    for how, session in dead.items():
        with pytest.raises(grpc.RpcError) as e:
            _call(channel, method, _request(method, session), metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (how, e.value.code(), e.value.details())
        assert (e.value.details() or "").startswith("unauthenticated: "), e.value.details()
    assert _counted(coord, method.name, "unauthenticated") == len(dead)
    assert _tracebacks(caplog) == []


@pytest.mark.parametrize("end", ["restart", "leave"])
def test_a_long_poll_whose_session_ends_meanwhile_is_unauthenticated_without_a_traceback(end: str, served: Served, caplog: pytest.LogCaptureFixture) -> None:
    coord, channel, metadata = served
    stub = pb_grpc.CoordinatorStub(channel)
    session = _join(stub, metadata, "a" * 32, "1")
    # The poll would wait 60 s: it ends when its session does, not at its timeout
    poll = stub.WaitTask.future(pb.WaitTaskRequest(session_id=session, timeout_ms=60_000), timeout=90, metadata=metadata)
    time.sleep(0.2)  # the poll is waiting
    assert not poll.done(), "the poll was waiting when its session ended"
    ended = time.monotonic()
    if end == "restart":
        _join(stub, metadata, "a" * 32, "2")
    else:
        stub.Leave(pb.LeaveRequest(session_id=session), timeout=10, metadata=metadata)

    error = poll.exception(timeout=20)
    assert time.monotonic() - ended < 10, "the poll was answered when its session ended, not at its timeout"
    assert isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    assert _counted(coord, "WaitTask", "unauthenticated") == 1
    assert _tracebacks(caplog) == []


def test_a_join_with_a_wrong_token_is_unauthenticated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    coord = _coordinator(tmp_path, tokens=True)
    try:
        with grpc.insecure_channel(coord.address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            for metadata in [(), (("authorization", "Bearer not-a-token"),)]:
                with pytest.raises(grpc.RpcError) as e:
                    _join(stub, metadata, "a" * 32, "1")
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert coord.metrics.registry.get_sample_value("feddiff_joins_total", {"outcome": "unauthenticated"}) == 2
    finally:
        coord.stop(grace=0)
    assert _tracebacks(caplog) == []
