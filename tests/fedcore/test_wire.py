"""Tests for fedcore.wire's chunk messages: sizes counted without encoding, data only after the header."""

from __future__ import annotations

import os

import pytest

from fedcore import wire
from fedcore.errors import SizeMismatch
from fedcore.proto.feddiff.v1 import feddiff_pb2 as pb


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16_383, 16_384, 65_536, (1 << 20) - 1, 1 << 20, 4 << 20, 2_097_151, 2_097_152])
@pytest.mark.parametrize("kind", [pb.WeightsChunk, pb.UpdateChunk])
def test_data_message_size_is_what_protobuf_encodes(n: int, kind) -> None:
    msg = kind(data=bytes(n))

    assert wire.data_message_size(n) == msg.ByteSize() == len(msg.SerializeToString())


def test_chunk_messages_carry_the_payload_and_their_sizes() -> None:
    payload = os.urandom(5 * 1000 + 17)

    pairs = list(wire.chunk_messages(payload, 1000, lambda b: pb.WeightsChunk(data=b)))

    assert b"".join(m.data for m, _ in pairs) == payload
    assert [size for _, size in pairs] == [m.ByteSize() for m, _ in pairs]


def test_data_of_counts_every_message_and_refuses_a_second_header() -> None:
    counted: list[int] = []
    header = pb.UpdateChunk(header=pb.UpdateHeader(session_id="s"))
    stream = [pb.UpdateChunk(data=b"abc"), pb.UpdateChunk(data=b""), header, pb.UpdateChunk(data=b"never read")]
    refusal = SizeMismatch("data only")

    data = wire.data_of(iter(stream), on_wire=counted.append, refusal=refusal)

    assert next(data) == b"abc" and next(data) == b""
    with pytest.raises(SizeMismatch, match="data only"):
        next(data)
    assert counted == [m.ByteSize() for m in stream[:3]]
