"""Tests for fedcore.wire.bounds: every string and number of the contract has a bound, the .proto states it,
and a message outside one is refused naming the field."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import cast

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from fedcore.errors import FieldOutOfRange, shortened
from fedcore.wire import bounds
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from fedcore.wire.stream import DEFAULT_CHUNK_SIZE, FRAMING_BYTES, MAX_CHUNK_SIZE, MAX_MESSAGE_BYTES, MIN_CHUNK_SIZE, request_limit

PROTO = Path(__file__).resolve().parents[3] / "proto" / "feddiff" / "v1" / "feddiff.proto"


def _fields() -> list[tuple[str, FieldDescriptor]]:
    out = []
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            out.append((f"{message.name}.{field.name}", field))
    return out


_BOUNDED_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT,
        FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64,
    }
)  # fmt: skip


def _needs_bound(field: FieldDescriptor) -> bool:
    """Strings, bytes, numbers and repeated fields (maps too) carry a bound; booleans, enums and single
    messages do not (a message's own fields do)."""
    return field.is_repeated or field.type in _BOUNDED_TYPES


def _documentation(message: str, field: str) -> str:
    """The comment on a field's line of the .proto and the comment lines right above it, in its message."""
    lines = PROTO.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\s*message {message} \{{", line))
    at = next(i for i in range(start, len(lines)) if re.search(rf"\s{field} = \d+;", lines[i]))
    above: list[str] = []
    for line in reversed(lines[start + 1 : at]):
        if not line.strip().startswith("//"):
            break
        above.insert(0, line.strip()[2:].strip())
    trailing = lines[at].split("//", 1)[1].strip() if "//" in lines[at] else ""
    return " ".join([*above, trailing])


def test_every_string_bytes_number_and_repeated_field_has_a_bound() -> None:
    missing = [name for name, field in _fields() if _needs_bound(field) and name not in bounds.BOUNDS]
    unknown = sorted(set(bounds.BOUNDS) - {name for name, _ in _fields()})

    assert missing == [], "give these fields a bound in fedcore/bounds.py and the .proto"
    assert unknown == []


@pytest.mark.parametrize("name", sorted(bounds.BOUNDS))
def test_the_proto_states_each_bound_beside_its_field(name: str) -> None:
    message, field = name.split(".")

    assert f"bound: {bounds.BOUNDS[name].describe()}" in _documentation(message, field)


def test_a_well_formed_message_passes() -> None:
    info = pb.WorkerInfo(worker_id="hospital-3", device="cuda", gpu_name="NVIDIA H200", num_examples=6000, digests=["blake3"], installation_id="ab12")
    header = pb.UpdateHeader(
        session_id="0f" * 16,
        stream=pb.StreamHeader(round=2, task_id="r2.1-hospital-3", parts=["decoder"], total_bytes=10, sha256="a" * 64, format_version=1),
        report=pb.TrainReport(images_seen=30000, mean_loss=0.04, seconds=12.5),
    )

    bounds.check(pb.JoinRequest(worker=info), FieldOutOfRange)
    bounds.check(header, FieldOutOfRange)


def test_a_session_id_is_left_to_the_lookup_whatever_its_length() -> None:
    bounds.check(pb.HeartbeatRequest(session_id="s" * 10_000), FieldOutOfRange)
    bounds.check(pb.UpdateHeader(session_id="\N{MICROBE}" * 100, report=pb.TrainReport(images_seen=1)), FieldOutOfRange)


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (
            pb.JoinRequest(worker=pb.WorkerInfo(worker_id="w", num_examples=1, device="x" * 1_000_000)),
            "WorkerInfo.device has 1000000 characters: expected 0..64 printable",
        ),
        (pb.JoinRequest(worker=pb.WorkerInfo(worker_id="w", num_examples=1, gpu_name="H200\nfake log line")), "WorkerInfo.gpu_name holds a control character"),
        (pb.JoinRequest(worker=pb.WorkerInfo(worker_id="w", num_examples=10**12)), "WorkerInfo.num_examples is 1000000000000: expected 1..2^32-1"),
        (pb.JoinRequest(worker=pb.WorkerInfo(worker_id="w", num_examples=2**64 - 1)), "WorkerInfo.num_examples is 18446744073709551615"),
        (pb.JoinRequest(worker=pb.WorkerInfo(worker_id="w", num_examples=0)), "WorkerInfo.num_examples is 0"),
        (pb.JoinRequest(worker=pb.WorkerInfo(worker_id="../etc", num_examples=1)), "WorkerInfo.worker_id is '../etc'"),
        (pb.JoinRequest(worker=pb.WorkerInfo(worker_id="h\u00f4pital", num_examples=1)), "WorkerInfo.worker_id is 'h\u00f4pital'"),
        (pb.JoinRequest(worker=pb.WorkerInfo(worker_id="w", num_examples=1, instance_id="i" * 129)), "WorkerInfo.instance_id has 129 characters"),
        (pb.JoinRequest(worker=pb.WorkerInfo(worker_id="w", num_examples=1, digests=["blake3"] * 9)), "WorkerInfo.digests has 9 entries: expected at most 8"),
        (pb.UpdateHeader(report=pb.TrainReport(images_seen=1, mean_loss=math.nan)), "TrainReport.mean_loss is nan: expected finite, [0, 3.40282e+38]"),
        (pb.UpdateHeader(report=pb.TrainReport(images_seen=1, mean_loss=1e300)), "TrainReport.mean_loss is 1e+300"),
        (pb.UpdateHeader(stream=pb.StreamHeader(task_id="r" * 10_000, total_bytes=1, format_version=1)), "StreamHeader.task_id has 10000 characters"),
        (pb.UpdateHeader(stream=pb.StreamHeader(task_id="t", total_bytes=1, format_version=1, parts=["decoder"] * 4)), "StreamHeader.parts has 4 entries"),
        (pb.RejectTaskRequest(task_id="t", message="m" * 5000), "RejectTaskRequest.message has 5000 characters: expected 0..4096"),
        (pb.EvaluationReport(task_id="t", frechet_distance=-1.0), "EvaluationReport.frechet_distance is -1.0"),
        (pb.StatusResponse(state="done", strategy="udec", frechet_distance={"global": math.inf}), "StatusResponse.frechet_distance['global'] is inf"),
    ],
)
def test_a_field_outside_its_bound_is_refused_by_name(msg: Message, message: str) -> None:
    with pytest.raises(FieldOutOfRange) as e:
        bounds.check(msg, FieldOutOfRange)

    assert str(e.value).startswith(message), str(e.value)
    assert len(str(e.value)) < 300, "the message quotes at most the start of a value"


def test_a_message_past_its_bound_is_cut_with_a_mark() -> None:
    assert shortened("abcdef", 6) == "abcdef"
    assert shortened("abcdefg", 6) == "abc..."
    assert shortened("x" * 10_000, 512) == "x" * 509 + "..."


def test_a_message_is_brought_within_its_bound() -> None:
    bound = bounds.BOUNDS["RejectTaskRequest.message"]
    assert isinstance(bound, bounds.Text)

    assert bounds.bounded_text("line 1\nline 2\twith a tab") == "line 1\nline 2\twith a tab"
    assert bounds.bounded_text("a\x1b[31mred\r") == "a [31mred "
    assert len(bounds.bounded_text("x" * 10_000)) == bounds.MAX_MESSAGE and bounds.bounded_text("x" * 10_000).endswith("...")
    assert bound.problem(bounds.bounded_text("\x00" * 5000 + "\u2028")) is None


# --- the largest message within the bounds fits gRPC's message limit ---------------------------------------
WIDE = "\U0001f600"  # printable, four bytes in UTF-8: the most bytes a character of free text takes


def _largest_scalar(bound: bounds.Scalar, field: FieldDescriptor, index: int = 0) -> object:
    if isinstance(bound, bounds.Blob):
        return b"\xff" * bound.most
    if isinstance(bound, bounds.Text):
        if bound.kind == "digest":
            return "f" * 64
        if bound.kind == "hex":
            return "f" * bound.most
        if bound.kind == "id":
            return f"{index:0{bound.most}d}"  # distinct keys of a map
        return WIDE * bound.most
    if field.cpp_type in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return math.nextafter(bound.most, -math.inf) if bound.open_high else float(bound.most)
    return int(bound.most)


def _largest(message: Message) -> Message:
    """`message` with every field at the top of its bound (the largest member of each oneof)."""
    descriptor = cast(Descriptor, message.DESCRIPTOR)
    oneofs: list[list[FieldDescriptor]] = [list(oneof.fields) for oneof in descriptor.oneofs]
    in_oneof = {f.name for members in oneofs for f in members}
    for field in descriptor.fields:
        if field.name not in in_oneof:
            _fill(message, field)
    for members in oneofs:
        best = max(members, key=lambda f: _filled(type(message)(), f).ByteSize())
        _fill(message, best)
    return message


def _filled(message: Message, field: FieldDescriptor) -> Message:
    _fill(message, field)
    return message


def _fill(message: Message, field: FieldDescriptor) -> None:
    bound = bounds.BOUNDS.get(f"{message.DESCRIPTOR.name}.{field.name}")
    target = getattr(message, field.name)
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        assert isinstance(bound, bounds.Items) and bound.key is not None and bound.each is not None
        value_field = entry.fields_by_name["value"]
        for i in range(bound.most):
            target[_largest_scalar(bound.key, field, i)] = _largest_scalar(bound.each, value_field)
    elif field.is_repeated:
        assert isinstance(bound, bounds.Items)
        for i in range(bound.most):
            if field.message_type is not None:
                _largest(target.add())
            else:
                assert bound.each is not None
                target.append(_largest_scalar(bound.each, field, i))
    elif field.message_type is not None:
        _largest(target)
    elif field.cpp_type == FieldDescriptor.CPPTYPE_BOOL or field.enum_type is not None:
        setattr(message, field.name, 1 if field.enum_type is not None else True)
    else:
        assert bound is not None and not isinstance(bound, bounds.Items), field.full_name
        setattr(message, field.name, _largest_scalar(bound, field))


@pytest.mark.parametrize("name", sorted(pb.DESCRIPTOR.message_types_by_name))
def test_the_largest_message_within_the_bounds_fits_the_message_limit(name: str) -> None:
    """A message every field of which is within its bound is never refused by gRPC (RESOURCE_EXHAUSTED, which
    no outcome counts): a shared sample grid of 8 MiB was within its bound and beyond the 4 MiB limit."""
    message = _largest(getattr(pb, name)())

    bounds.check(message, FieldOutOfRange)
    assert message.ByteSize() <= MAX_MESSAGE_BYTES, f"{name}: {message.ByteSize()} bytes"


# --- the coordinator's request limit -------------------------------------------------------------------------
REQUESTS = sorted({m.input_type.name for m in pb.DESCRIPTOR.services_by_name["Coordinator"].methods})


@pytest.mark.parametrize("name", REQUESTS)
def test_every_request_but_its_bulk_fits_the_framing_margin(name: str) -> None:
    """Every request a coordinator receives, every field at its bound but a chunk's data and a sample grid,
    fits FRAMING_BYTES: the coordinator's receive limit (`request_limit`) is the bulk it expects plus that."""
    message = _largest(getattr(pb, name)())
    if name == "UpdateChunk":
        message = pb.UpdateChunk(header=cast(pb.UpdateHeader, _largest(pb.UpdateHeader())))
    if name == "EvaluationReport":
        message.ClearField("sample_grid_png")

    assert message.ByteSize() < FRAMING_BYTES, f"{name}: {message.ByteSize()} bytes"


@pytest.mark.parametrize("chunk_size", [1, MIN_CHUNK_SIZE, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, 1 << 30])
def test_the_request_limit_takes_the_chunks_and_grids_of_the_run(chunk_size: int) -> None:
    """A chunk of the size a worker uploads in (the coordinator's, between MIN_CHUNK_SIZE and MAX_CHUNK_SIZE)
    fits; the largest grid fits only when grids are shared, and then the limit is gRPC's whole message limit."""
    sent = min(max(chunk_size, MIN_CHUNK_SIZE), MAX_CHUNK_SIZE)
    chunk = pb.UpdateChunk(data=b"\xff" * sent).ByteSize()
    grid = _largest(pb.EvaluationReport()).ByteSize()

    assert chunk <= request_limit(chunk_size, grids=False) < chunk + FRAMING_BYTES
    assert grid <= request_limit(chunk_size, grids=True) == MAX_MESSAGE_BYTES
    if sent < MAX_CHUNK_SIZE:
        assert grid > request_limit(chunk_size, grids=False)
