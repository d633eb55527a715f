"""Calls that hold the coordinator's transport, against a real `feddiff coordinator` process, before any
authentication: request messages announced large and never finished (on the worker-facing port and on the
health port), downloads opened and never read, a flood of long polls from one session, and the run's status
asked without the operator's token. Each test checks what matters: the coordinator's memory (VmRSS), health
checks answered within 100 ms throughout, and the honest worker's round committed with exactly its delta."""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import yaml

from bench.common import rss_bytes
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2_grpc as pb_grpc
from fedcore.wire.stream import DEFAULT_CHUNK_SIZE, request_limit
from feddiff.local import Process
from tests.reliability.hostile_run import HEALTH_LIMIT, IMAGES, Honest, committed, coordinator_process, probes_address
from tests.reliability.support import HealthProbe, metric, wait_until
from tests.system.raw_client import RawWorker
from tests.system.raw_http2 import RawConnection, RawStream

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

Code = grpc.StatusCode
MIB = 1 << 20
ANNOUNCED = 4 << 20  # what each hostile request announces: gRPC's usual message limit
SLACK = 16 * MIB  # RSS growth allowed on top of what the bounds let the streams hold (allocator, threads)
ROUND = 32 * MIB  # the same once the round ran (its aggregate, its checkpoint written)


def _refusals(coord: Process, rpc: str, outcome: str) -> float:
    return metric(coord.ready["metrics_port"], "feddiff_refusals_total", rpc=rpc, outcome=outcome)


def _announce(connections: list[RawConnection], path: str, calls: int, size: int, seconds: float = 2.0) -> list[RawStream]:
    """`calls` calls of `path` spread over `connections`, each announcing a request of `size` bytes and sending
    all of it but its last byte, as far as the coordinator's flow control lets it, for `seconds`."""
    streams = [connections[i % len(connections)].start_call(path, size) for i in range(calls)]
    for c in connections:
        c.pump(seconds / len(connections))
    time.sleep(0.5)  # what arrived is read
    return streams


def _close(connections: list[RawConnection]) -> None:
    for c in connections:
        c.close()


