"""Bounded chunked streams: split a payload into chunks, and reassemble them with size and hash checks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from fedcore.errors import HashMismatch, HeaderError, SizeMismatch, StreamTooLong

FORMAT_VERSION = 1  # bumped when the payload layout (safetensors metadata keys) changes
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB
MAX_CHUNK_SIZE = 4 << 20  # 4 MiB: never a raised multi-GB message limit


@dataclass(frozen=True)
class StreamHeader:
    """First message of every weights stream: what the chunks that follow must add up to."""

    total_bytes: int
    sha256: str  # lowercase hex digest of the whole payload
    format_version: int = FORMAT_VERSION

    @classmethod
    def of(cls, payload: bytes | bytearray | memoryview) -> StreamHeader:
        return cls(total_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())

    def check(self, *, max_bytes: int) -> None:
        """Refuse a header before any chunk is read: absurd sizes, malformed digests, unknown formats."""
        if self.format_version != FORMAT_VERSION:
            raise HeaderError(f"format version {self.format_version} is not supported (expected {FORMAT_VERSION})")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise HeaderError(f"sha256 {self.sha256[:80]!r} is not a 64-character lowercase hex digest")
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


class Reassembler:
    """Collects the chunks of one stream into a buffer of exactly the declared size.

    The buffer is allocated once from the (already bounded) header; a chunk that would go past the declared
    size is refused at once, without being buffered. `finish` checks the size and the hash."""

    def __init__(self, header: StreamHeader, *, max_bytes: int):
        header.check(max_bytes=max_bytes)
        self.header = header
        self._buffer = bytearray(header.total_bytes)
        self._received = 0
        self._hash = hashlib.sha256()

    @property
    def received(self) -> int:
        return self._received

    def feed(self, chunk: bytes | memoryview) -> None:
        end = self._received + len(chunk)
        if end > self.header.total_bytes:
            raise StreamTooLong(
                f"stream sent {end} bytes or more, more than the {self.header.total_bytes} its header declared"
            )
        self._buffer[self._received : end] = chunk
        self._hash.update(chunk)
        self._received = end

    def finish(self) -> bytearray:
        if self._received != self.header.total_bytes:
            raise SizeMismatch(f"stream ended after {self._received} of {self.header.total_bytes} declared bytes")
        digest = self._hash.hexdigest()
        if digest != self.header.sha256:
            raise HashMismatch(f"payload sha256 {digest} does not match the header's {self.header.sha256}")
        return self._buffer
