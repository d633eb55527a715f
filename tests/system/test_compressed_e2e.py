"""End to end over gRPC with compressed updates, real processes on loopback: the model equals `feddiff simulate`'s
with the same codec (both fold what the same error feedback sent), the metrics equal the accounting, and round 1
downloads no model (the clients build it from the run's seed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcore.federation.strategies import Strategy, account
from fedcore.model.parts import PART_ORDER
from fedcore.model.unet import build_model, layout_of
from fedcore.payload.codecs import Codec
from fedcore.payload.serialization import load_file
from feddiff.cli import main
from feddiff.local import LocalCluster, metric_value, scrape, wait_for_state
from tests.system.test_e2e import DATA, RUN, K, R, simulate

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(("strategy", "codec"), [("full", "int8"), ("full", "topk:0.05"), ("udec", "int8:32"), ("udec", "topk:0.05+int8")])
def test_compressed_grpc_run_equals_simulation(strategy: str, codec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = simulate(strategy, tmp_path / "sim", "--compression", codec)
    with LocalCluster(tmp_path / "grpc") as cluster:
        coord = cluster.coordinator("--insecure", "--strategy", strategy, "--compression", codec, *RUN, "--min-workers", str(K), "--round-deadline", "120")
        address = coord.ready["address"]
        workers = cluster.shard_workers(address, K, *DATA)
        wait_for_state(address, "done", timeout=240, procs=[coord, *workers])
        coordinator_metrics = scrape(coord.ready["metrics_port"])
        worker_metrics = [scrape(w.ready["metrics_port"]) for w in workers]
        capsys.readouterr()
        assert main(["status", "--address", address, "--insecure"]) == 0
        text = capsys.readouterr().out
        assert main(["status", "--address", address, "--insecure", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)

    got = load_file(tmp_path / "grpc" / "checkpoints" / "final.safetensors")[0]
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-6, f"{strategy} {codec}: gRPC model differs from the simulation by {worst}"

    # the updates went up coded: the bytes counted are the simulation's, fewer than float32's
    rounds = [json.loads(line) for line in (tmp_path / "sim" / "rounds.jsonl").read_text().splitlines()]
    sim_up = sum(sum(r["bytes"]["up"].values()) for r in rounds)
    up = sum(metric_value(coordinator_metrics, "feddiff_payload_bytes_total", direction="up", part=p.value) for p in PART_ORDER)
    assert up == sim_up == sum(sum(metric_value(m, "feddiff_payload_bytes_total", direction="up", part=p.value) for p in PART_ORDER) for m in worker_metrics)
    acct = account(Strategy(strategy), layout_of(build_model("tiny")).sizes, K, R, seed=7)
    assert up < 4 * sum(acct.traffic.up.values()) / 2
    # round 1's downloads are a few headers: each client builds the initial model from the run's seed
    assert sum(rounds[0]["bytes"]["down"].values()) < K * 1024 < 4 * layout_of(build_model("tiny")).total
    for direction, counts in (("down", acct.traffic.down), ("up", acct.traffic.up)):
        for part in PART_ORDER:  # the paper's parameter counts, unchanged by the codec, and the float32 bytes they stand for
            assert metric_value(coordinator_metrics, "feddiff_parameters_total", direction=direction, part=part.value) == counts[part]
            assert metric_value(coordinator_metrics, "feddiff_payload_fp32_bytes_total", direction=direction, part=part.value) == 4 * counts[part]
            assert sum(metric_value(m, "feddiff_payload_fp32_bytes_total", direction=direction, part=part.value) for m in worker_metrics) == 4 * counts[part]
    assert metric_value(coordinator_metrics, "feddiff_full_fedavg_fp32_bytes_total") == 4 * acct.full_fedavg
    payload = sum(metric_value(coordinator_metrics, "feddiff_payload_bytes_total", direction=d, part=p.value) for d in ("down", "up") for p in PART_ORDER)
    assert payload == sum(sum(r["bytes"][d].values()) for r in rounds for d in ("down", "up"))  # the simulation's ledger, both ways
    assert rounds[-1]["cumulative_payload_bytes"] == payload
    # `feddiff status` names the codec and both reductions: parameters (the paper's) and bytes (the codec's too)
    canonical = Codec.parse(codec).name
    assert status["compression"] == canonical and status["bytes_vs_fp32_fedavg"] == pytest.approx(4 * acct.full_fedavg / payload)
    assert f"({strategy}, tiny, {canonical})" in text and f"{4 * acct.full_fedavg / payload:.1f}x fewer than plain FedAvg in float32" in text
    assert f"{acct.reduction_vs_full:.1%} less" in text
