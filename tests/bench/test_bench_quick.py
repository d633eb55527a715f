"""Smoke tests of the benchmark scripts: their flags parse, their figures print as name=value, and the pieces
they measure with (model sizing, raw TCP, one real transfer on the tiny model) work."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator

import pytest

from bench.common import ensure_preset, meta_layout, payload_bytes_of, raw_tcp_seconds, synthetic_model
from bench.report import emit
from fedcore.model.unet import PRESETS

SCRIPTS = ["train_throughput", "transfer", "coordinator_memory", "rounds_scale", "accept", "fd_curve", "diffusers_throughput"]


@pytest.fixture(autouse=True)
def named_presets_only() -> Iterator[None]:
    """The bench-only sizes these tests register stay in the test that made them."""
    named = dict(PRESETS)
    yield
    PRESETS.clear()
    PRESETS.update(named)


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_parses_its_flags(name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"bench.{name}")
    monkeypatch.setattr(sys, "argv", [name, "--help"])

    with pytest.raises(SystemExit) as done:
        module.main()

    assert done.value.code == 0 and "--quick" in capsys.readouterr().out


def test_figures_print_one_per_line_as_name_value(capsys: pytest.CaptureFixture[str]) -> None:
    emit({"ratio_vs_raw_tcp": 0.41234, "wire_overhead": 1.0000041, "round_overhead_ms": 1234.56, "ok": True, "model": "tiny"})

    assert capsys.readouterr().out.splitlines() == [
        "ratio_vs_raw_tcp=0.4123",
        "wire_overhead=1.000004",
        "round_overhead_ms=1234.6",
        "ok=1",
        "model=tiny",
    ]


def test_a_synthetic_model_has_the_asked_size_and_the_paper_topology() -> None:
    name = synthetic_model(64e6)

    assert abs(payload_bytes_of(meta_layout(name)) - 64e6) < 0.05 * 64e6
    assert len(meta_layout(name).names(meta_layout("paper-fmnist").tensors)) == 220
    assert ensure_preset(name) in PRESETS


def test_raw_tcp_moves_a_payload() -> None:
    assert raw_tcp_seconds(bytes(1 << 20)) > 0


@pytest.mark.slow
def test_one_real_transfer_of_the_tiny_model() -> None:
    from bench.transfer import single_stream

    figures = single_stream("tiny", rounds=1)

    assert figures["payload_mb"] == pytest.approx(payload_bytes_of(meta_layout("tiny")) / 1e6, rel=0.05)  # + the safetensors header
    assert figures["ratio_vs_raw_tcp"] > 0 and 1 < figures["wire_overhead"] <= 1.01


@pytest.mark.slow
def test_a_transfer_as_a_worker_before_blake3_with_the_bare_references() -> None:
    from bench.transfer import single_stream

    figures = single_stream("tiny", rounds=1, bare=True, digests=())

    assert figures["ratio_vs_raw_tcp"] > 0 and figures["upload_digest_ms"] > 0
    assert all(figures[f"bare_grpc_{a}_ratio_vs_raw_tcp"] > 0 for a in ("blake3", "sha256"))


def test_digest_rates_are_measured_for_every_digest() -> None:
    from bench.transfer import digest_rates

    figures = digest_rates(size=1 << 20, repeats=1)

    assert figures["blake3_gb_s"] > 0 and figures["sha256_gb_s"] > 0
    assert figures["blake3_over_sha256_hash_rate"] == figures["blake3_gb_s"] / figures["sha256_gb_s"]


def test_both_accept_paths_give_the_same_sums_and_are_timed() -> None:
    from bench.accept import per_update_ms

    figures = per_update_ms("tiny", repeats=3)  # asserts the two paths' sums are equal

    assert figures["tensors"] == 220 and figures["per_tensor_ms"] > 0 and figures["reader_ms"] > 0


@pytest.mark.parametrize("calls", ["feddiff", "stream"])
def test_bare_rounds_time_every_round_of_every_worker(calls: str) -> None:
    from bench.bare_rounds import overheads

    rounds = overheads(workers=6, processes=2, rounds=2, work=0.05, size=(1 << 20) + 4096, calls=calls)  # two messages each way

    assert len(rounds) == 2 and all(0 < r < 30 for r in rounds)


def test_the_diffusers_comparison_runs_its_cpu_smoke(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("diffusers", reason="the diffusers extra is not installed: pip install 'feddiff[diffusers]'")
    from bench import diffusers_throughput

    monkeypatch.setattr(sys, "argv", ["diffusers_throughput", "--quick", "--device", "cpu", "--threads", "1", "--compile", "off"])

    assert diffusers_throughput.main() == 0

    figures = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert (figures["model"], figures["batch_size"], figures["device"]) == ("diffusers-tiny", "16", "cpu")
    assert float(figures["diffusers_loop_images_per_s"]) > 0 and float(figures["fast_images_per_s"]) > 0
    ratio = float(figures["fast_images_per_s"]) / float(figures["diffusers_loop_images_per_s"])
    assert float(figures["speedup_vs_diffusers_loop"]) == pytest.approx(ratio, rel=1e-3)
