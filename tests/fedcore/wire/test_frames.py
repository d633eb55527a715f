"""Tests for fedcore.wire.frames: the same bytes as protobuf on the wire, the same messages read back."""

from __future__ import annotations

import os

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.wire import frames
from fedcore.wire.frames import DataChunk
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb

SIZES = [0, 1, 127, 128, 16_383, 16_384, 65_536, (1 << 20) - 1, 1 << 20, 2_097_151, 2_097_152, 4 << 20]


@pytest.mark.parametrize("n", SIZES[1:])
@pytest.mark.parametrize("kind", [pb.WeightsChunk, pb.UpdateChunk])
def test_a_data_message_is_what_protobuf_writes(n: int, kind) -> None:
    data = os.urandom(n)
    (frame,) = frames.data_frames(data, n)

    assert frame == kind(data=data).SerializeToString()
    assert frames.data_message_size(n) == kind(data=data).ByteSize() == len(frame)


def test_an_empty_data_message_has_its_size_and_an_empty_payload_no_message() -> None:
    assert frames.data_message_size(0) == pb.WeightsChunk(data=b"").ByteSize() == 2
    assert list(frames.data_frames(b"", 16)) == []


def test_data_frames_cover_the_payload_in_bounded_chunks() -> None:
    payload = os.urandom(5 * 1000 + 17)

    written = list(frames.data_frames(payload, 1000))

    messages = [pb.WeightsChunk.FromString(f) for f in written]
    assert b"".join(m.data for m in messages) == payload and len(written) == 6
    assert all(f == m.SerializeToString() for f, m in zip(written, messages, strict=True))


@pytest.mark.parametrize("n", SIZES)
def test_a_data_message_is_read_as_a_view_without_a_copy(n: int) -> None:
    raw = pb.UpdateChunk(data=os.urandom(n)).SerializeToString()

    msg = frames.parser(pb.UpdateChunk)(raw)

    assert isinstance(msg, DataChunk) and msg.data.obj is raw  # a view of gRPC's bytes
    assert bytes(msg.data) == pb.UpdateChunk.FromString(raw).data
    assert msg.WhichOneof("msg") == "data" and msg.HasField("data") and not msg.HasField("header")
    assert msg.ByteSize() == len(raw)


def test_a_header_goes_through_protobuf() -> None:
    header = pb.WeightsChunk(header=pb.StreamHeader(round=3, task_id="t", parts=["decoder"], total_bytes=9, blake3="ab" * 32))

    msg = frames.parser(pb.WeightsChunk)(header.SerializeToString())

    assert isinstance(msg, pb.WeightsChunk) and msg == header


def test_the_serializer_sends_frames_as_they_are_and_messages_through_protobuf() -> None:
    frame = next(frames.data_frames(b"abc", 16))
    header = pb.UpdateChunk(header=pb.UpdateHeader(session_id="s"))

    assert frames.serialize(frame) is frame
    assert frames.serialize(header) == header.SerializeToString()


def test_what_is_not_protobuf_is_refused_as_protobuf_refuses_it() -> None:
    for raw in (b"\x12\x05abc", b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x12"):
        with pytest.raises(DecodeError):
            frames.parser(pb.UpdateChunk)(raw)


fields = st.lists(
    st.one_of(
        st.binary(max_size=300).map(lambda d: pb.UpdateChunk(data=d).SerializeToString()),
        st.text(max_size=20).map(lambda s: pb.UpdateChunk(header=pb.UpdateHeader(session_id=s)).SerializeToString()),
    ),
    min_size=0,
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(parts=fields)
def test_any_sequence_of_fields_reads_as_protobuf_reads_it(parts: list[bytes]) -> None:
    raw = b"".join(parts)  # protobuf concatenation: for a oneof, the last field read wins

    got = frames.parser(pb.UpdateChunk)(raw)
    want = pb.UpdateChunk.FromString(raw)

    assert got.WhichOneof("msg") == want.WhichOneof("msg")
    if want.WhichOneof("msg") == "data":
        assert bytes(got.data) == want.data
    elif want.WhichOneof("msg") == "header":
        assert got == want