# --- requests announced and never finished --------------------------------------------------------------------
def test_requests_announced_and_never_finished_hold_bounded_memory(tmp_path: Path) -> None:
    """On the health port every request announced larger than a health check is refused on its length prefix;
    on the worker-facing port every one larger than the run's largest request. Requests announced within that
    limit and never finished are held at most `max_streams_per_connection` per connection and
    `max_concurrent_rpcs` in all (the rest refused), and the honest worker's round completes beside them."""
    per_connection, calls_at_once = 8, 64
    limit = request_limit(DEFAULT_CHUNK_SIZE, grids=False)
    args = ["--min-workers", "1", "--round-deadline", "120"]
    args += ["--max-streams-per-connection", str(per_connection), "--max-concurrent-rpcs", str(calls_at_once)]
    with coordinator_process(tmp_path, *args) as (coord, channel):
        pid, address, probes = coord.ready["pid"], coord.ready["address"], probes_address(coord)
        good = Honest(RawWorker(channel, "good", IMAGES))
        good.worker.join()
        growth: dict[str, int] = {}
        with HealthProbe(probes) as health:
            time.sleep(0.5)
            idle = rss_bytes(pid)

            health_port = [RawConnection(probes) for _ in range(4)]
            on_health_port = _announce(health_port, "/grpc.health.v1.Health/Check", 100, ANNOUNCED)
            growth["health port, 100 x 4 MiB"] = rss_bytes(pid) - idle
            main_port = [RawConnection(address) for _ in range(4)]
            too_large = _announce(main_port, "/feddiff.v1.Coordinator/GetStatus", 50, ANNOUNCED)
            too_large += _announce(main_port, "/feddiff.v1.Coordinator/UploadUpdate", 50, ANNOUNCED)
            growth["worker port, 100 x 4 MiB"] = rss_bytes(pid) - idle
            wait_until(lambda: all(s.reset is not None or s.ended for s in on_health_port + too_large), "every request beyond the limit refused", 10)
            _close(health_port + main_port)

            held = [RawConnection(address) for _ in range(4)]  # 4 x 8 streams held, the rest refused by HTTP/2
            within = _announce(held, "/feddiff.v1.Coordinator/UploadUpdate", 16, limit)  # before their first message
            within += _announce(held, "/feddiff.v1.Coordinator/GetStatus", 84, limit)
            growth["worker port, 4 connections x 8 held"] = rss_bytes(pid) - idle
            good.take_task()
            assert good.upload().outcome == "accepted"
            wait_until(lambda: committed(tmp_path), "round 1 committed", 30)

            more = [RawConnection(address) for _ in range(8)]  # 96 streams wanted: max_concurrent_rpcs (64) bounds them
            beyond = _announce(more, "/feddiff.v1.Coordinator/GetStatus", 64, limit)
            growth["worker port, 12 connections x 8 wanted"] = rss_bytes(pid) - idle
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.CoordinatorStub(channel).GetStatus(pb.StatusRequest(), timeout=10)
            _close(held + more)
            wait_until(lambda: pb_grpc.CoordinatorStub(channel).GetStatus(pb.StatusRequest(), timeout=10), "status answered again", 10)

    print({what: f"{bytes_ // MIB} MiB" for what, bytes_ in growth.items()})
    assert growth["health port, 100 x 4 MiB"] < SLACK
    assert growth["worker port, 100 x 4 MiB"] < SLACK
    assert sum(s.reset is None and not s.ended for s in within) == 4 * per_connection
    assert growth["worker port, 4 connections x 8 held"] < 4 * per_connection * limit + SLACK
    assert sum(s.ended for s in beyond) >= 96 - calls_at_once, "max_concurrent_rpcs refused none"
    assert growth["worker port, 12 connections x 8 wanted"] < calls_at_once * limit + ROUND
    assert refused.value.code() == Code.RESOURCE_EXHAUSTED
    good.assert_round_change_is_its_delta(tmp_path / "checkpoints")
    health.assert_answered_within(HEALTH_LIMIT)


# --- downloads never read -------------------------------------------------------------------------------------
def test_downloads_never_read_hold_one_stream_cut_when_idle_and_at_the_round_close(tmp_path: Path) -> None:
    """300 downloads of its task opened at once by one worker and never read: one is written, the others are
    refused (RESOURCE_EXHAUSTED, `download_in_progress`), the one is cut after the idle timeout (`stalled`),
    the coordinator's memory stays flat. One more, opened then, ends with the round (`late`). The honest
    worker's round completes."""
    idle_timeout = 12.0  # longer than the round takes once the download is open
    args = ["--min-workers", "2", "--round-deadline", "120", "--download-idle-timeout", str(idle_timeout)]
    with coordinator_process(tmp_path, *args) as (coord, channel):
        pid, address = coord.ready["pid"], coord.ready["address"]
        good, bad = Honest(RawWorker(channel, "good", IMAGES)), RawWorker(channel, "bad", IMAGES)
        good.worker.join()
        bad.join()
        with HealthProbe(probes_address(coord)) as health:
            task = bad.wait_task()
            time.sleep(0.5)
            idle = rss_bytes(pid)
            request = pb.DownloadRequest(session_id=bad.session_id, task_id=task.task_id).SerializeToString()
            connections = [RawConnection(address) for _ in range(4)]
            streams = [connections[i % 4].call("/feddiff.v1.Coordinator/DownloadWeights", request) for i in range(300)]
            opened = time.monotonic()
            wait_until(lambda: _refusals(coord, "DownloadWeights", "download_in_progress") == 299, "299 downloads refused", 30)
            held = rss_bytes(pid) - idle
            wait_until(lambda: _refusals(coord, "DownloadWeights", "stalled") == 1, "the download cut off", idle_timeout + 10)
            cut_after = time.monotonic() - opened
            last = connections[0].call("/feddiff.v1.Coordinator/DownloadWeights", request)  # the cut one's place is free
            time.sleep(0.5)
            refused = _refusals(coord, "DownloadWeights", "download_in_progress")
            good.take_task()
            assert good.upload().outcome == "accepted"
            bad.stub.RejectTask(pb.RejectTaskRequest(session_id=bad.session_id, task_id=task.task_id, reason="other", message="never read"), timeout=10)
            wait_until(lambda: committed(tmp_path), "round 1 committed", 30)
            wait_until(lambda: _refusals(coord, "DownloadWeights", "late") == 1, "the download ended with its round", 10)
            after = rss_bytes(pid) - idle
            _close(connections)
        log = coord.output()

    print(f"coordinator RSS over idle: {held // MIB} MiB with 300 downloads opened, {after // MIB} MiB after")
    assert sum(s.ended for s in streams) == 299 and not last.ended  # refused at once; ended unread, with no status
    assert refused == 299
    assert "Traceback" not in log, log[-3000:]
    assert idle_timeout - 0.5 < cut_after < idle_timeout + 5
    assert held < SLACK and after < ROUND
    good.assert_round_change_is_its_delta(tmp_path / "checkpoints")
    health.assert_answered_within(HEALTH_LIMIT)


