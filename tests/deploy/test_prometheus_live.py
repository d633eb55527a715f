"""The real Prometheus server scrapes a smoke run on loopback: its recorded reduction equals fedcore's
accounting, and every query of the Grafana dashboard runs against it."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedcore.federation.strategies import Strategy, account
from fedcore.model.unet import build_model, layout_of
from feddiff.local import LocalCluster, wait_for_state
from tests.deploy.dashboard import dashboard_targets
from tests.deploy.prometheus_server import PROM_CONFIG, PROMETHEUS, PrometheusAPI, prometheus_config, start_prometheus, stop_prometheus
from tools.system_packages import skip_reason

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "feddiff.json"

COORDINATOR_JOB, WORKER_JOB = "feddiff-coordinator", "feddiff-workers"
REDUCTION_RULE = "feddiff:reduction_vs_fedavg:ratio"
REDUCTION_EXPR = f'1 - sum(feddiff_run_parameters{{job="{COORDINATOR_JOB}"}}) / sum(feddiff_run_full_fedavg_parameters{{job="{COORDINATOR_JOB}"}})'
K, R, SEED = 2, 2, 0

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.e2e,
    pytest.mark.skipif(PROMETHEUS is None, reason=skip_reason("prometheus")),
]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusAPI]:
    """A smoke run (tiny, udec, 2 rounds, 2 workers) scraped every second from before its first round; yielded
    once Prometheus holds the final counters and has evaluated the recording rules on them."""
    tmp = tmp_path_factory.mktemp("prometheus-live")
    config = tmp / "prometheus.yml"
    run = ["--model", "tiny", "--strategy", "udec", "--rounds", str(R), "--epochs", "1", "--seed", str(SEED)]
    with LocalCluster(tmp / "cluster") as cluster:
        coord = cluster.coordinator("--insecure", *run, "--min-workers", str(K), "--round-deadline", "90")
        address = coord.ready["address"]
        targets: dict[str, list[str]] = {COORDINATOR_JOB: [f"127.0.0.1:{coord.ready['metrics_port']}"], WORKER_JOB: []}
        config.write_text(yaml.safe_dump(prometheus_config(targets)))
        api = start_prometheus(config, tmp)
        try:
            api.wait_ready()
            api.wait_until(f'up{{job="{COORDINATOR_JOB}"}} == 1')
            workers = cluster.shard_workers(address, K, "--max-images", "256")
            # The workers' metrics ports exist only now: add them and have Prometheus reload its config.
            targets[WORKER_JOB] = [f"127.0.0.1:{w.ready['metrics_port']}" for w in workers]
            config.write_text(yaml.safe_dump(prometheus_config(targets)))
            api.process.send_signal(signal.SIGHUP)
            api.wait_until(f'count(up{{job="{WORKER_JOB}"}} == 1) == {K}')
            wait_for_state(address, "done", timeout=120, procs=[coord, *workers])
            done_at = time.time()
            # A scrape that began after the run was done holds the final counters of every target ...
            # (timestamp() of a plain selector is the sample's scrape time; of any other expression,
            # the evaluation time.)
            scraped_at = api.wait_until(f'timestamp(up{{job="{COORDINATOR_JOB}"}}) > {done_at}')
            api.wait_until(f'min(timestamp(up{{job="{WORKER_JOB}"}})) > {done_at}')
            # ... every target has the two samples a rate() needs ...
            api.wait_until("min(count_over_time(up[5m])) >= 2")
            # ... and a rule evaluation at or after that scrape recorded the reduction from them.
            api.wait_until(f"timestamp({REDUCTION_RULE}) >= {scraped_at}")
            yield api
        finally:
            stop_prometheus(api)


def test_recorded_reduction_equals_fedcore_accounting(prometheus: PrometheusAPI) -> None:
    acct = account(Strategy.UDEC, layout_of(build_model("tiny")).sizes, K, R, seed=SEED)
    expected = 1 - acct.traffic.total / acct.full_fedavg

    recorded = prometheus.scalar(REDUCTION_RULE)
    computed = prometheus.scalar(REDUCTION_EXPR)
    rounds = prometheus.scalar(f'feddiff_round{{job="{COORDINATOR_JOB}"}}')

    rules = yaml.safe_load((PROM_CONFIG.parent / "rules" / "recording.yml").read_text())
    rule_expr = next(r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("record") == REDUCTION_RULE)
    print(f"\nrecording rule  {REDUCTION_RULE} = {' '.join(rule_expr.split())}")
    print(f"read back       {REDUCTION_RULE} = {recorded!r}")
    print(f"PromQL          {REDUCTION_EXPR} = {computed!r}")
    print(f"fedcore.federation.strategies.account(udec, tiny, K={K}, R={R}): 1 - {acct.traffic.total}/{acct.full_fedavg} = {expected!r}")
    up = {(r["metric"]["job"], r["metric"]["instance"]): r["value"][1] for r in prometheus.query("up")}
    assert len(up) == 1 + K and set(up.values()) == {"1"}, up
    assert rounds == R
    assert recorded == pytest.approx(expected, abs=1e-9)
    assert computed == pytest.approx(expected, abs=1e-9)


def test_every_dashboard_query_runs_on_the_live_server(prometheus: PrometheusAPI) -> None:
    targets = dashboard_targets(DASHBOARD)
    assert targets

    empty = []
    for title, target in targets:
        result = prometheus.query(target["expr"])  # fails on any PromQL or evaluation error
        # No evaluation runs in the smoke run (no FD) and no update is refused or late.
        may_be_empty = "feddiff_fd" in target["expr"] or "feddiff_updates_total" in target["expr"]
        if not result and not may_be_empty:
            empty.append(f"{title} [{target['refId']}]: {target['expr']}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
