"""Tests for fedcore.wire.stream: chunked streams reassemble exactly, and every mismatch with the header is refused."""

from __future__ import annotations

import hashlib
import os
import threading

import blake3
import pytest

from fedcore.errors import HashMismatch, HeaderError, SizeMismatch, StreamError, StreamTooLong
from fedcore.payload.serialization import FORMAT_VERSION
from fedcore.wire.stream import (
    DIGESTS,
    MAX_CHUNK_SIZE,
    PREFERRED_DIGEST,
    THREADED_DIGEST_MIN,
    Reassembler,
    ReceiveBuffer,
    StreamHeader,
    digest_for,
    iter_chunks,
)

PAYLOAD = os.urandom(10_007)  # a prime length, so most chunk sizes leave a short last chunk


def _receive(payload: bytes, header: StreamHeader, chunk_size: int, max_bytes: int | None = None) -> bytearray | memoryview:
    receiver = Reassembler(header, max_bytes=max_bytes or header.total_bytes)
    for chunk in iter_chunks(payload, chunk_size):
        receiver.feed(chunk)
    return receiver.finish()


@pytest.mark.parametrize("algorithm", sorted(DIGESTS))
@pytest.mark.parametrize("chunk_size", [1, 7, 1000, 10_006, 10_007, 10_008, MAX_CHUNK_SIZE])
def test_roundtrip_over_chunk_sizes(chunk_size: int, algorithm: str) -> None:
    header = StreamHeader.of(PAYLOAD, algorithm)

    received = _receive(PAYLOAD, header, chunk_size)

    assert bytes(received) == PAYLOAD
    assert header.total_bytes == len(PAYLOAD)
    expected = hashlib.sha256(PAYLOAD) if algorithm == "sha256" else blake3.blake3(PAYLOAD)
    assert header.digest == expected.hexdigest() and header.algorithm == algorithm
    assert header.format_version == FORMAT_VERSION


def test_blake3_is_sent_to_peers_that_check_it_and_sha256_to_the_others() -> None:
    assert StreamHeader.of(PAYLOAD).algorithm == PREFERRED_DIGEST == "blake3"
    assert digest_for(["blake3"]) == "blake3"
    assert digest_for([]) == digest_for(["md5"]) == "sha256"


@pytest.mark.parametrize("algorithm", sorted(DIGESTS))
def test_a_digest_of_the_other_algorithm_is_a_hash_mismatch(algorithm: str) -> None:
    other = next(a for a in DIGESTS if a != algorithm)
    header = StreamHeader(len(PAYLOAD), StreamHeader.of(PAYLOAD, other).digest, algorithm)

    with pytest.raises(HashMismatch, match=f"payload {algorithm} "):
        _receive(PAYLOAD, header, 1000)


@pytest.mark.parametrize("chunk_size", [1, 1000, 4096])
def test_chunks_are_bounded_views_covering_the_payload(chunk_size: int) -> None:
    chunks = list(iter_chunks(PAYLOAD, chunk_size))

    assert all(isinstance(c, memoryview) for c in chunks)
    assert all(len(c) == chunk_size for c in chunks[:-1]) and 0 < len(chunks[-1]) <= chunk_size
    assert b"".join(chunks) == PAYLOAD


@pytest.mark.parametrize("chunk_size", [0, -1, MAX_CHUNK_SIZE + 1])
def test_chunk_size_outside_the_bound_is_refused(chunk_size: int) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        list(iter_chunks(PAYLOAD, chunk_size))


def test_truncated_stream_is_a_size_mismatch() -> None:
    header = StreamHeader.of(PAYLOAD)

    with pytest.raises(SizeMismatch, match="after 10000 of 10007"):
        _receive(PAYLOAD[:10_000], header, 1000)


def test_corrupted_chunk_is_a_hash_mismatch() -> None:
    header = StreamHeader.of(PAYLOAD)
    corrupted = bytearray(PAYLOAD)
    corrupted[5_000] ^= 0xFF

    with pytest.raises(HashMismatch, match=header.digest):
        _receive(bytes(corrupted), header, 1000)


def test_excess_bytes_are_refused_at_the_chunk_that_exceeds() -> None:
    header = StreamHeader.of(PAYLOAD)
    receiver = Reassembler(header, max_bytes=1 << 20)
    longer = PAYLOAD + b"x" * 3000
    fed = 0

    with pytest.raises(StreamTooLong) as excinfo:
        for chunk in iter_chunks(longer, 1000):
            receiver.feed(chunk)
            fed += 1

    assert fed == 10  # chunks 0..9 (10,000 bytes) fit; chunk 10 would end at 11,000 > 10,007
    assert receiver.received == 10_000 <= header.total_bytes
    assert excinfo.value.reason == "too_large"
    # Further chunks are refused too and never grow the buffer past the declaration.
    with pytest.raises(StreamTooLong):
        receiver.feed(b"y" * 8)
    assert receiver.received == 10_000


