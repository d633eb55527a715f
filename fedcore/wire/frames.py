"""The weights streams' chunk messages, written and read without copying their data through protobuf.

WeightsChunk and UpdateChunk are both `oneof msg { <header> header = 1; bytes data = 2; }`, and all but the
first message of a stream are data: the tag byte 0x12, the length as a varint, the bytes. Protobuf's Python
messages copy those bytes twice each way (sending: into the message, then into its serialization;
receiving: into the message, then into a new bytes object at every read of `.data`). This module writes a
data message with one copy and reads it as a view of the bytes gRPC hands over. A header, or any message
that is not exactly one data field, goes through protobuf. The bytes on the wire are protobuf's, so peers
built from the generated code interoperate (tested both ways).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal, NamedTuple, Protocol, TypeVar

from google.protobuf.message import Message

from fedcore.wire.stream import iter_chunks

DATA_TAG = b"\x12"  # field 2, wire type 2 (length-delimited)
_MAX_VARINT_BYTES = 10


class _Message(Protocol):
    def SerializeToString(self) -> bytes: ...


class ChunkMessage(Protocol):
    """What the stream code asks of a received chunk message: a WeightsChunk or UpdateChunk, or a `DataChunk`."""

    @property
    def data(self) -> bytes | memoryview: ...

    def WhichOneof(self, oneof_group: Literal["msg"], /) -> str | None: ...

    def ByteSize(self) -> int: ...


M = TypeVar("M", bound=Message)


def varint(n: int) -> bytes:
    """Protobuf's base-128 encoding of a non-negative integer."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None when `raw` holds no complete varint of at most 10 bytes there."""
    value = shift = 0
    for i in range(pos, min(len(raw), pos + _MAX_VARINT_BYTES)):
        value |= (raw[i] & 0x7F) << shift
        if raw[i] < 0x80:
            return value, i + 1
        shift += 7
    return None


def data_message_size(n: int) -> int:
    """The serialized size of a chunk message that holds `n` bytes of data (what protobuf's `ByteSize()`
    returns, without encoding the message: upb's ByteSize serializes it to count it, 51 us per MiB)."""
    return len(DATA_TAG) + max(1, (n.bit_length() + 6) // 7) + n


def data_frames(payload: bytes | bytearray | memoryview, chunk_size: int) -> Iterator[bytes]:
    """The serialized data messages of a payload's consecutive chunks (the caller sends the header message
    first). Send them with `serialize` as the method's serializer."""
    for view in iter_chunks(payload, chunk_size):
        yield b"".join((DATA_TAG, varint(len(view)), view))


def serialize(msg: _Message | bytes) -> bytes:
    """gRPC serializer of a chunk stream: a protobuf message, or a data message framed by `data_frames`."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


class DataChunk(NamedTuple):
    """A received data message: its bytes as a view of the buffer gRPC handed over. It answers what the
    stream code asks of a chunk message."""

    data: memoryview

    def WhichOneof(self, group: str) -> str:
        return "data"

    def HasField(self, name: str) -> bool:
        return name == "data"

    def ByteSize(self) -> int:
        return data_message_size(len(self.data))


def parser(message_type: type[M]) -> Callable[[bytes], M | DataChunk]:
    """gRPC deserializer of a chunk stream: a message holding exactly one data field as a `DataChunk`, any
    other through protobuf (`message_type.FromString`, which also refuses what is not protobuf)."""
    from_string = message_type.FromString

    def parse(raw: bytes) -> M | DataChunk:
        if raw[:1] == DATA_TAG:
            length = _read_varint(raw, 1)
            if length is not None and length[1] + length[0] == len(raw):
                return DataChunk(memoryview(raw)[length[1] :])
        return from_string(raw)

    return parse
