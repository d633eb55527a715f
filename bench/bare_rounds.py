"""The floor of a round at scale: the calls of bench.rounds_scale's workers over bare gRPC, its reference.

N workers (threads in a few client processes, as in rounds_scale) take part in every round and sleep the
local work between receiving the payload and sending as many bytes back. The server is a grpc.aio server
like the coordinator's, with identity serializers and nothing else: no protobuf messages, no sessions, no
digests, no checks, no aggregation, no metrics. The first round opens once every worker waits for it, each
next one as soon as the last upload of the previous one is in. A round's overhead is its duration less the
local work: what the calls alone cost on this machine, with the workers' CPU beside the server's.

Two ways to talk (`--calls`):
- "feddiff": the three calls of a feddiff worker per round: a long poll for the round, a download of the
  payload in 1 MiB messages, an upload of as many bytes.
- "stream": one bidirectional stream per worker for the whole run, the payload in 1 MiB messages each way
  per round and nothing else: the least a protocol over gRPC could exchange.

    python -m bench.bare_rounds --workers 200 --calls stream
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc

from bench.bare_grpc import CHUNK, OPTIONS, _identity
from bench.report import emit, machine, median

SERVICE = "bare.Rounds"


class Rounds:
    """The server's side of the rounds: who waits for which round, uploads counted, durations kept."""

    def __init__(self, workers: int, rounds: int):
        self.workers = workers
        self.rounds = rounds
        self.round = -1
        self.waiting = 0
        self.uploads = 0
        self.started = 0.0
        self.durations: list[float] = []
        self.opened = asyncio.Condition()
        self.finished = asyncio.Event()

    def _open(self) -> None:
        self.round += 1
        self.uploads = 0
        self.started = time.monotonic()
        self.opened.notify_all()

    async def wait_for(self, round_index: int) -> None:
        async with self.opened:
            if round_index == 0:
                self.waiting += 1
                if self.waiting == self.workers:
                    self._open()
            await self.opened.wait_for(lambda: self.round >= round_index)

    async def uploaded(self) -> None:
        async with self.opened:
            self.uploads += 1
            if self.uploads == self.workers:
                self.durations.append(time.monotonic() - self.started)
                if len(self.durations) == self.rounds:
                    self.finished.set()
                else:
                    self._open()


async def serve(workers: int, rounds: int, size: int) -> None:
    """Prints the port, then (after `rounds` rounds) the durations as one JSON line."""
    payload = os.urandom(size)
    state = Rounds(workers, rounds)

    def messages() -> Iterator[bytes]:
        return (payload[start : start + CHUNK] for start in range(0, size, CHUNK))

    async def wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await state.wait_for(int(request))
        return b"go"

    async def down(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for message in messages():
            yield message

    async def up(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        async for _ in requests:
            pass
        await state.uploaded()
        return b"ok"

    async def session(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        incoming = aiter(requests)
        for r in range(rounds):
            await state.wait_for(r)
            for message in messages():
                yield message
            got = 0
            while got < size:
                got += len(await anext(incoming))
            await state.uploaded()

    handlers = {"request_deserializer": _identity, "response_serializer": _identity}
    methods = {
        "Wait": grpc.unary_unary_rpc_method_handler(wait, **handlers),
        "Down": grpc.unary_stream_rpc_method_handler(down, **handlers),
        "Up": grpc.stream_unary_rpc_method_handler(up, **handlers),
        "Session": grpc.stream_stream_rpc_method_handler(session, **handlers),
    }
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await state.finished.wait()
    print(json.dumps(state.durations), flush=True)
    await server.stop(1)


def run_clients(port: int, count: int, rounds: int, work: float, size: int, calls: str) -> None:
    """`count` workers as threads of this process, each over its own channel."""
    chunks = [os.urandom(min(CHUNK, size - s)) for s in range(0, size, CHUNK)]

    def feddiff_calls(channel: grpc.Channel) -> None:
        wait = channel.unary_unary(f"/{SERVICE}/Wait", request_serializer=_identity, response_deserializer=_identity)
        down = channel.unary_stream(f"/{SERVICE}/Down", request_serializer=_identity, response_deserializer=_identity)
        up = channel.stream_unary(f"/{SERVICE}/Up", request_serializer=_identity, response_deserializer=_identity)
        for r in range(rounds):
            wait(str(r).encode(), timeout=600)
            for _ in down(b""):
                pass
            time.sleep(work)
            up(iter(chunks))

    def one_stream(channel: grpc.Channel) -> None:
        outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        session = channel.stream_stream(f"/{SERVICE}/Session", request_serializer=_identity, response_deserializer=_identity)
        incoming = session(iter(outgoing.get, None), timeout=600)
        for _ in range(rounds):
            got = 0
            while got < size:
                got += len(next(incoming))
            time.sleep(work)
            for chunk in chunks:
                outgoing.put(chunk)
        outgoing.put(None)
        for _ in incoming:  # the server ends the stream after the last round
            pass

    def worker() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
            (feddiff_calls if calls == "feddiff" else one_stream)(channel)

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def overheads(workers: int, processes: int, rounds: int, work: float, size: int, calls: str = "feddiff") -> list[float]:
    """Each round's duration less the local work, in seconds; `calls`: "feddiff" or "stream"."""
    server = subprocess.Popen([sys.executable, "-m", "bench.bare_rounds", "--serve", str(workers), str(rounds), str(size)], stdout=subprocess.PIPE, text=True)
    clients: list[subprocess.Popen] = []
    try:
        assert server.stdout is not None  # stdout=PIPE
        port = server.stdout.readline().strip()
        per_process = -(-workers // processes)
        for first in range(0, workers, per_process):
            count = min(per_process, workers - first)
            cmd = [sys.executable, "-m", "bench.bare_rounds", "--client", port, str(count), str(rounds), str(work), str(size), calls]
            clients.append(subprocess.Popen(cmd))
        for c in clients:  # a worker ends after its last upload; the server prints the durations then
            if c.wait(timeout=60 + rounds * (work + 60)) != 0:
                raise RuntimeError(f"a bare client exited with {c.returncode}")
        durations = json.loads(server.stdout.readline())
    finally:
        for proc in (*clients, server):
            proc.kill()
            proc.wait()
    return [d - work for d in durations]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=200)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=float, default=2.0)
    p.add_argument("--size", type=int, default=575_804, help="payload bytes each way (default: the tiny model)")
    p.add_argument("--calls", choices=("feddiff", "stream"), default="feddiff")
    p.add_argument("--serve", nargs=3, type=int, metavar=("WORKERS", "ROUNDS", "SIZE"), help=argparse.SUPPRESS)
    p.add_argument("--client", nargs=6, metavar=("PORT", "COUNT", "ROUNDS", "WORK", "SIZE", "CALLS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(*args.serve))
        return 0
    if args.client:
        port, count, rounds, work, size, calls = args.client
        run_clients(int(port), int(count), int(rounds), float(work), int(size), calls)
        return 0
    overhead = overheads(args.workers, args.processes, args.rounds, args.work, args.size, args.calls)
    emit({**machine(), "workers": args.workers, "payload_bytes": args.size, "calls": args.calls, "bare_grpc_round_overhead_ms": median(overhead) * 1000})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
