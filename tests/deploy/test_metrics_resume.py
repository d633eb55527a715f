"""A coordinator killed after round 2 of 4 and resumed: everything that describes the run (bytes, parameters,
FedAvg-equivalent, updates and round attempts by outcome, completed rounds, the last round's loss) reads the
same before the kill and after the resume, on /metrics and in every shipped recording rule and dashboard
panel as the real Prometheus evaluates them; the finished run's reduction is fedcore's accounting."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fedcore.federation import checkpoint
from fedcore.federation.strategies import Strategy, account
from fedcore.model.unet import build_model, layout_of
from feddiff.local import LocalCluster, Process, scrape, status, wait_for_state
from tests.deploy.dashboard import dashboard_targets
from tests.deploy.prometheus_server import PROM_CONFIG, PROMETHEUS, PrometheusAPI, free_port, prometheus_config, start_prometheus, stop_prometheus
from tools.system_packages import skip_reason

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "feddiff.json"
COORDINATOR_JOB, WORKER_JOB = "feddiff-coordinator", "feddiff-workers"
REDUCTION_RULE = "feddiff:reduction_vs_fedavg:ratio"
K, R, SEED = 2, 4, 0
# Gauges that describe the run (the coordinator's): feddiff_run_* and these; its counters restart at zero.
RUN_GAUGES = ("feddiff_round", "feddiff_rounds_planned", "feddiff_round_mean_loss")

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.e2e,
    pytest.mark.faults,
    pytest.mark.skipif(PROMETHEUS is None, reason=skip_reason("prometheus")),
]


def run_queries() -> dict[str, str]:
    """Every recording rule that reads no rate, and every dashboard query that describes the run: not a rate,
    not live state (connected workers), not the workers' own gauges (this test scrapes the coordinator only)."""
    rules = yaml.safe_load((PROM_CONFIG.parent / "rules" / "recording.yml").read_text())
    queries = {r["record"]: r["record"] for g in rules["groups"] for r in g["rules"] if "rate(" not in r["expr"]}
    for title, target in dashboard_targets(DASHBOARD):
        expr = target["expr"]
        if not any(word in expr for word in ("rate(", "increase(", WORKER_JOB, "feddiff_workers_connected", "feddiff_fd")):
            queries[f"{title} [{target['refId']}]"] = expr
    return queries


def run_samples(port: int) -> dict:
    return {key: value for key, value in scrape(port).items() if key[0].startswith("feddiff_run_") or key[0] in RUN_GAUGES}


def evaluate(api: PrometheusAPI, queries: dict[str, str]) -> dict[str, dict[str, float]]:
    """Each query's result vector as {labels: value}."""
    return {name: {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in api.query(expr)} for name, expr in queries.items()}


def wait_evaluated_after(api: PrometheusAPI, instant: float) -> None:
    """Until a successful scrape of the coordinator began after `instant` and the rules were evaluated on it."""
    up = f'up{{job="{COORDINATOR_JOB}"}}'
    scraped_at = api.wait_until(f"timestamp({up}) > {instant} and on() {up} == 1", timeout=60)
    api.wait_until(f"timestamp({REDUCTION_RULE}) >= {scraped_at}", timeout=30)


@contextmanager
def paused(processes: list[Process]) -> Iterator[Callable[[], None]]:
    """SIGSTOP the processes (they keep their connections and state, but cannot finish a round); yields the
    function that lets them go on, which runs on exit in any case."""
    for p in processes:
        os.kill(p.proc.pid, signal.SIGSTOP)
    done = False

    def resume() -> None:
        nonlocal done
        if not done:
            for p in processes:
                os.kill(p.proc.pid, signal.SIGCONT)
            done = True

    try:
        yield resume
    finally:
        resume()


@dataclass(frozen=True)
class Reading:
    """The run as one moment shows it: the coordinator's run samples on /metrics, `feddiff status`, and every
    run query as Prometheus evaluates it."""

    samples: dict
    status: dict
    evaluated: dict[str, dict[str, float]]


def coordinator_args(metrics_port: int) -> list[str]:
    return [
        "--insecure", "--model", "tiny", "--strategy", "udec", "--rounds", str(R), "--epochs", "1", "--seed", str(SEED),
        "--min-workers", str(K), "--round-deadline", "90", "--heartbeat-interval", "0.5", "--heartbeat-timeout", "3",
        "--listen", f"127.0.0.1:{free_port()}", "--metrics-port", str(metrics_port),
    ]  # fmt: skip


