"""The codec benchmark's flags parse and its figures come out right on the tiny model."""

from __future__ import annotations

import sys

import pytest
import torch

from bench import codecs
from fedcore.model import unet
from fedcore.model.unet import build_model
from fedcore.payload.codecs import Codec


def test_its_flags_parse(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["codecs", "--help"])

    with pytest.raises(SystemExit) as done:
        codecs.main()

    assert done.value.code == 0 and "--quick" in capsys.readouterr().out


def test_the_figures_of_a_tiny_delta() -> None:
    g = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(t.shape, generator=g) * 1e-4 for n, t in build_model("tiny", seed=0).state_dict().items()}
    numel = sum(t.numel() for t in delta.values())

    figures = codecs.measure("tiny", delta, ["none", "int8", "topk:0.1+int8"], repeats=1)
    rates = {name: value for name, value in figures.items() if isinstance(value, float)}

    assert figures["fp32_mb"] == numel * 4 / 1e6
    assert figures["none_ratio_vs_fp32"] == 1 and figures["none_rel_l2_error"] == 0
    int8_bytes = sum(Codec.parse("int8").encoded_bytes(t.numel()) for t in delta.values())
    assert figures["int8_ratio_vs_fp32"] == numel * 4 / int8_bytes
    assert 0 < rates["int8_rel_l2_error"] < 0.01 < rates["topk_0.1_int8_rel_l2_error"] < 1
    assert all(rates[f"{k}_{side}_mb_s"] > 0 for k in ("none", "int8", "topk_0.1_int8") for side in ("encode", "decode"))


def test_the_coordinators_accept_is_timed_with_and_without_compression() -> None:
    g = torch.Generator().manual_seed(1)
    delta = {n: torch.randn(t.shape, generator=g) * 1e-6 for n, t in build_model("tiny", seed=0).state_dict().items()}

    figures = codecs.measure("tiny", delta, ["none", "int8", "topk:0.05+int8", "bf16"], repeats=2)

    accept = {k: figures[f"{k}_accept_ms"] for k in ("none", "int8", "topk_0.05_int8")}
    assert all(isinstance(ms, float) and ms > 0 for ms in accept.values()), accept
    assert figures["none_accept_vs_fp32"] == 1 and "bf16_accept_ms" not in figures


def test_the_coordinators_memory_is_measured_with_coded_updates(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A real coordinator process takes two workers' int8 updates; the peak is read against one float32 update."""
    from bench import coordinator_memory

    monkeypatch.setattr(sys, "argv", ["coordinator_memory", "--k", "2", "--update-mb", "4", "--compression", "int8"])
    named = dict(unet.PRESETS)
    try:
        assert coordinator_memory.main() == 0
    finally:  # the bench-only size it registers stays in this test
        unet.PRESETS.clear()
        unet.PRESETS.update(named)

    figures = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines() if "=" in line)
    assert figures["compression"] == "int8"
    assert 0 < float(figures["peak_over_update_max"]) < 10
    assert float(figures["k2_upload_mb_s"]) > 0


def test_the_memory_benchmark_refuses_an_unknown_codec(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from bench import coordinator_memory

    monkeypatch.setattr(sys, "argv", ["coordinator_memory", "--compression", "int9"])

    with pytest.raises(SystemExit) as done:
        coordinator_memory.main()

    assert done.value.code == 2 and "int9" in capsys.readouterr().err
