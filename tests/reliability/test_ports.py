"""One process per port: a coordinator or worker started on a port another one listens on exits at once with
one line naming the flag and the address, and the first one goes on serving; port 0 still picks a free port."""

from __future__ import annotations

import asyncio
import os
import re
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


def _ipv6_loopback() -> str:
    """Why ::1 cannot be listened on here ('' when it can)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        return f"no IPv6 loopback on this host ({e.strerror or e})"
    return ""


def _listening(ip: str, port: int = 0) -> socket.socket:
    """A socket of another 'process' listening on ip:port (port 0: a free one)."""
    holder = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    holder.bind((ip, port))
    holder.listen()
    return holder


def _free_on_both_loopbacks() -> int:
    """A port free on 127.0.0.1 and on ::1 (tried until one is)."""
    for _ in range(50):
        with _listening("127.0.0.1") as v4:
            port = int(v4.getsockname()[1])
        try:
            with _listening("::1", port):
                return port
        except OSError:
            continue
    raise AssertionError("no port free on both loopbacks")


@pytest.mark.parametrize("held", ["::1", "127.0.0.1"])
def test_localhost_covers_both_loopbacks(held: str) -> None:
    """'localhost' is both loopbacks to gRPC (and to clients), whatever /etc/hosts says: a port another process
    holds on either one is refused, naming the address it holds."""
    if _ipv6_loopback():
        pytest.skip(_ipv6_loopback())
    port = _free_on_both_loopbacks()
    shown = f"[{held}]:{port}" if ":" in held else f"{held}:{port}"
    refusal = rf"^--listen localhost:{port}: address already in use \(another process listens on {re.escape(shown)}\)$"
    with _listening(held, port), pytest.raises(CannotListen, match=refusal):
        check_free("--listen", "localhost", port)
    check_free("--listen", "localhost", port)  # free again


def test_a_wildcard_covers_the_ipv6_addresses_of_its_port() -> None:
    """gRPC listens on a wildcard dual-stack and falls back to IPv4 alone when another process holds an IPv6
    address of the port; the metrics endpoint listens on 0.0.0.0: either would start beside that process."""
    if _ipv6_loopback():
        pytest.skip(_ipv6_loopback())
    port = _free_on_both_loopbacks()
    with _listening("::1", port):
        for host in ("0.0.0.0", "::", ""):
            with pytest.raises(CannotListen, match=rf"--metrics-port {host}:{port}: address already in use"):
                check_free("--metrics-port", host, port)


def test_an_explicit_address_is_that_address_alone() -> None:
    """127.0.0.1 and ::1 are two listeners that clients tell apart: one held does not refuse the other."""
    port = _free_on_both_loopbacks() if not _ipv6_loopback() else 0
    with _listening("127.0.0.1", port) as holder:
        port = int(holder.getsockname()[1])
        with pytest.raises(CannotListen, match=rf"^--listen 127\.0\.0\.1:{port}: address already in use \(another process listens there\)$"):
            check_free("--listen", "127.0.0.1", port)
        if not _ipv6_loopback():
            check_free("--listen", "::1", port)


def test_a_default_port_that_is_taken_says_it_is_the_default() -> None:
    with _listening("127.0.0.1") as holder:
        port = int(holder.getsockname()[1])
        with pytest.raises(CannotListen) as e:
            check_free("--metrics-port", "127.0.0.1", port, default=True)
    assert (
        str(e.value)
        == f"--metrics-port 127.0.0.1:{port} (the default): address already in use (another process listens there); pass --metrics-port to choose another port"
    )


@pytest.mark.parametrize("flag", ["--listen", "--health-port", "--metrics-port"])
def test_a_coordinator_on_localhost_exits_when_another_process_holds_the_port_on_ipv6_loopback(flag: str, tmp_path: Path) -> None:
    """Real processes: a coordinator whose --listen is localhost (its health port too) or whose metrics port
    is the wildcard's, while another process listens on [::1] of that port: one line, exit 1, nothing set up."""
    if _ipv6_loopback():
        pytest.skip(_ipv6_loopback())
    port = _free_on_both_loopbacks()
    ports = {"--listen": "localhost:0", "--health-port": "0", "--metrics-port": "0"}
    ports[flag] = f"localhost:{port}" if flag == "--listen" else str(port)
    with _listening("::1", port):
        done = _feddiff("coordinator", *COORDINATOR, "--checkpoint-dir", str(tmp_path / "ckpt"), *(x for kv in ports.items() for x in kv), cwd=tmp_path)

    line = _one_line(done)
    assert line.startswith(f"feddiff coordinator: error: {flag} ") and f":{port}: address already in use (another process listens on " in line, line
    assert f"[::1]:{port}" in line or f"an IPv6 address of port {port}" in line, line
    assert not (tmp_path / "ckpt").exists()
