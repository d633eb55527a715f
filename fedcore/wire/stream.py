"""Bounded chunked streams: split a payload into chunks, and reassemble them with size and hash checks."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import blake3

from fedcore.errors import HashMismatch, HeaderError, SizeMismatch, StreamTooLong
from fedcore.payload.serialization import FORMAT_VERSION

DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB
MIN_CHUNK_SIZE = 64 << 10  # a worker uploads in the chunks its coordinator names, never smaller than this
MAX_CHUNK_SIZE = 4 << 20  # 4 MiB: never a raised multi-GB message limit
# Every field of a message but a chunk's data or a sample grid, each within its bound of fedcore.wire.bounds,
# takes less than this (tests/fedcore/wire/test_wire_bounds.py holds it).
FRAMING_BYTES = 64 << 10
# The largest gRPC message either side sends or receives: a chunk, or a shared sample grid, and the few fields
# around it.
MAX_MESSAGE_BYTES = MAX_CHUNK_SIZE + FRAMING_BYTES
THREADED_DIGEST_MIN = 16 << 20  # bytes: a stream at least this long is hashed in a thread beside its reception


def request_limit(chunk_size: int, grids: bool) -> int:
    """The largest request message a coordinator needs to accept: an upload's chunk of `chunk_size` (what it
    tells its workers; at least MIN_CHUNK_SIZE), a sample grid when workers share them (`grids`), or any other
    request, each with its fields around it. gRPC holds up to this much of every request it is receiving."""
    largest = max(min(max(chunk_size, MIN_CHUNK_SIZE), MAX_CHUNK_SIZE), MAX_CHUNK_SIZE if grids else 0)
    return largest + FRAMING_BYTES


class Hasher(Protocol):
    """A running digest, as hashlib and blake3 make them."""

    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


# The payload digests a receiver checks. Both are 256-bit cryptographic hashes; BLAKE3 hashes about 2.5 times
# as fast as SHA-256 on the 2-core CPU of docs/benchmarks.md (4.3 to 4.7 against 1.8 GB/s, SHA extensions
# included; `python -m bench.transfer`), and hashing is most of what a receiver spends per byte. SHA-256
# stays for peers that predate BLAKE3.
DIGESTS: dict[str, Callable[[], Hasher]] = {"blake3": blake3.blake3, "sha256": hashlib.sha256}
PREFERRED_DIGEST = "blake3"
LEGACY_DIGEST = "sha256"  # what every peer checks, also one that names no digest
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def digest_for(peer_digests: Iterable[str]) -> str:
    """The digest to send a peer that checks `peer_digests` besides SHA-256."""
    return PREFERRED_DIGEST if PREFERRED_DIGEST in set(peer_digests) else LEGACY_DIGEST


@dataclass(frozen=True)
class StreamHeader:
    """First message of every weights stream: what the chunks that follow must add up to."""

    total_bytes: int
    digest: str  # lowercase hex digest of the whole payload
    algorithm: str = PREFERRED_DIGEST  # a key of DIGESTS
    format_version: int = FORMAT_VERSION

    @classmethod
    def of(cls, payload: bytes | bytearray | memoryview, algorithm: str = PREFERRED_DIGEST) -> StreamHeader:
        digest = DIGESTS[algorithm]()
        digest.update(payload)
        return cls(total_bytes=len(payload), digest=digest.hexdigest(), algorithm=algorithm)

    def check(self, *, max_bytes: int) -> None:
        """Refuse a header before any chunk is read: absurd sizes, malformed digests, unknown formats."""
        if self.format_version != FORMAT_VERSION:
            raise HeaderError(f"format version {self.format_version} is not supported (expected {FORMAT_VERSION})")
        if self.algorithm not in DIGESTS:
            raise HeaderError(f"digest {self.algorithm[:40]!r} is not one of {sorted(DIGESTS)}")
        if not _HEX_DIGEST.fullmatch(self.digest):
            raise HeaderError(f"{self.algorithm} {self.digest[:80]!r} is not a 64-character lowercase hex digest")
        if self.total_bytes <= 0:
            raise HeaderError(f"total_bytes {self.total_bytes} must be positive")
        if self.total_bytes > max_bytes:
            raise StreamTooLong(f"total_bytes {self.total_bytes} exceeds the limit of {max_bytes} bytes for this stream")


def iter_chunks(payload: bytes | bytearray | memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[memoryview]:
    """Zero-copy views of consecutive chunks of at most `chunk_size` bytes."""
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size {chunk_size} must be in 1..{MAX_CHUNK_SIZE}")
    view = memoryview(payload)
    for start in range(0, len(view), chunk_size):
        yield view[start : start + chunk_size]


class ReceiveBuffer:
    """Memory for received payloads, reused from one stream to the next.

    A fresh multi-megabyte buffer costs one page fault per 4 KiB page the first time it is written: on
    loopback that is as slow as the transfer itself (about 0.3 s per 512 MB on a 2-core VM, against 0.05 s
    to copy into memory already mapped). A `view` is valid until the next call: the owner reads it (decodes,
    folds or loads it) before it receives again."""

    def __init__(self) -> None:
        self._memory = bytearray()

    def view(self, size: int) -> memoryview:
        """A writable view of `size` bytes, in the memory of the previous call when it is large enough."""
        if size > len(self._memory):
            self._memory = bytearray()  # drop the old memory before taking the new: never both at once
            self._memory = bytearray(size)
        return memoryview(self._memory)[:size]

    @property
    def capacity(self) -> int:
        return len(self._memory)


class InlineDigest:
    """The digest of a buffer as it fills, computed as each part is declared filled (small streams)."""

    def __init__(self, buffer: bytearray | memoryview, algorithm: str = PREFERRED_DIGEST):
        self._buffer = memoryview(buffer)
        self._hash = DIGESTS[algorithm]()
        self._hashed = 0

    def filled(self, end: int) -> None:
        """Bytes [0, end) of the buffer are final."""
        self._hash.update(self._buffer[self._hashed : end])
        self._hashed = end

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        pass


class TrailingDigest:
    """The digest of a buffer as it fills, computed in a thread of its own (large streams).

    The receiving thread then only copies each chunk, and asks for the next message sooner (HTTP/2 flow
    control lets the sender go on), while the digest follows a few chunks behind: on a 2-core machine the
    hash of an upload ran beside its reception instead of after each chunk. Use it as a context manager: the
    thread ends with the block, also when the stream is refused half way."""

    def __init__(self, buffer: bytearray | memoryview, algorithm: str = PREFERRED_DIGEST):
        self._buffer = memoryview(buffer)
        self._hash = DIGESTS[algorithm]()
        self._filled = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"feddiff-{algorithm}", daemon=True)
        self._thread.start()

    def filled(self, end: int) -> None:
        """Bytes [0, end) of the buffer are final."""
        with self._cond:
            self._filled = end
            self._cond.notify()

    def _run(self) -> None:
        hashed = 0
        while True:
            with self._cond:
                while self._filled == hashed and not self._closed:
                    self._cond.wait()
                end, closed = self._filled, self._closed
            if end > hashed:
                self._hash.update(self._buffer[hashed:end])  # the GIL is released while it hashes
                hashed = end
            elif closed:
                return

    def hexdigest(self) -> str:
        """The digest of the bytes filled so far, once the thread has caught up (it then ends)."""
        self.close()
        return self._hash.hexdigest()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self) -> TrailingDigest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reassembler:
    """Collects the chunks of one stream into a buffer of exactly the declared size.

    The buffer is allocated once from the (already bounded) header, or taken from a `ReceiveBuffer`; a
    chunk that would go past the declared size is refused at once, without being buffered. `finish` checks
    the size and the hash. Large streams are hashed by a `TrailingDigest`: use the reassembler as a context
    manager (or call `finish` or `close`) so that its thread ends."""

    def __init__(self, header: StreamHeader, *, max_bytes: int, into: ReceiveBuffer | None = None):
        header.check(max_bytes=max_bytes)
        self.header = header
        self._buffer: bytearray | memoryview = into.view(header.total_bytes) if into is not None else bytearray(header.total_bytes)
        self._received = 0
        digest = TrailingDigest if header.total_bytes >= THREADED_DIGEST_MIN else InlineDigest
        self._digest = digest(self._buffer, header.algorithm)

    @property
    def received(self) -> int:
        return self._received

    def feed(self, chunk: bytes | memoryview) -> None:
        end = self._received + len(chunk)
        if end > self.header.total_bytes:
            self.close()
            raise StreamTooLong(f"stream sent {end} bytes or more, more than the {self.header.total_bytes} its header declared")
        self._buffer[self._received : end] = chunk
        self._digest.filled(end)
        self._received = end

    def finish(self) -> bytearray | memoryview:
        self.close()
        if self._received != self.header.total_bytes:
            raise SizeMismatch(f"stream ended after {self._received} of {self.header.total_bytes} declared bytes")
        digest = self._digest.hexdigest()
        if digest != self.header.digest:
            raise HashMismatch(f"payload {self.header.algorithm} {digest} does not match the header's {self.header.digest}")
        return self._buffer

    def close(self) -> None:
        """End the digest thread, if any (idempotent)."""
        self._digest.close()

    def __enter__(self) -> Reassembler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
