"""The real Prometheus server for tests: started on loopback with the shipped config and rules, queried over
its HTTP API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_config(targets: dict[str, list[str]]) -> dict:
    """deploy/prometheus/prometheus.yml with 1 s intervals, absolute rule files and loopback targets."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str((PROM_CONFIG.parent / f).resolve()) for f in cfg["rule_files"]]
    assert {job["job_name"] for job in cfg["scrape_configs"]} == set(targets)
    for job in cfg["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return cfg


@dataclass
class PrometheusAPI:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log: Path

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector; fails with Prometheus's own error for a bad query."""
        request = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            body = json.loads(urllib.request.urlopen(request, timeout=5).read())
        except urllib.error.HTTPError as e:  # 400/422 carry {"status": "error", "error": ...}
            body = json.loads(e.read())
        assert body["status"] == "success", f"{expr}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        """The single sample of `expr`, or None while it is empty."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def wait_until(self, expr: str, timeout: float = 30.0) -> float:
        """Poll until `expr` returns a sample; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.scalar(expr)
            if value is not None:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"{expr} still empty after {timeout}s")


def start_prometheus(config: Path, workdir: Path) -> PrometheusAPI:
    if PROMETHEUS is None:
        raise FileNotFoundError("the prometheus server is not installed (apt-get install prometheus)")
    port = free_port()
    log = workdir / "prometheus.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return PrometheusAPI(f"http://127.0.0.1:{port}", process, log)


def stop_prometheus(api: PrometheusAPI) -> None:
    api.process.terminate()
    try:
        api.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        api.process.kill()
        api.process.wait()