def wait_completed_rounds(address: str, rounds: int, processes: list[Process], timeout: float) -> None:
    """Until `rounds` rounds are completed; fails when `timeout` seconds pass first or one of `processes` exits."""
    deadline = time.monotonic() + timeout
    while int(status(address)["completed_rounds"]) < rounds:
        assert time.monotonic() < deadline, f"round {rounds} not completed in {timeout:.0f} s"
        assert all(p.proc.poll() is None for p in processes), "a process exited"
        time.sleep(0.02)


def assert_the_resumed_run_reads_as_before(before: Reading, after: Reading, counters_after: dict) -> None:
    # /metrics: the run's gauges are the checkpoint's; this process's counters began at zero.
    assert before.samples[("feddiff_round", ())] == 2
    assert after.samples == before.samples
    assert sum(v for (name, _), v in counters_after.items() if name == "feddiff_parameters_total") == 0
    # Prometheus: every run rule and panel as before the kill, with data.
    for name in (
        REDUCTION_RULE,
        "direction_part:feddiff_payload_bytes:per_round",
        "Updates in the run by outcome [A]",
        "Round attempts in the run by outcome [A]",
        "Loss [B]",
    ):
        assert before.evaluated[name], name
    assert after.evaluated == before.evaluated
    # ... and what `feddiff status` says.
    [reduction] = before.evaluated[REDUCTION_RULE].values()
    assert reduction == pytest.approx(before.status["reduction_vs_full"], abs=1e-12) == after.status["reduction_vs_full"]


def assert_the_finished_run_is_fedcores_accounting(final_reduction: float | None, final_samples: dict, final_status: dict) -> None:
    """Every round attempted once after the restart's re-run."""
    acct = account(Strategy.UDEC, layout_of(build_model("tiny")).sizes, K, R, seed=SEED)
    assert final_reduction == pytest.approx(1 - acct.traffic.total / acct.full_fedavg, abs=1e-12)
    assert final_reduction == pytest.approx(final_status["reduction_vs_full"], abs=1e-12)
    for direction, by_part in (("down", acct.traffic.down), ("up", acct.traffic.up)):
        for part, n in by_part.items():
            assert final_samples[("feddiff_run_parameters", (("direction", direction), ("part", part.value)))] == n
    assert final_samples[("feddiff_run_round_attempts", (("outcome", "complete"),))] == R
    assert final_samples[("feddiff_run_updates", (("outcome", "accepted"),))] == K * R


def test_run_metrics_read_the_same_after_the_coordinator_is_killed_and_resumed(tmp_path: Path) -> None:
    metrics_port = free_port()  # the same scrape target before and after the restart
    args = coordinator_args(metrics_port)
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config({COORDINATOR_JOB: [f"127.0.0.1:{metrics_port}"], WORKER_JOB: []})))
    queries = run_queries()
    with LocalCluster(tmp_path / "cluster") as cluster:
        first = cluster.coordinator(*args)
        address = first.ready["address"]
        api = start_prometheus(config, tmp_path)
        try:
            api.wait_ready()
            workers = cluster.shard_workers(address, K, "--max-images", "256", keep_running=False)
            wait_completed_rounds(address, 2, [first, *workers], timeout=120)
            # Round 3 is open; the workers, paused, cannot finish it before the kill.
            with paused(workers) as go_on:
                round_2_at = time.time()
                status_before = status(address)
                assert int(status_before["completed_rounds"]) == 2
                scraped_before = run_samples(metrics_port)
                wait_evaluated_after(api, round_2_at)
                before = Reading(scraped_before, status_before, evaluate(api, queries))

                first.stop(signal.SIGKILL)
                saved = checkpoint.load_run(tmp_path / "cluster" / "checkpoints")
                assert saved is not None and saved[1].completed_rounds == 2

                resumed = cluster.coordinator(*args, "--resume", name="coordinator-resumed")
                resumed_at = time.time()
                scraped_after = run_samples(metrics_port)
                status_after = status(address)
                counters_after = scrape(metrics_port)
                wait_evaluated_after(api, resumed_at)
                after = Reading(scraped_after, status_after, evaluate(api, queries))
                go_on()
            wait_for_state(address, "done", timeout=180, procs=[resumed, *workers])
            wait_evaluated_after(api, time.time())
            final_reduction = api.scalar(REDUCTION_RULE)
            final_samples = run_samples(metrics_port)
            final_status = status(address)
        finally:
            stop_prometheus(api)

    assert_the_resumed_run_reads_as_before(before, after, counters_after)
    assert_the_finished_run_is_fedcores_accounting(final_reduction, final_samples, final_status)
