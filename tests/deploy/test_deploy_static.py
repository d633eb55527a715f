"""Static checks of deploy/: Prometheus config and rules, compose, Kubernetes, Dockerfiles, Grafana."""

import fnmatch
import glob
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.dashboard import dashboard_queries, dashboard_targets
from tools.system_packages import skip_reason

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose"
GRAFANA = DEPLOY / "grafana"
DOCKER = DEPLOY / "docker"
DASHBOARD = GRAFANA / "dashboards" / "feddiff.json"

COORDINATOR_JOB = "feddiff-coordinator"
WORKER_JOB = "feddiff-workers"
RULE_FILES = ("recording.yml", "alerts.yml")
K8S_VERSION = "1.30"  # kubernetes_validate ships strict schemas for 1.25 .. 1.37
COORDINATOR_CONFIG_KEYS = {
    "strategy",
    "model",
    "rounds",
    "clients_per_round",
    "min_workers",
    "round_deadline",
    "quorum",
    "epochs",
    "batch_size",
    "lr",
    "loss",
    "checkpoint_dir",
    "seed",
    "listen",
    "metrics_port",
}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=skip_reason("promtool"))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def flag_value(argv: list[str], flag: str) -> str:
    """The value after `flag` in an argv list (`--flag value` or `--flag=value`)."""
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {argv}")


# ---------------------------------------------------------------- Prometheus


@needs_promtool
def test_promtool_accepts_compose_config_and_its_rule_files() -> None:
    result = promtool("check", "config", PROM / "prometheus.yml")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


