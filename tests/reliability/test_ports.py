"""One process per port: a coordinator or worker started on a port another one listens on exits at once with
one line naming the flag and the address, and the first one goes on serving; port 0 still picks a free port."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator, add_port
from fedcore.errors import CannotListen
from feddiff.local import LocalCluster, scrape, status
from service.health import health_check
from service.ports import check_free
from tests.reliability.support import ENV, image_folder

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

COORDINATOR = ["--insecure", "--model", "tiny", "--progress", "off"]


def _feddiff(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ENV}
    return subprocess.run([sys.executable, "-m", "feddiff", *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env, check=False)


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{done.stderr}"
    return lines[0]


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_check(channel)(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.mark.parametrize("flag", ["--listen", "--health-port", "--metrics-port"])
def test_a_second_coordinator_on_a_taken_port_exits_with_one_line_and_the_first_serves_on(flag: str, tmp_path: Path) -> None:
    with LocalCluster(tmp_path, env=ENV) as cluster:
        first = cluster.coordinator(*COORDINATOR, "--health-port", "0")
        address = first.ready["address"]
        port = {"--listen": int(address.rsplit(":", 1)[1]), "--health-port": first.ready["health_port"], "--metrics-port": first.ready["metrics_port"]}[flag]
        ports = {"--listen": "127.0.0.1:0", "--health-port": "0", "--metrics-port": "0"}
        ports[flag] = f"127.0.0.1:{port}" if flag == "--listen" else str(port)

        second = _feddiff("coordinator", *COORDINATOR, "--checkpoint-dir", str(tmp_path / "second"), *(x for kv in ports.items() for x in kv), cwd=tmp_path)

        line = _one_line(second)
        assert f"{flag} " in line and f":{port}" in line and "already in use" in line, line
        assert not (tmp_path / "second").exists(), "the second coordinator stopped before setting anything up"
        assert status(address)["state"] == "waiting_for_workers"
        assert _health(address) == health_pb2.HealthCheckResponse.SERVING
        assert _health(f"127.0.0.1:{first.ready['health_port']}") == health_pb2.HealthCheckResponse.SERVING
        assert scrape(first.ready["metrics_port"])
        assert first.proc.poll() is None


def test_coordinators_on_port_zero_each_get_a_free_port(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, env=ENV) as cluster:
        a = cluster.coordinator(*COORDINATOR, "--health-port", "0", name="a")
        b = cluster.coordinator(*COORDINATOR, "--health-port", "0", "--checkpoint-dir", str(tmp_path / "b"), name="b")

        assert a.ready["address"] != b.ready["address"]
        assert a.ready["metrics_port"] != b.ready["metrics_port"] and a.ready["health_port"] != b.ready["health_port"]
        assert status(a.ready["address"])["state"] == status(b.ready["address"])["state"] == "waiting_for_workers"


def test_a_second_worker_on_a_taken_metrics_port_exits_with_one_line_and_the_first_serves_on(tmp_path: Path) -> None:
    images = image_folder(tmp_path / "images", n=4)
    nobody = "127.0.0.1:9"  # no coordinator: the first worker retries with backoff and serves its metrics meanwhile
    with LocalCluster(tmp_path, env=ENV) as cluster:
        first = cluster.worker(nobody, "w1", "--insecure", "--data-dir", str(images))
        port = first.ready["metrics_port"]

        second = _feddiff(
            "worker",
            "--coordinator",
            nobody,
            "--insecure",
            "--data-dir",
            str(images),
            "--state-dir",
            str(tmp_path / "w2"),
            "--metrics-port",
            str(port),
            cwd=tmp_path,
        )

        line = _one_line(second)
        assert f"--metrics-port 0.0.0.0:{port}: address already in use" in line, line
        assert scrape(port) and first.proc.poll() is None


def test_the_coordinator_shares_none_of_its_ports(tmp_path: Path) -> None:
    """gRPC's default SO_REUSEPORT is off: even a process that asks to share a port cannot bind it."""
    cfg = CoordinatorConfig(model="tiny", listen="127.0.0.1:0", health_port=0, metrics_port=-1, insecure=True, progress="off", checkpoint_dir=str(tmp_path))
    coord = Coordinator(cfg, Metrics()).start()
    try:
        for port in (coord.port, coord.health_port):
            with socket.socket(socket.AF_INET6) as sharing:
                sharing.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                with pytest.raises(OSError, match="in use"):
                    sharing.bind(("::ffff:127.0.0.1", port))
    finally:
        coord.stop(grace=0)


def test_a_port_taken_after_the_check_is_still_refused_by_name() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        async def bind() -> None:
            server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            try:
                add_port(server, "--listen", f"127.0.0.1:{port}")
            finally:
                await server.stop(0)

        with pytest.raises(CannotListen, match=f"--listen 127.0.0.1:{port}: address already in use"):
            asyncio.run(bind())


def test_the_check_names_other_reasons_and_leaves_off_and_free_ports_alone() -> None:
    check_free("--metrics-port", "0.0.0.0", -1)
    check_free("--metrics-port", "0.0.0.0", 0)
    with pytest.raises(CannotListen, match=r"--listen 192\.0\.2\.1:50051: cannot listen there: Cannot assign requested address"):
        check_free("--listen", "192.0.2.1", 50051)  # TEST-NET-1: an address no interface has
    with pytest.raises(CannotListen, match=r"--listen no-such-host\.invalid:50051: cannot listen there"):
        check_free("--listen", "no-such-host.invalid", 50051)


@pytest.mark.parametrize(
    ("health", "metrics", "named"), [("P", "0", "--health-port P: the same port as --listen"), ("0", "P", "--metrics-port P: the same port as --listen")]
)
def test_one_port_given_to_two_listeners_of_a_coordinator_is_refused_before_anything_binds(health: str, metrics: str, named: str, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    ports = ["--listen", f"127.0.0.1:{port}", "--health-port", health.replace("P", port), "--metrics-port", metrics.replace("P", port)]

    line = _one_line(_feddiff("coordinator", *COORDINATOR, "--checkpoint-dir", str(tmp_path / "ckpt"), *ports, cwd=tmp_path))

    assert line.endswith(f"{named.replace('P', port)}; each listener needs its own port"), line
    assert not (tmp_path / "ckpt").exists()