# --- a flood of long polls ------------------------------------------------------------------------------------
FLOOD = 5000


class Flood:
    """FLOOD long polls of one session at once (60 s each) over 4 connections, from a thread of their own:
    `outcomes` (each call's outcome or status code, in the order they came back) grows as they are answered."""

    def __init__(self, address: str, session_id: str):
        self.address, self.session_id = address, session_id
        self.outcomes: list[str] = []
        self.errors: list[str] = []
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),))

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(120)

    async def _run(self) -> None:
        channels = [grpc.aio.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)]
        stubs = [pb_grpc.CoordinatorStub(c) for c in channels]

        async def poll(i: int) -> None:
            try:
                reply = await stubs[i % 4].WaitTask(pb.WaitTaskRequest(session_id=self.session_id, timeout_ms=60_000), timeout=120)
                self.outcomes.append(str(reply.WhichOneof("outcome")))
            except grpc.aio.AioRpcError as e:
                self.outcomes.append(e.code().name)
                self.errors.append(f"{e.code().name}: {e.details()}")

        try:
            await asyncio.gather(*(poll(i) for i in range(FLOOD)))
        finally:
            for c in channels:
                await c.close()


def _heartbeats_until(worker: RawWorker, done: Callable[[], bool], timeout: float) -> list[str]:
    """The worker's heartbeats, one every 50 ms until `done()` (TimeoutError after `timeout` s): each one's
    status code."""
    deadline, codes = time.monotonic() + timeout, []
    while not done():
        assert time.monotonic() < deadline, f"not done after {timeout} s"
        try:
            worker.stub.Heartbeat(pb.HeartbeatRequest(session_id=worker.session_id), timeout=10)
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
        time.sleep(0.05)
    return codes


def test_a_session_flooding_long_polls_holds_one_and_the_honest_poll_is_kept(tmp_path: Path) -> None:
    """5000 long polls of one session: each newer one answers the older at once (Idle), so all but the last
    are answered in seconds, not at the polls' 60 s timeout; the honest worker's long poll, open throughout,
    gets its task when the round opens, its heartbeats meanwhile are answered, and its round completes."""
    with coordinator_process(tmp_path, "--min-workers", "3", "--quorum", "0.3", "--round-deadline", "120") as (coord, channel):
        good, bad, third = Honest(RawWorker(channel, "good", IMAGES)), RawWorker(channel, "bad", IMAGES), RawWorker(channel, "third", IMAGES)
        good.worker.join()
        bad.join()
        with HealthProbe(probes_address(coord)) as health:
            polling = threading.Thread(target=good.take_task, args=(90.0,))
            polling.start()
            start = time.monotonic()
            with Flood(coord.ready["address"], bad.session_id) as flood:
                beats = _heartbeats_until(good.worker, lambda: len(flood.outcomes) >= FLOOD - 1, 50)
                flooded = time.monotonic() - start
                third.join()  # the round opens: the flood's last poll and the honest one get their tasks
            polling.join(100)
            assert not polling.is_alive()
            assert good.upload().outcome == "accepted"
            for w in (bad, third):
                w.stub.RejectTask(pb.RejectTaskRequest(session_id=w.session_id, task_id=w.wait_task().task_id, reason="other", message="x"), timeout=10)
            wait_until(lambda: committed(tmp_path), "round 1 committed", 30)

    print(f"{FLOOD - 1} of {FLOOD} long polls of one session answered in {flooded:.1f} s; errors: {collections.Counter(flood.errors).most_common(3)}")
    # Beyond a connection's 100 streams (max_streams_per_connection), HTTP/2 refuses the client's burst
    # (REFUSED_STREAM: UNAVAILABLE); every poll the coordinator took but the last was answered Idle at once.
    assert set(flood.outcomes[:-1]) <= {"idle", "UNAVAILABLE"} and flood.outcomes.count("idle") >= FLOOD // 4
    assert flood.outcomes[-1] == "task"
    assert len(beats) >= 5 and set(beats) == {"OK"}, collections.Counter(beats)
    good.assert_round_change_is_its_delta(tmp_path / "checkpoints")
    health.assert_answered_within(HEALTH_LIMIT)