@needs_promtool
def test_promtool_accepts_k8s_config(tmp_path: Path) -> None:
    config = K8S / "prometheus" / "prometheus.yml"

    result = promtool("check", "config", config)

    if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian builds promtool without Kubernetes service discovery: check everything
        # else (relabelling, rule files) with the discovery swapped for an empty static one.
        cfg = load_yaml(config)
        for job in cfg["scrape_configs"]:
            assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
            job["static_configs"] = [{"targets": []}]
        shutil.copytree(config.parent / "rules", tmp_path / "rules")
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        result = promtool("check", "config", tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


@needs_promtool
@pytest.mark.parametrize(
    "rules", [PROM / "rules" / f for f in RULE_FILES] + [K8S / "prometheus" / "rules" / f for f in RULE_FILES], ids=lambda p: str(p.relative_to(DEPLOY))
)
def test_promtool_accepts_rule_file(rules: Path) -> None:
    result = promtool("check", "rules", rules)

    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    """deploy/prometheus/rules/tests.yml: reduction ratio, bytes per round, every alert firing."""
    result = promtool("test", "rules", PROM / "rules" / "tests.yml")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_cover_reduction_rule_and_every_alert() -> None:
    tests = load_yaml(PROM / "rules" / "tests.yml")
    alerts = {rule["alert"] for group in load_yaml(PROM / "rules" / "alerts.yml")["groups"] for rule in group["rules"]}

    tested_exprs = {t["expr"] for case in tests["tests"] for t in case.get("promql_expr_test", [])}
    fired = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert "feddiff:reduction_vs_fedavg:ratio" in tested_exprs
    assert (
        fired == alerts == {"FeddiffNoRoundProgress", "FeddiffWorkersBelowMinimum", "FeddiffUpdatesRefused", "FeddiffJoinsRefused", "FeddiffCheckpointUnsaved"}
    )


@pytest.mark.parametrize("name", RULE_FILES)
def test_k8s_rule_files_are_copies_of_compose_rule_files(name: str) -> None:
    # kustomize loads nothing outside deploy/k8s, hence the copy; keep the two identical.
    assert (K8S / "prometheus" / "rules" / name).read_text() == (PROM / "rules" / name).read_text()


def test_rules_read_the_coordinator_job_only() -> None:
    """Workers count their own traffic again; aggregating both jobs would count it twice."""
    for name in RULE_FILES:
        for group in load_yaml(PROM / "rules" / name)["groups"]:
            for rule in group["rules"]:
                selectors = re.findall(r"\bfeddiff_\w+(\{[^}]*\})?", rule["expr"])
                assert selectors, rule
                for selector in selectors:
                    assert f'job="{COORDINATOR_JOB}"' in selector, (name, rule.get("record") or rule.get("alert"))


def test_reduction_recording_rule_has_the_documented_name() -> None:
    records = {rule.get("record"): rule["expr"] for group in load_yaml(PROM / "rules" / "recording.yml")["groups"] for rule in group["rules"]}

    expr = records["feddiff:reduction_vs_fedavg:ratio"]
    assert "feddiff_run_parameters" in expr and "feddiff_run_full_fedavg_parameters" in expr
    assert any("feddiff_run_payload_bytes" in e and "feddiff_round" in e for e in records.values())
    assert any("rate(feddiff_payload_bytes_total" in e for e in records.values())


COUNTER = re.compile(r"\bfeddiff_\w+_(?:total|bucket)\b")


def raw_counter_reads(expr: str) -> list[str]:
    """The counters `expr` reads other than through rate() or increase(): their value restarts at zero with
    the process, so a rule or panel reading one would change when the coordinator is restarted."""
    return [m.group() for m in COUNTER.finditer(expr) if not re.search(r"\b(?:rate|irate|increase)\(\s*$", expr[: m.start()])]


def test_raw_counter_reads_are_found() -> None:
    assert raw_counter_reads('sum(feddiff_parameters_total{job="x"}) / sum(rate(feddiff_wire_bytes_total[5m]))') == ["feddiff_parameters_total"]
    assert raw_counter_reads("increase(feddiff_updates_total[5m]) + rate( feddiff_round_duration_seconds_bucket[1h])") == []


def test_rules_and_dashboard_read_counters_only_through_rate_or_increase() -> None:
    """What describes the run reads the feddiff_run_* gauges, which a resumed coordinator restores."""
    exprs = [
        (f"{name}: {rule.get('record') or rule.get('alert')}", rule["expr"])
        for name in RULE_FILES
        for group in load_yaml(PROM / "rules" / name)["groups"]
        for rule in group["rules"]
    ]
    exprs += [(f"dashboard: {title}", target["expr"]) for title, target in dashboard_targets(DASHBOARD)]

    raw = [(where, counters) for where, expr in exprs if (counters := raw_counter_reads(expr))]
    assert not raw


def test_rule_unit_tests_restart_the_coordinator_under_every_run_rule() -> None:
    """tests.yml holds a case in which the coordinator's series have a gap (killed and resumed) and every
    recording rule without a rate reads the same before and after it."""
    tests = load_yaml(PROM / "rules" / "tests.yml")
    records = {rule["record"]: rule["expr"] for group in load_yaml(PROM / "rules" / "recording.yml")["groups"] for rule in group["rules"]}
    restarts = [case for case in tests["tests"] if any(" _ _ " in series["values"] for series in case["input_series"])]

    assert restarts
    for record, expr in records.items():
        if "rate(" in expr:
            continue
        evaluations = [t for case in restarts for t in case.get("promql_expr_test", []) if t["expr"] == record]
        assert len({t["eval_time"] for t in evaluations}) >= 2, record
        assert all(t["exp_samples"] == evaluations[0]["exp_samples"] != [] for t in evaluations), record


@pytest.mark.parametrize("config", [PROM / "prometheus.yml", K8S / "prometheus" / "prometheus.yml"], ids=["compose", "k8s"])
def test_prometheus_configs_scrape_both_jobs_and_load_both_rule_files(config: Path) -> None:
    cfg = load_yaml(config)

    assert {job["job_name"] for job in cfg["scrape_configs"]} == {COORDINATOR_JOB, WORKER_JOB}
    assert sorted(Path(f).name for f in cfg["rule_files"]) == sorted(RULE_FILES)
    for rule_file in cfg["rule_files"]:
        assert (config.parent / rule_file).is_file(), rule_file


def test_compose_prometheus_targets_are_compose_services_and_metrics_ports() -> None:
    cfg = load_yaml(PROM / "prometheus.yml")
    services = load_yaml(COMPOSE / "compose.yaml")["services"]

    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]] for job in cfg["scrape_configs"]}
    assert targets[COORDINATOR_JOB] == ["coordinator:9100"]
    assert sorted(targets[WORKER_JOB]) == [f"worker-{i}:9101" for i in range(3)]
    for target in targets[COORDINATOR_JOB] + targets[WORKER_JOB]:
        host, port = target.split(":")
        assert flag_value(services[host]["command"], "--metrics-port") == port


