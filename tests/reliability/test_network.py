"""Several hosts on one machine: the coordinator and three workers each in a network namespace of their own,
joined by veth pairs to a bridge in a fifth one; the worker links are impaired with tc (netem delay and loss),
and one link is cut during that worker's upload. The run completes. Needs root (CI runs as root)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.reliability.support import DATA, DECODER_BYTES, RUN, rounds_log, wait_until
from tools.system_packages import skip_reason

pytestmark = [pytest.mark.network, pytest.mark.e2e]

SUBNET = "10.231.0"  # exists only inside the namespaces this test creates; nothing leaves them
COORDINATOR_IP = f"{SUBNET}.1"
PORT = 50051  # the coordinator's namespace is its own host: nothing else listens there
NETEM = "netem delay 50ms loss 2%"
LOSS = 0.02
# Without sch_netem (some kernels): 2% random loss by a classic-BPF classifier (`ld rand`, the SKF_AD_RANDOM
# ancillary load) that sends packets to a class whose pfifo holds nothing, under an 8 Mbit/s htb limit.
RANDOM_LOSS_BPF = f"4,32 0 0 {2**32 - 0x1000 + 56},37 1 0 {int(LOSS * 2**32)},6 0 0 {2**32 - 1},6 0 0 0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _in(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=check, capture_output=True, text=True)


class Lab:
    """Namespaces `<tag>-bridge` and one per host, deleted with their links and processes by `close`."""

    def __init__(self, tag: str):
        self.tag = tag
        self.bridge = f"{tag}-bridge"
        self.hosts: dict[str, tuple[str, str]] = {}  # host -> (namespace, bridge port)
        self.processes: list[subprocess.Popen] = []
        self.namespaces: list[str] = []

    def create_bridge(self) -> None:
        self._add_namespace(self.bridge)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def add_host(self, host: str, address: str) -> None:
        ns, port = f"{self.tag}-{host}", f"p{len(self.hosts)}"
        self._add_namespace(ns)
        _ip("-n", self.bridge, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.bridge, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        self.hosts[host] = (ns, port)

    def impair(self, host: str) -> str:
        """Delay and loss in both directions of the host's link (its eth0, and its port on the bridge)."""
        ns, port = self.hosts[host]
        ends = [(ns, "eth0"), (self.bridge, port)]
        if all(_in(n, "tc", "qdisc", "add", "dev", dev, "root", *NETEM.split(), check=False).returncode == 0 for n, dev in ends):
            return NETEM
        for n, dev in ends:
            _in(n, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            tc = ["tc"]
            _in(n, *tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10", "r2q", "100")
            _in(n, *tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", "8mbit")
            _in(n, *tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:20", "htb", "rate", "8mbit")
            _in(n, *tc, "qdisc", "add", "dev", dev, "parent", "1:20", "handle", "20:", "pfifo", "limit", "0")
            _in(n, *tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "all", "prio", "1", "bpf", "bytecode", RANDOM_LOSS_BPF, "classid", "1:20")
        return f"htb 8mbit + {LOSS:.0%} random loss (no sch_netem in this kernel: no added delay)"

    def dropped(self, host: str) -> int:
        """Packets the impairment dropped on the host's link so far."""
        ns, port = self.hosts[host]
        total = 0
        for n, dev in ((ns, "eth0"), (self.bridge, port)):
            out = _in(n, "tc", "-s", "-j", "qdisc", "show", "dev", dev).stdout
            total += sum(q.get("drops", 0) for q in json.loads(out) if q.get("kind") in ("netem", "pfifo"))
        return total

    def set_link(self, host: str, state: str) -> None:
        """Pull (down) or plug back (up) the host's cable at the bridge."""
        _ip("-n", self.bridge, "link", "set", self.hosts[host][1], state)

    def start(self, host: str, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[host][0], sys.executable, "-m", "feddiff", *args],  # `ip` execs: same pid
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
            )
        self.processes.append(proc)
        return proc

    def scrape(self, host: str, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """/metrics of a process in the host's namespace, fetched from inside it."""
        fetch = f"import sys, urllib.request; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"
        text = _in(self.hosts[host][0], sys.executable, "-S", "-c", fetch).stdout
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    for command in ("ip", "tc"):
        if shutil.which(command) is None:
            pytest.skip(skip_reason(command))
    lab = Lab(f"fd{secrets.token_hex(3)}")  # unique per run: parallel runs do not collide
    try:
        try:
            lab.create_bridge()
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot create network namespaces here: {e.stderr.strip()}")
        yield lab
    finally:
        lab.close()


def _ready(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 60) -> dict:
    wait_until(lambda: path.exists() or proc.poll() is not None, f"{path.name}", timeout)
    if not path.exists():
        raise RuntimeError(f"exited with {proc.returncode} before it was ready:\n{log.read_text()[-3000:]}")
    return json.loads(path.read_text())


def _impaired_hosts(lab: Lab, workers: list[str]) -> dict[str, str]:
    """The coordinator's host and the workers', each worker's link impaired; how each link is shaped."""
    lab.add_host("coordinator", COORDINATOR_IP)
    for i, w in enumerate(workers):
        lab.add_host(w, f"{SUBNET}.{11 + i}")
    shaping = {w: lab.impair(w) for w in workers}
    if shaping["client-0"] != NETEM:
        warnings.warn(f"sch_netem is missing: worker links shaped with {shaping['client-0']}", stacklevel=1)
    return shaping


def _start_coordinator(lab: Lab, tmp_path: Path, ckpt: Path, rounds_total: int) -> subprocess.Popen:
    """`rounds_total` rounds of 3 workers closing at quorum 0.6, on the coordinator's host; once it is ready."""
    coordinator = lab.start(
        "coordinator",
        [
            "coordinator", "--insecure", *RUN, "--rounds", str(rounds_total), "--min-workers", "3", "--quorum", "0.6",
            "--round-deadline", "40", "--heartbeat-interval", "1", "--heartbeat-timeout", "15", "--progress", "log",
            "--listen", f"{COORDINATOR_IP}:{PORT}", "--metrics-port", "0", "--checkpoint-dir", str(ckpt),
            "--exit-when-done", "--ready-file", str(tmp_path / "coordinator.ready.json"),
        ],
        tmp_path / "coordinator.log",
    )  # fmt: skip
    _ready(tmp_path / "coordinator.ready.json", coordinator, tmp_path / "coordinator.log")
    return coordinator


def _start_workers(lab: Lab, tmp_path: Path, workers: list[str]) -> tuple[dict[str, subprocess.Popen], dict[str, dict]]:
    """Each worker on its host, client-2's uploads paced; the processes and, once each is ready, its ready file."""
    procs, ready = {}, {}
    for i, w in enumerate(workers):
        pacing = ["--upload-rate-limit", "40000"] if w == "client-2" else []  # its upload lasts ~4 s: time to cut it
        procs[w] = lab.start(
            w,
            [
                "worker", "--insecure", "--coordinator", f"{COORDINATOR_IP}:{PORT}", "--worker-id", w, "--client-index", str(i),
                "--num-clients", "3", *DATA, "--state-dir", str(tmp_path / w), "--metrics-port", "0", "--progress", "log",
                "--ready-file", str(tmp_path / f"{w}.ready.json"), *pacing,
            ],
            tmp_path / f"{w}.log",
        )  # fmt: skip
    for w in workers:
        ready[w] = _ready(tmp_path / f"{w}.ready.json", procs[w], tmp_path / f"{w}.log")
    return procs, ready


def _failed(processes: dict[str, subprocess.Popen], logs: Path) -> bool:
    """False, unless a process exited with an error: then that error (`failed() or done` waits for done)."""
    for name, p in processes.items():
        if p.poll() not in (None, 0):
            raise RuntimeError(f"{name} exited with {p.returncode}:\n{(logs / f'{name}.log').read_text()[-3000:]}")
    return False


def test_run_completes_over_impaired_links_with_a_link_cut_during_an_upload(lab: Lab, tmp_path: Path) -> None:
    rounds_total = 3
    workers = ["client-0", "client-1", "client-2"]
    shaping = _impaired_hosts(lab, workers)
    ckpt = tmp_path / "checkpoints"
    coordinator = _start_coordinator(lab, tmp_path, ckpt, rounds_total)
    procs, ready = _start_workers(lab, tmp_path, workers)
    everyone = {"coordinator": coordinator, **procs}

    def failed() -> bool:
        return _failed(everyone, tmp_path)

    def uploaded(w: str) -> float:
        return lab.scrape(w, ready[w]["metrics_port"]).get(("feddiff_wire_bytes_total", (("direction", "up"),)), 0.0)

    wait_until(lambda: failed() or len(rounds_log(ckpt)) >= 1, "round 1", 180)
    after_round_1 = uploaded("client-2")
    wait_until(lambda: failed() or uploaded("client-2") > after_round_1, "client-2's round 2 upload", 120, every=0.1)
    lab.set_link("client-2", "down")
    sent_before_cut = uploaded("client-2") - after_round_1
    cut_during = len(rounds_log(ckpt))
    time.sleep(3)
    lab.set_link("client-2", "up")

    for name, p in everyone.items():
        assert p.wait(240) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    rounds = rounds_log(ckpt)
    assert cut_during == 1, "the link was cut while round 2 was open"
    assert 0 < sent_before_cut < DECODER_BYTES, f"cut after {sent_before_cut} of ~{DECODER_BYTES} bytes: not mid-upload"
    assert [r["round"] for r in rounds] == list(range(1, rounds_total + 1))
    assert all(len(r["participants"]) >= 2 for r in rounds), "every round closed with quorum"
    assert "client-2" in rounds[-1]["participants"], "the cut worker is back by the last round"
    assert (ckpt / "final.safetensors").exists()
    assert sum(lab.dropped(w) for w in workers) > 0, f"the impairment ({shaping['client-0']}) dropped packets"