# --- the run's status -----------------------------------------------------------------------------------------
def _status(address: str, *token_file: str) -> subprocess.CompletedProcess[str]:
    flags = ["--token-file", token_file[0]] if token_file else []
    return subprocess.run([sys.executable, "-m", "feddiff", "status", "--address", address, *flags], check=False, capture_output=True, text=True, timeout=60)


def test_status_needs_the_operators_token_where_workers_have_tokens(tmp_path: Path) -> None:
    """With worker tokens and without mutual TLS, GetStatus needs the operator's status token: without a token,
    or with a worker's, it is UNAUTHENTICATED and lists nobody; `feddiff status --token-file` shows the run.
    Without a status token configured, nobody gets the status. Without tokens, anyone still does."""
    tokens, status_token = tmp_path / "tokens.yaml", tmp_path / "status.token"
    tokens.write_text(yaml.safe_dump({"good": "worker-secret"}))
    status_token.write_text("operator-secret\n")
    worker_token = tmp_path / "worker.token"
    worker_token.write_text("worker-secret")
    secured = ["--tokens-file", str(tokens), "--min-workers", "2"]
    with coordinator_process(tmp_path / "a", *secured, "--status-token-file", str(status_token)) as (coord, channel):
        good = RawWorker(channel, "good", IMAGES, metadata=(("authorization", "Bearer worker-secret"),))
        good.join()
        address = coord.ready["address"]
        calls = {}
        for name, metadata in {"none": (), "worker": good.metadata, "wrong": (("authorization", "Bearer guess"),)}.items():
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.CoordinatorStub(channel).GetStatus(pb.StatusRequest(), timeout=10, metadata=metadata)
            calls[name] = e.value.code()
        answer = pb_grpc.CoordinatorStub(channel).GetStatus(pb.StatusRequest(), timeout=10, metadata=(("authorization", "Bearer operator-secret"),))
        tool, tool_without, tool_as_worker = _status(address, str(status_token)), _status(address), _status(address, str(worker_token))
        refused = _refusals(coord, "GetStatus", "unauthenticated")
    with coordinator_process(tmp_path / "b", *secured) as (coord, channel):
        no_status_token = _status(coord.ready["address"], str(status_token))
    with coordinator_process(tmp_path / "c", "--min-workers", "2") as (coord, channel):
        open_run = _status(coord.ready["address"])

    assert calls == {"none": Code.UNAUTHENTICATED, "worker": Code.UNAUTHENTICATED, "wrong": Code.UNAUTHENTICATED}
    assert [w.worker_id for w in answer.workers] == ["good"]
    assert tool.returncode == 0 and "good" in tool.stdout, tool.stderr
    for refusal in (tool_without, tool_as_worker, no_status_token):
        assert refusal.returncode == 1 and "UNAUTHENTICATED" in refusal.stderr and "good" not in refusal.stdout
    assert refused == 5
    assert open_run.returncode == 0, open_run.stderr