# ---------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE / "compose.yaml")


def test_compose_has_coordinator_three_workers_prometheus_grafana(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"coordinator", "worker-0", "worker-1", "worker-2", "prometheus", "grafana"}


@pytest.mark.parametrize("index", range(3))
def test_compose_worker_joins_coordinator_with_its_own_shard_and_state(compose: dict[str, Any], index: int) -> None:
    worker = compose["services"][f"worker-{index}"]
    argv = worker["command"]

    assert argv[0] == "worker"
    assert flag_value(argv, "--coordinator") == "coordinator:50051"
    assert flag_value(argv, "--worker-id") == f"worker-{index}"
    assert flag_value(argv, "--client-index") == str(index)
    assert flag_value(argv, "--num-clients") == "3"
    state_dir = flag_value(argv, "--state-dir")
    assert f"worker-{index}-state:{state_dir}" in worker["volumes"]
    assert worker["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert "9101" in worker["healthcheck"]["test"][-1]  # workers serve no gRPC


def _worker_flags() -> set[str]:
    """Every spelling `feddiff worker` shows in its help (not one it refuses as retired)."""
    import argparse

    from feddiff.cli import build_parser
    from tests.parsers import subcommands

    parser = subcommands(build_parser())["worker"]
    return {o for action in parser._actions if action.help != argparse.SUPPRESS for o in action.option_strings}


def _deployed_flags(argv: list[str]) -> set[str]:
    return {a for a in argv if a.startswith("--")}


def test_compose_workers_pass_flags_that_build_a_worker_config_with_one_split(compose: dict[str, Any]) -> None:
    from fedcore.data.shards import SplitConfig
    from feddiff.cli import build_parser
    from worker.config import from_args

    for index in range(3):
        argv = [str(a) for a in compose["services"][f"worker-{index}"]["command"]]
        assert _deployed_flags(argv) <= _worker_flags(), argv
        cfg = from_args(build_parser().parse_args(argv))
        assert (cfg.client_index, cfg.data) == (index, SplitConfig(num_clients=3, split="iid", split_seed=0))


def test_k8s_workers_pass_only_flags_the_worker_takes(k8s_docs: list[dict[str, Any]]) -> None:
    [container] = pod_spec(find(k8s_docs, "StatefulSet", "feddiff-worker"))["containers"]

    assert _deployed_flags(container["args"]) <= _worker_flags(), container["args"]


def test_compose_coordinator_listens_where_workers_dial_and_publishes_ports(compose: dict[str, Any]) -> None:
    coordinator = compose["services"]["coordinator"]
    argv = coordinator["command"]

    assert argv[0] == "coordinator"
    assert flag_value(argv, "--listen") == "0.0.0.0:50051"
    assert flag_value(argv, "--metrics-port") == "9100"
    assert "--insecure" in argv
    assert flag_value(argv, "--config") in {v.split(":")[1] for v in coordinator["volumes"]}
    assert flag_value(argv, "--checkpoint-dir") in {v.split(":")[1] for v in coordinator["volumes"]}
    ports = {p.rsplit(":", 1)[-1] for p in coordinator["ports"]}
    assert {"50051", "9100"} <= ports
    assert any(p.endswith(":9090") for p in compose["services"]["prometheus"]["ports"])
    assert any(p.endswith(":3000") for p in compose["services"]["grafana"]["ports"])


def test_compose_gpu_worker_0_trains_on_every_gpu_with_the_shard_and_state_of_the_base_file(compose: dict[str, Any]) -> None:
    gpu = load_yaml(COMPOSE / "compose.gpu.yaml")["services"]
    base = compose["services"]["worker-0"]["command"]
    argv = gpu["worker-0"]["command"]

    assert flag_value(argv, "--nproc-per-node") == "gpu" and flag_value(argv, "--device") == "cuda"
    assert [d["count"] for d in gpu["worker-0"]["deploy"]["resources"]["reservations"]["devices"]] == ["all"]
    assert gpu["worker-0"]["shm_size"]  # NCCL's shared memory beyond Docker's 64 MB
    for flag in ("--coordinator", "--worker-id", "--client-index", "--num-clients", "--split", "--split-seed", "--state-dir", "--metrics-port"):
        assert flag_value(argv, flag) == flag_value(base, flag), flag
    assert ("--insecure" in argv) == ("--insecure" in base)


@pytest.mark.parametrize("compose_file", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_bind_mounts_and_named_volumes_exist(compose_file: str) -> None:
    spec = load_yaml(COMPOSE / compose_file)
    base_volumes = set(load_yaml(COMPOSE / "compose.yaml")["volumes"])

    for name, service in spec["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE / source).resolve().exists(), (name, volume)
            else:
                assert source in base_volumes, (name, volume)


@pytest.mark.parametrize("compose_file", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_builds_reference_existing_dockerfiles(compose_file: str) -> None:
    spec = load_yaml(COMPOSE / compose_file)

    builds = [s["build"] for s in spec["services"].values() if "build" in s]
    assert builds
    for build in builds:
        context = (COMPOSE / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).is_file(), build


def test_compose_mounts_prometheus_config_and_rules_where_the_config_expects_them(compose: dict[str, Any]) -> None:
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])

    assert mounts["../prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["../prometheus/rules"] == "/etc/prometheus/rules"  # rule_files are relative to the config


def test_compose_mounts_grafana_provisioning_and_dashboards(compose: dict[str, Any]) -> None:
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "feddiff.yaml")["providers"][0]

    assert mounts["../grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounts["../grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    assert mounts["../grafana/dashboards"] == provider["options"]["path"]


@pytest.mark.parametrize("config", [COMPOSE / "coordinator.yaml", K8S / "config" / "coordinator.yaml"], ids=["compose", "k8s"])
def test_coordinator_config_uses_known_keys(config: Path) -> None:
    cfg = load_yaml(config)

    assert set(cfg) <= COORDINATOR_CONFIG_KEYS, set(cfg) - COORDINATOR_CONFIG_KEYS
    assert cfg["min_workers"] == 3


# ---------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return load_yaml(K8S / "kustomization.yaml")


@pytest.fixture(scope="module")
def k8s_docs(kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    return [doc for resource in kustomization["resources"] for doc in load_yaml_docs(K8S / resource)]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name)
    return matches[0]


def generated_configmaps(kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    """The ConfigMaps kustomize's configMapGenerator makes (without the name hash)."""
    maps = []
    for generator in kustomization["configMapGenerator"]:
        data = {}
        for entry in generator["files"]:
            key, _, path = entry.rpartition("=")
            data[key or Path(path).name] = (K8S / path).read_text()
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"], "namespace": kustomization["namespace"]}, "data": data})
    return maps


def test_kustomization_files_exist(kustomization: dict[str, Any]) -> None:
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    for generator in kustomization["configMapGenerator"]:
        for entry in generator["files"]:
            assert (K8S / entry.rpartition("=")[2]).is_file(), entry


def validate_strictly(doc: dict[str, Any]) -> None:
    """kubernetes_validate against the strict schema (unknown fields are errors), failing briefly."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    problem = None
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:  # its repr holds the whole schema
        problem = f"{'.'.join(map(str, error.path))}: {error.message}"
    if problem:
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {problem}", pytrace=False)


def test_k8s_manifests_validate_strictly(k8s_docs: list[dict[str, Any]], kustomization: dict[str, Any]) -> None:
    docs = k8s_docs + generated_configmaps(kustomization)

    assert {d["kind"] for d in docs} >= {"Namespace", "Deployment", "Service", "PersistentVolumeClaim", "StatefulSet", "ConfigMap"}
    for doc in docs:
        validate_strictly(doc)


@pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is not installed: Debian's kubernetes-client (1.20) is too old for this kustomization; install kubectl 1.21 or later from the Kubernetes project",
)
def test_kustomize_build_validates_and_wires_generated_names() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr

    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    for doc in docs:
        validate_strictly(doc)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "feddiff"
    config_map = next(d["metadata"]["name"] for d in docs if d["metadata"]["name"].startswith("feddiff-coordinator-config"))
    deployment = find(docs, "Deployment", "feddiff-coordinator")
    assert {"name": "config", "configMap": {"name": config_map}} in deployment["spec"]["template"]["spec"]["volumes"]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def mounted_secrets(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """Secret name -> mount path, for secret and projected volumes the container mounts."""
    paths = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {}
    for volume in spec["volumes"]:
        names = (
            [volume["secret"]["secretName"]]
            if "secret" in volume
            else [s["secret"]["name"] for s in volume.get("projected", {}).get("sources", []) if "secret" in s]
        )
        for name in names:
            if volume["name"] in paths:
                secrets[name] = paths[volume["name"]]
    return secrets


def test_coordinator_deployment(k8s_docs: list[dict[str, Any]], kustomization: dict[str, Any]) -> None:
    deployment = find(k8s_docs, "Deployment", "feddiff-coordinator")
    spec = pod_spec(deployment)
    [container] = spec["containers"]
    argv = container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    assert argv[0] == "coordinator"
    assert ports == {"grpc": 50051, "metrics": 9100, "health": 50052}
    assert flag_value(argv, "--listen") == "0.0.0.0:50051"
    assert flag_value(argv, "--metrics-port") == "9100"
    assert flag_value(argv, "--health-port") == "50052"
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert spec["securityContext"]["runAsNonRoot"] is True
    # probes: the kubelet's native gRPC probe on the plain-text health port (the gRPC port needs mTLS)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"], probe
    assert container["readinessProbe"]["grpc"]["service"] == "feddiff.v1.Coordinator"
    # TLS from Secrets, and the flags point into the mount
    secrets = mounted_secrets(spec, container)
    assert set(secrets) == {"feddiff-ca", "feddiff-coordinator-tls"}
    for flag in ("--tls-cert", "--tls-key", "--tls-ca"):
        assert flag_value(argv, flag).startswith(secrets["feddiff-ca"] + "/")
    # config, checkpoints
    volumes = {v["name"]: v for v in spec["volumes"]}
    generators = {g["name"] for g in kustomization["configMapGenerator"]}
    assert volumes["config"]["configMap"]["name"] in generators
    pvc = find(k8s_docs, "PersistentVolumeClaim", volumes["checkpoints"]["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert flag_value(argv, "--checkpoint-dir") == mounts["checkpoints"]
    assert flag_value(argv, "--config").startswith(mounts["config"] + "/")


def test_coordinator_service_exposes_grpc_and_metrics(k8s_docs: list[dict[str, Any]]) -> None:
    service = find(k8s_docs, "Service", "feddiff-coordinator")
    deployment = find(k8s_docs, "Deployment", "feddiff-coordinator")

    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {("grpc", 50051), ("metrics", 9100)}
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_worker_statefulset(k8s_docs: list[dict[str, Any]]) -> None:
    statefulset = find(k8s_docs, "StatefulSet", "feddiff-worker")
    spec = pod_spec(statefulset)
    [container] = spec["containers"]
    argv = container["args"]
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}

    assert argv[0] == "worker"
    assert flag_value(argv, "--coordinator") == "feddiff-coordinator:50051"
    # stable identity: the pod name via the downward API, shard = pod index
    assert flag_value(argv, "--worker-id") == "$(POD_NAME)" and env["POD_NAME"] == "metadata.name"
    assert flag_value(argv, "--client-index") == "$(POD_INDEX)"
    assert env["POD_INDEX"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert flag_value(argv, "--num-clients") == str(statefulset["spec"]["replicas"])
    assert find(k8s_docs, "Service", statefulset["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    # several GPUs each, one rank per GPU the pod gets, and shared memory for NCCL beyond the runtime's 64 MiB
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus >= 2 and container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert flag_value(argv, "--nproc-per-node") == "gpu" and flag_value(argv, "--device") == "cuda"
    shm = {v["name"]: v for v in spec["volumes"]}[{m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    # private parts survive restarts
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert flag_value(argv, "--state-dir") == mounts[claim["metadata"]["name"]]
    # probes: no gRPC server on workers
    assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["sh", "-c"] and probe[2].startswith("feddiff health ")
    # TLS from Secrets; each pod presents its own certificate (identity = common name = pod name)
    secrets = mounted_secrets(spec, container)
    assert set(secrets) == {"feddiff-ca", "feddiff-worker-tls"}
    for flag in ("--tls-cert", "--tls-key", "--tls-ca"):
        assert flag_value(argv, flag).startswith(secrets["feddiff-ca"] + "/")
    assert flag_value(argv, "--tls-cert").endswith("/$(POD_NAME).crt")
    assert flag_value(argv, "--tls-key").endswith("/$(POD_NAME).key")
    assert '"/etc/feddiff/tls/$POD_NAME.crt"' in probe[2]
    assert spec["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize(("kind", "name"), [("Deployment", "feddiff-coordinator"), ("StatefulSet", "feddiff-worker")])
def test_pods_are_annotated_for_prometheus_on_their_metrics_port(k8s_docs: list[dict[str, Any]], kind: str, name: str) -> None:
    template = find(k8s_docs, kind, name)["spec"]["template"]
    [container] = template["spec"]["containers"]
    annotations = template["metadata"]["annotations"]
    metrics_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")

    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)
    assert flag_value(container["args"], "--metrics-port") == str(metrics_port)


def test_k8s_prometheus_uses_kubernetes_sd_and_selects_pods_by_component(k8s_docs: list[dict[str, Any]]) -> None:
    cfg = load_yaml(K8S / "prometheus" / "prometheus.yml")
    components = {
        doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] for doc in k8s_docs if doc["kind"] in {"Deployment", "StatefulSet"}
    }

    for job in cfg["scrape_configs"]:
        assert job["kubernetes_sd_configs"][0]["role"] == "pod"
        kept = {
            r["regex"]
            for r in job["relabel_configs"]
            if r.get("action") == "keep" and r["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
        }
        assert len(kept) == 1 and kept <= components, job["job_name"]


# ---------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return instructions


def dockerignore_allows(path: str) -> bool:
    """Whether /.dockerignore (last matching pattern wins) lets `path` into the build context."""
    allowed = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        if fnmatch.fnmatch(path, pattern.lstrip("!")):
            allowed = negated
    return allowed


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_runs_as_non_root_with_feddiff_healthcheck(dockerfile: str) -> None:
    instructions = dockerfile_instructions(DOCKER / dockerfile)

    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    [healthcheck] = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert '"feddiff", "health", "--address", "127.0.0.1:50051", "--insecure"' in healthcheck
    assert ("ENTRYPOINT", '["feddiff"]') in instructions


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_copies_only_existing_files_the_dockerignore_admits(dockerfile: str) -> None:
    for keyword, args in dockerfile_instructions(DOCKER / dockerfile):
        if keyword != "COPY" or args.startswith("--from"):
            continue
        sources = args.split()[:-1]
        matched = [m for source in sources for m in glob.glob(source, root_dir=ROOT)]
        assert matched, args
        for source in matched:
            assert dockerignore_allows(source), f"/.dockerignore excludes {source}"


def test_cpu_dockerfile_pins_cpu_torch_through_constraints() -> None:
    instructions = dockerfile_instructions(DOCKER / "Dockerfile")
    runs = [args for keyword, args in instructions if keyword == "RUN"]

    assert instructions[0] == ("FROM", "python:3.11-slim")
    torch_install = next(r for r in runs if "pip install" in r and "torch" in r.split())
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_install
    assert "-c constraints.txt" in torch_install
    assert any('pip install -c constraints.txt ".[diffusers]"' in r for r in runs)  # every preset runs in the image
    assert any("dataset-fashion-mnist" in r for r in runs)
    assert re.search(r"^torch==\d+\.\d+\.\d+$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)


def test_cuda_dockerfile_keeps_the_base_image_torch() -> None:
    instructions = dockerfile_instructions(DOCKER / "Dockerfile.cuda")
    base = next(args for keyword, args in instructions if keyword == "ARG" and args.startswith("BASE_IMAGE="))
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")

    assert re.fullmatch(r"BASE_IMAGE=pytorch/pytorch:2\.\d+\.\d+-cuda12\.\d+-cudnn9-runtime", base)
    assert ("FROM", "${BASE_IMAGE}") in instructions
    assert "grep -v '^torch==' constraints.txt" in runs and 'pip install -c /tmp/constraints-cuda.txt ".[diffusers]"' in runs
    assert "/usr/share/datasets/fashion-mnist" in " ".join(args for keyword, args in instructions if keyword == "COPY")


# ---------------------------------------------------------------- Grafana

REQUIRED_PANELS = {
    # topic: metrics that some single target must all use
    "bytes per round by direction and part": ("feddiff_run_payload_bytes", "feddiff_round{", "direction, part"),
    "reduction vs plain FedAvg": ("feddiff_run_parameters", "feddiff_run_full_fedavg_parameters"),
    "updates of the run by outcome": ("feddiff_run_updates", "by (outcome)"),
    "round attempts of the run by outcome": ("feddiff_run_round_attempts", "by (outcome)"),
    "round duration quantiles": ("histogram_quantile", "feddiff_round_duration_seconds_bucket"),
    "workers connected": ("feddiff_workers_connected",),
    "worker local loss": ("feddiff_local_loss",),
    "coordinator round mean loss": ("feddiff_round_mean_loss",),
    "images per second": ("feddiff_train_images_per_second",),
    "refused updates by reason": ("feddiff_updates_total", "by (outcome)"),
    "Frechet distance": ("feddiff_fd",),
}


def test_dashboard_covers_every_topic() -> None:
    queries = dashboard_queries(DASHBOARD)

    missing = [topic for topic, needles in REQUIRED_PANELS.items() if not any(all(n in q for n in needles) for q in queries)]
    assert not missing


def test_dashboard_targets_have_runnable_exprs() -> None:
    targets = dashboard_targets(DASHBOARD)

    assert targets
    for title, target in targets:
        assert target.get("expr", "").strip(), title
        assert "$" not in target["expr"], f"{title}: Grafana variables make the expr unrunnable in Prometheus"
    refs = [(title, t["refId"]) for title, t in targets]
    assert len(refs) == len(set(refs))


@needs_promtool
def test_dashboard_exprs_parse_as_promql(tmp_path: Path) -> None:
    rules = {
        "groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(dashboard_queries(DASHBOARD))]}]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))

    result = promtool("check", "rules", tmp_path / "dashboard.yml")

    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_datasource_matches_provisioning() -> None:
    [datasource] = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
    dashboard = json.loads(DASHBOARD.read_text())

    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    uids |= {target["datasource"]["uid"] for _, target in dashboard_targets(DASHBOARD)}
    assert uids == {datasource["uid"]}
    assert dashboard["uid"] and dashboard["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, panel["title"]
        cells |= area
