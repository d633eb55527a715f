"""A hand-made HTTP/2 client for tests: gRPC calls whose request messages are announced (the 5-byte length
prefix) and never finished, as a hostile peer sends them. grpc's own client always sends whole messages."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 3, 4, 5
MAX_FRAME = 16384  # HTTP/2's default SETTINGS_MAX_FRAME_SIZE; what this client sends at most


def _int(value: int, prefix_bits: int = 7) -> bytes:
    """An HPACK integer (RFC 7541, 5.1) with an N-bit prefix, its flag bits zero."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out, value = [limit], value - limit
    while value >= 128:
        out.append(value % 128 | 128)
        value //= 128
    return bytes([*out, value])


def _headers_block(headers: list[tuple[str, str]]) -> bytes:
    """Every header as a literal without indexing, with a literal name (RFC 7541, 6.2.2): no state to keep."""
    block = b""
    for name, value in headers:
        n, v = name.encode(), value.encode()
        block += b"\x00" + _int(len(n)) + n + _int(len(v)) + v
    return block


@dataclass
class RawStream:
    """One call: the bytes of its request still to send, and what the server said of it."""

    stream_id: int
    to_send: bytes
    window: int
    sent: int = 0
    reset: int | None = None  # the RST_STREAM error code, if the server reset it
    headers: list[bytes] = field(default_factory=list)  # the raw header blocks it answered with (trailers included)
    ended: bool = False  # the server ended its side


class RawConnection:
    """An HTTP/2 connection to a gRPC server (plain text) that answers the server's SETTINGS and PINGs and
    honours its flow control, and sends exactly the bytes a test asks for."""

    def __init__(self, address: str, timeout: float = 10.0):
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.settimeout(None)
        self._lock = threading.Condition()
        self._send_lock = threading.Lock()
        self.streams: dict[int, RawStream] = {}
        self._next_id = 1
        self.conn_window = 65535
        self.initial_window = 65535
        self.max_streams: int | None = None  # the server's SETTINGS_MAX_CONCURRENT_STREAMS, once heard
        self.goaway: int | None = None  # the error code of a GOAWAY
        self.closed = False
        self._settings_seen = threading.Event()
        self._send_frame(b"", 0, 0, prefix=PREFACE, type_=SETTINGS)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._settings_seen.wait(timeout)

    # --- frames ------------------------------------------------------------------------------------------------
    def _send_frame(self, payload: bytes, flags: int, stream_id: int, *, type_: int, prefix: bytes = b"") -> None:
        frame = struct.pack(">I", len(payload))[1:] + bytes([type_, flags]) + struct.pack(">I", stream_id) + payload
        with self._send_lock:
            try:
                self.sock.sendall(prefix + frame)
            except OSError:
                self.closed = True

    def _recv_exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise ConnectionError("closed")
            buf += part
        return buf

    def _read(self) -> None:
        try:
            while True:
                head = self._recv_exactly(9)
                length = int.from_bytes(head[:3], "big")
                type_, flags, stream_id = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = self._recv_exactly(length)
                self._on_frame(type_, flags, stream_id, payload)
        except (OSError, ConnectionError):
            pass
        with self._lock:
            self.closed = True
            self._lock.notify_all()

    def _on_frame(self, type_: int, flags: int, stream_id: int, payload: bytes) -> None:
        with self._lock:
            stream = self.streams.get(stream_id)
            if type_ == SETTINGS and not flags & ACK:
                for i in range(0, len(payload), 6):
                    key, value = struct.unpack(">HI", payload[i : i + 6])
                    if key == SETTINGS_INITIAL_WINDOW_SIZE:
                        for s in self.streams.values():
                            s.window += value - self.initial_window
                        self.initial_window = value
                    elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                        self.max_streams = value
                self._send_frame(b"", ACK, 0, type_=SETTINGS)
                self._settings_seen.set()
            elif type_ == PING and not flags & ACK:
                self._send_frame(payload, ACK, 0, type_=PING)
            elif type_ == WINDOW_UPDATE:
                increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                if stream_id == 0:
                    self.conn_window += increment
                elif stream is not None:
                    stream.window += increment
            elif type_ == RST_STREAM and stream is not None:
                stream.reset = int.from_bytes(payload[:4], "big")
            elif type_ == HEADERS and stream is not None:
                stream.headers.append(payload)
                stream.ended |= bool(flags & END_STREAM)
            elif type_ == DATA and stream is not None:
                stream.ended |= bool(flags & END_STREAM)
            elif type_ == GOAWAY:
                self.goaway = int.from_bytes(payload[4:8], "big")
            self._lock.notify_all()

    # --- calls -------------------------------------------------------------------------------------------------
    def start_call(self, path: str, message_bytes: int, sent_bytes: int | None = None) -> RawStream:
        """A call of `path` whose request announces a message of `message_bytes` and sends `sent_bytes` of it
        (all but its last byte by default) as `pump` lets it; the stream is never ended."""
        sent_bytes = message_bytes - 1 if sent_bytes is None else sent_bytes
        return self._open(path, b"\x00" + struct.pack(">I", message_bytes) + bytes(sent_bytes))

    def call(self, path: str, message: bytes) -> RawStream:
        """A call of `path` with a whole request `message` (at most MAX_FRAME bytes), ended; its answer is never
        read: the client grants no window beyond HTTP/2's initial 64 KiB."""
        stream = self._open(path, b"")
        self._send_frame(b"\x00" + struct.pack(">I", len(message)) + message, END_STREAM, stream.stream_id, type_=DATA)
        return stream

    def _open(self, path: str, to_send: bytes) -> RawStream:
        headers = [
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
            ("content-type", "application/grpc"), ("te", "trailers"),
        ]  # fmt: skip
        with self._lock:
            stream_id, self._next_id = self._next_id, self._next_id + 2
            stream = self.streams[stream_id] = RawStream(stream_id, to_send, self.initial_window)
        self._send_frame(_headers_block(headers), END_HEADERS, stream_id, type_=HEADERS)
        return stream

    def pump(self, seconds: float) -> int:
        """Send what flow control lets through on every stream for up to `seconds` (less once every stream sent
        all its bytes or was reset); the bytes sent."""
        deadline, total = time.monotonic() + seconds, 0
        with self._lock:
            while not self.closed and time.monotonic() < deadline:
                ready = [s for s in self.streams.values() if s.sent < len(s.to_send) and s.reset is None and s.window > 0]
                if not [s for s in self.streams.values() if s.sent < len(s.to_send) and s.reset is None]:
                    break
                if not ready or self.conn_window <= 0:
                    self._lock.wait(max(0.0, min(0.05, deadline - time.monotonic())))
                    continue
                for s in ready:
                    n = min(MAX_FRAME, s.window, self.conn_window, len(s.to_send) - s.sent)
                    if n <= 0:
                        continue
                    chunk = s.to_send[s.sent : s.sent + n]
                    s.sent += n
                    s.window -= n
                    self.conn_window -= n
                    total += n
                    self._lock.release()
                    try:
                        self._send_frame(chunk, 0, s.stream_id, type_=DATA)
                    finally:
                        self._lock.acquire()
        return total

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5)