def test_exact_fill_then_one_more_byte_is_refused() -> None:
    header = StreamHeader.of(PAYLOAD)
    receiver = Reassembler(header, max_bytes=len(PAYLOAD))
    receiver.feed(PAYLOAD)

    with pytest.raises(StreamTooLong):
        receiver.feed(b"\x00")

    assert receiver.received == len(PAYLOAD)
    assert bytes(receiver.finish()) == PAYLOAD


def test_absurd_declared_size_is_refused_at_construction() -> None:
    header = StreamHeader(total_bytes=1 << 40, digest="0" * 64)

    with pytest.raises(StreamTooLong, match="exceeds the limit of 1048576"):
        Reassembler(header, max_bytes=1 << 20)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (StreamHeader(total_bytes=10, digest="a" * 63), "64-character"),
        (StreamHeader(total_bytes=10, digest="A" * 64), "lowercase hex"),
        (StreamHeader(total_bytes=10, digest="g" * 64), "lowercase hex"),
        (StreamHeader(total_bytes=10, digest=""), "64-character"),
        (StreamHeader(total_bytes=10, digest="0" * 64, format_version=FORMAT_VERSION + 1), "format version"),
        (StreamHeader(total_bytes=10, digest="0" * 64, format_version=0), "format version"),
        (StreamHeader(total_bytes=0, digest="0" * 64), "must be positive"),
        (StreamHeader(total_bytes=-5, digest="0" * 64), "must be positive"),
        (StreamHeader(total_bytes=10, digest="0" * 64, algorithm="md5"), "not one of"),
        (StreamHeader(total_bytes=10, digest="0" * 64, algorithm=""), "not one of"),
    ],
)
def test_bad_header_is_refused(header: StreamHeader, match: str) -> None:
    with pytest.raises(HeaderError, match=match) as excinfo:
        Reassembler(header, max_bytes=1 << 20)

    assert excinfo.value.reason == "bad_header"


def test_stream_errors_share_a_base_and_carry_reasons() -> None:
    reasons = {cls: cls.reason for cls in (HeaderError, SizeMismatch, HashMismatch, StreamTooLong)}

    assert all(issubclass(cls, StreamError) for cls in reasons)
    assert reasons == {
        HeaderError: "bad_header",
        SizeMismatch: "bad_size",
        HashMismatch: "bad_hash",
        StreamTooLong: "too_large",
    }


# --- reused receive memory and the digest thread of large streams --------------------------------------------


def test_receive_buffer_reuses_its_memory_while_it_is_large_enough() -> None:
    memory = ReceiveBuffer()

    first = memory.view(1000)
    smaller = memory.view(10)
    larger = memory.view(5000)

    assert len(first) == 1000 and len(smaller) == 10 and len(larger) == 5000
    assert smaller.obj is first.obj  # the same bytearray underneath
    assert larger.obj is not first.obj and memory.capacity == 5000


def test_streams_received_into_reused_memory_come_out_whole() -> None:
    memory = ReceiveBuffer()
    long, short = os.urandom(30_011), os.urandom(9_973)

    for payload in (long, short, long):
        header = StreamHeader.of(payload)
        receiver = Reassembler(header, max_bytes=len(payload), into=memory)
        for chunk in iter_chunks(payload, 4096):
            receiver.feed(chunk)

        assert bytes(receiver.finish()) == payload  # no bytes of the longer stream before it show through
    assert memory.capacity == len(long)


def _digest_threads() -> int:
    return sum(t.name.startswith("feddiff-") and t.name[len("feddiff-") :] in DIGESTS for t in threading.enumerate())


def test_a_large_stream_is_hashed_in_a_thread_that_ends_with_it() -> None:
    payload = os.urandom(THREADED_DIGEST_MIN + 12_345)
    header = StreamHeader.of(payload)

    receiver = Reassembler(header, max_bytes=len(payload))
    assert _digest_threads() == 1
    for chunk in iter_chunks(payload, 1 << 20):
        receiver.feed(chunk)
    received = receiver.finish()

    assert bytes(received) == payload
    assert _digest_threads() == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_a_damaged_large_stream_is_refused_and_its_digest_thread_ends(damage: str) -> None:
    payload = bytearray(os.urandom(THREADED_DIGEST_MIN + 1))
    header = StreamHeader.of(payload)
    if damage == "flip":
        payload[THREADED_DIGEST_MIN // 2] ^= 0x01
    elif damage == "truncate":
        del payload[-1]
    else:
        payload.append(0)

    with pytest.raises(StreamError), Reassembler(header, max_bytes=len(payload) + 1) as receiver:
        for chunk in iter_chunks(payload, 1 << 20):
            receiver.feed(chunk)
        receiver.finish()

    assert _digest_threads() == 0


def test_a_large_stream_abandoned_half_way_ends_its_digest_thread() -> None:
    payload = os.urandom(THREADED_DIGEST_MIN)

    with Reassembler(StreamHeader.of(payload), max_bytes=len(payload)) as receiver:
        receiver.feed(payload[: len(payload) // 3])  # then the connection drops

    assert _digest_threads() == 0
