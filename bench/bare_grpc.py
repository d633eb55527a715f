"""A bare gRPC stream for reference: 1 MiB bytes messages with identity serializers (no protobuf fields, no
header, no hash, no reassembly checks), served by its own process like the coordinator.

`python -m bench.bare_grpc SIZE` serves /bare.Bare/Down (SIZE random bytes) and /bare.Bare/Up (drains a
stream into a buffer), then prints its port. /bare.Bare/Up_blake3 and /bare.Bare/Up_sha256 also take that
digest of what they drain, and `download_seconds(digest=...)` of what it receives: the same bare stream plus
the one check a receiver of this project must make, to tell the cost of the digest from the cost of
everything else."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures

import grpc

from fedcore.wire.stream import DIGESTS, Hasher
from service.allocator import tune_for_streaming

CHUNK = 1 << 20
OPTIONS = [("grpc.max_receive_message_length", 2 * CHUNK), ("grpc.max_send_message_length", 2 * CHUNK)]


def _identity(b: bytes) -> bytes:
    return b


def serve(size: int) -> None:
    tune_for_streaming()  # the same allocator settings as the coordinator and the workers
    payload = os.urandom(size)
    sink = bytearray(size)

    def down(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        view = memoryview(payload)
        for start in range(0, size, CHUNK):
            yield bytes(view[start : start + CHUNK])

    def up(requests: Iterable[bytes], context: grpc.ServicerContext, digest: Hasher | None = None) -> bytes:
        got = 0
        for data in requests:
            sink[got : got + len(data)] = data
            if digest is not None:
                digest.update(data)
            got += len(data)
        return b"ok"

    def hashed_up(algorithm: str) -> Callable[[Iterable[bytes], grpc.ServicerContext], bytes]:
        return lambda requests, context: up(requests, context, DIGESTS[algorithm]())

    methods = {
        "Down": grpc.unary_stream_rpc_method_handler(down, request_deserializer=_identity, response_serializer=_identity),
        "Up": grpc.stream_unary_rpc_method_handler(up, request_deserializer=_identity, response_serializer=_identity),
    }
    for algorithm in DIGESTS:
        methods[f"Up_{algorithm}"] = grpc.stream_unary_rpc_method_handler(hashed_up(algorithm), request_deserializer=_identity, response_serializer=_identity)
    handler = grpc.method_handlers_generic_handler("bare.Bare", methods)
    server = grpc.server(futures.ThreadPoolExecutor(4), options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


class BareStream:
    """Client of a bare server process: timed downloads into, and uploads from, preallocated buffers."""

    def __init__(self, size: int):
        self.size = size
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.bare_grpc", str(size)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None  # stdout=PIPE
        port = int(self.proc.stdout.readline())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
        self._down = self.channel.unary_stream("/bare.Bare/Down", request_serializer=_identity, response_deserializer=_identity)
        self._up = self.channel.stream_unary("/bare.Bare/Up", request_serializer=_identity, response_deserializer=_identity)
        self._up_hashed = {a: self.channel.stream_unary(f"/bare.Bare/Up_{a}", request_serializer=_identity, response_deserializer=_identity) for a in DIGESTS}
        self.buffer = bytearray(size)
        self.payload = os.urandom(size)

    def download_seconds(self, digest_name: str | None = None) -> float:
        """Seconds to drain a download into a buffer; with `digest_name`, also hashing what arrives."""
        digest = DIGESTS[digest_name]() if digest_name else None
        start, got = time.perf_counter(), 0
        for data in self._down(b""):
            self.buffer[got : got + len(data)] = data
            if digest is not None:
                digest.update(data)
            got += len(data)
        return time.perf_counter() - start

    def upload_seconds(self, digest_name: str | None = None) -> float:
        """Seconds to upload, the server draining into a buffer; with `digest_name`, also hashing it."""
        view = memoryview(self.payload)
        call = self._up_hashed[digest_name] if digest_name else self._up
        start = time.perf_counter()
        call(bytes(view[s : s + CHUNK]) for s in range(0, self.size, CHUNK))
        return time.perf_counter() - start

    def close(self) -> None:
        self.channel.close()
        self.proc.kill()
        self.proc.wait()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
