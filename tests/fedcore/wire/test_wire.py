"""Tests for fedcore.wire.convert's stream reading: data only after the header, every message counted."""

from __future__ import annotations

import pytest

from fedcore.errors import SizeMismatch
from fedcore.wire import convert
from fedcore.wire.frames import ChunkMessage, DataChunk
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb


def test_data_of_counts_every_message_and_refuses_a_second_header() -> None:
    counted: list[int] = []
    header = pb.UpdateChunk(header=pb.UpdateHeader(session_id="s"))
    stream: list[ChunkMessage] = [
        pb.UpdateChunk(data=b"abc"),
        DataChunk(memoryview(b"xy")),
        pb.UpdateChunk(data=b""),
        header,
        pb.UpdateChunk(data=b"never read"),
    ]
    refusal = SizeMismatch("data only")

    data = convert.data_of(iter(stream), on_wire=counted.append, refusal=refusal)

    assert next(data) == b"abc" and bytes(next(data)) == b"xy" and next(data) == b""
    with pytest.raises(SizeMismatch, match="data only"):
        next(data)
    assert counted == [pb.UpdateChunk(data=b"abc").ByteSize(), pb.UpdateChunk(data=b"xy").ByteSize(), 0 + 2, header.ByteSize()]
