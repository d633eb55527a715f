"""Tests for fedcore.experiments.simulation: tiny 2-round runs of every strategy on CPU, their ledgers, personalisation, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedcore.data.datasets import to_model_range
from fedcore.data.shards import SplitConfig, load_training_pool
from fedcore.data.splits import split_indices
from fedcore.errors import DifferentRun, ExistingRun
from fedcore.experiments.simulation import Simulation, SimulationConfig, client_ids
from fedcore.federation.checkpoint import global_file_name, load_private, load_run
from fedcore.federation.engine import FederationConfig, task_seed
from fedcore.federation.roundlog import ROUNDS_LOG, round_records
from fedcore.federation.strategies import Strategy, account
from fedcore.model.diffusion import Schedule
from fedcore.model.parts import PART_ORDER, Part
from fedcore.model.training import LocalTrainer, SpeedConfig, TrainConfig
from fedcore.model.unet import build_model, layout_of
from fedcore.payload.serialization import load_file

ENC, MID, DEC = Part.ENCODER, Part.BOTTLENECK, Part.DECODER
K, R, SEED = 3, 2, 7
SPEED = SpeedConfig(device="cpu", threads=1)
REPO = Path(__file__).resolve().parents[3]


def _config(strategy: Strategy, rounds: int = R) -> SimulationConfig:
    return SimulationConfig(
        federation=FederationConfig(strategy=strategy, model="tiny", rounds=rounds, seed=SEED, train=TrainConfig(epochs=1, batch_size=32)),
        data=SplitConfig(num_clients=K, split="iid", max_images=150),
        speed=SPEED,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion_mnist_dir) -> dict[Strategy, tuple[Path, Simulation, list[str]]]:
    """One uninterrupted 2-round run per strategy, shared by the tests below."""
    out = {}
    for strategy in Strategy:
        folder = tmp_path_factory.mktemp(f"sim-{strategy.value}")
        lines: list[str] = []
        sim = Simulation.create(_config(strategy), folder, log=lines.append)
        sim.run()
        out[strategy] = (folder, sim, lines)
    return out


@pytest.fixture(scope="module")
def initial() -> dict[str, torch.Tensor]:
    return build_model("tiny", seed=SEED).state_dict()


@pytest.fixture(scope="module")
def layout():
    return layout_of(build_model("tiny", seed=0))


def _names(layout, parts) -> list[str]:
    return layout.names(parts)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names) -> bool:
    return all(torch.equal(a[n], b[n]) for n in names)


def _final_global(folder: Path) -> dict[str, torch.Tensor]:
    loaded = load_run(folder)
    assert loaded is not None
    return loaded[0]


# --- every strategy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(Strategy))
def test_rounds_log_has_two_finite_lines(strategy: Strategy, runs) -> None:
    folder, sim, lines = runs[strategy]

    records = [json.loads(line) for line in (folder / ROUNDS_LOG).read_text().splitlines()]

    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert math.isfinite(r["mean_loss"]) and 0 < r["mean_loss"] < 10
        assert r["participants"] == r["planned"] == client_ids(K)
        assert all(math.isfinite(v) for v in r["client_loss"].values())
        assert math.isfinite(r["seconds"])
    assert records[-1]["cumulative_parameters"] == sim.federation.ledger.traffic.total
    assert records == [r.as_json() for r in sim.records], "the log holds what the records say"
    assert round_records(folder / ROUNDS_LOG) == sim.records, "and reads back as them"
    assert len(lines) == 2 and lines[0].startswith("round 1: 3/3 clients")


@pytest.mark.parametrize("strategy", list(Strategy))
def test_ledger_equals_the_papers_accounting(strategy: Strategy, runs, layout) -> None:
    folder, sim, _ = runs[strategy]
    expected = account(strategy, layout.sizes, K, R, seed=SEED)

    saved = load_run(folder)
    assert saved is not None
    ledger = saved[1].ledger

    assert saved[1].completed_rounds == R
    assert ledger.traffic == expected.traffic
    assert ledger.full_fedavg == expected.full_fedavg == 2 * K * layout.total * R
    assert ledger.as_json() == sim.federation.ledger.as_json()
    # float32 values plus the safetensors headers
    for direction, by_part in (("down", ledger.bytes_down), ("up", ledger.bytes_up)):
        params = getattr(ledger.traffic, direction)
        for p in PART_ORDER:
            assert 4 * params[p] <= by_part[p] <= 4 * params[p] * 1.05 + 20_000, (direction, p)


def test_udec_ledger_matches_the_closed_form(runs, layout) -> None:
    _, sim, _ = runs[Strategy.UDEC]
    n, u = layout.total, layout.numel(DEC)

    assert sim.federation.ledger.traffic.total == K * (n + u) + K * (R - 1) * 2 * u


def test_full_and_usplit_change_every_part_of_the_global_model(runs, initial, layout) -> None:
    for strategy in (Strategy.FULL, Strategy.USPLIT):
        final = _final_global(runs[strategy][0])
        for part in PART_ORDER:
            assert not _same(final, initial, _names(layout, [part])), (strategy, part)
        assert all(bool(torch.isfinite(t).all()) for t in final.values())
        assert not (runs[strategy][0] / "clients").exists()  # nothing private


def test_full_round_two_is_the_weighted_mean_of_independently_trained_models(runs, layout) -> None:
    folder, _sim, _ = runs[Strategy.FULL]
    cfg = _config(Strategy.FULL)
    after_1, _ = load_file(folder / global_file_name(1))
    after_2, _ = load_file(folder / global_file_name(2))
    pool = load_training_pool(cfg.data)
    shards = split_indices(pool.class_labels(), K, "iid", seed=cfg.data.split_seed)
    locals_, fedavg_weights = [], []

    for cid, idx in zip(client_ids(K), shards, strict=True):
        model = build_model("tiny", seed=0)
        model.load_state_dict(after_1)
        trainer = LocalTrainer(model, Schedule(), SPEED)
        data = trainer.prepare_data(to_model_range(pool.images[idx]))
        trainer.train(data, cfg.federation.train, seed=task_seed(SEED, 1, cid))
        locals_.append({n: t.detach().double() for n, t in model.state_dict().items()})
        fedavg_weights.append(len(idx))

    assert fedavg_weights == [50, 50, 50]
    for n in after_2:
        expected = sum(w * m[n] for m, w in zip(locals_, fedavg_weights, strict=True)) / sum(fedavg_weights)
        torch.testing.assert_close(after_2[n].double(), expected, rtol=0, atol=1e-6)


# --- personalised strategies -----------------------------------------------------------------------------


def _private(folder: Path, cid: str) -> dict[str, torch.Tensor]:
    found = load_private(folder / "clients", cid, R)
    assert found is not None and found[1] == R
    return found[0]


def test_udec_clients_keep_their_own_encoders_and_share_one_decoder(runs, initial, layout) -> None:
    folder, sim, _ = runs[Strategy.UDEC]
    final = _final_global(folder)
    private = {cid: _private(folder, cid) for cid in client_ids(K)}
    enc_mid, dec = _names(layout, [ENC, MID]), _names(layout, [DEC])

    # The global encoder and bottleneck are never averaged; the decoder is.
    assert _same(final, initial, enc_mid)
    assert not _same(final, initial, dec)
    # Each client's private parts are exactly encoder + bottleneck, trained, and its own.
    for cid, tensors in private.items():
        assert set(tensors) == set(enc_mid), cid
        assert not _same(tensors, initial, _names(layout, [ENC])), cid
        assert _same(tensors, sim.clients[cid].private_tensors, enc_mid), cid
    ids = client_ids(K)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            assert not _same(private[a], private[b], _names(layout, [ENC])), (a, b)
            assert not _same(private[a], private[b], _names(layout, [MID])), (a, b)
    # Client model = global decoder + own private parts: a complete model, identical decoders, own outputs.
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    outputs = []
    decoders = []
    for cid in ids:
        model = build_model("tiny", seed=0)
        model.load_state_dict({**{n: final[n] for n in dec}, **private[cid]}, strict=True)
        decoders.append({n: model.state_dict()[n] for n in dec})
        with torch.no_grad():
            outputs.append(model.eval()(x, t))
    assert all(_same(d, decoders[0], dec) for d in decoders)
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])


def test_ulatdec_keeps_only_the_encoder_private(runs, initial, layout) -> None:
    folder, _, _ = runs[Strategy.ULATDEC]
    final = _final_global(folder)

    assert _same(final, initial, _names(layout, [ENC]))
    assert not _same(final, initial, _names(layout, [MID]))
    assert not _same(final, initial, _names(layout, [DEC]))
    for cid in client_ids(K):
        tensors = _private(folder, cid)
        assert set(tensors) == set(_names(layout, [ENC]))
        assert not _same(tensors, initial, _names(layout, [ENC]))


# --- resume ----------------------------------------------------------------------------------------------


def test_resume_gives_the_same_model_as_an_uninterrupted_run(tmp_path: Path, runs) -> None:
    reference_folder, reference, _ = runs[Strategy.UDEC]
    cfg = _config(Strategy.UDEC)
    first = Simulation.create(cfg, tmp_path, log=lambda _: None)
    first.run_round()
    # A log line of a round that never committed (the crash came between the log and the checkpoint).
    with open(tmp_path / ROUNDS_LOG, "a") as f:
        f.write(json.dumps({"round": 2, "uncommitted": True}) + "\n")
    first.close()  # as the end of its process would

    resumed = Simulation.create(cfg, tmp_path, resume=True, log=lambda _: None)
    assert resumed.federation.completed_rounds == 1
    assert resumed.federation.contacted == set(client_ids(K))
    resumed.run()

    final, expected = _final_global(tmp_path), _final_global(reference_folder)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[n], expected[n]) for n in final)
    for cid in client_ids(K):
        mine, theirs = _private(tmp_path, cid), _private(reference_folder, cid)
        assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    records = [json.loads(line) for line in (tmp_path / ROUNDS_LOG).read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and "uncommitted" not in records[1]
    assert resumed.federation.ledger.as_json() == reference.federation.ledger.as_json()


def test_a_second_process_on_a_run_folder_is_refused_until_the_first_lets_go(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    cfg = _config(Strategy.FULL)
    first = Simulation.create(cfg, tmp_path, log=lambda _: None)
    first.run_round()
    child = subprocess.run(
        [sys.executable, "-c", f"from fedcore.atomic import lock_folder; lock_folder({str(tmp_path)!r})"],
        capture_output=True, text=True, check=False, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip

    with pytest.raises(ValueError, match=rf"--out-dir '{tmp_path}' is in use by another process \(pid {os.getpid()}\): one process per run"):
        Simulation.create(cfg, tmp_path, resume=True, log=lambda _: None)
    first.close()
    with Simulation.create(cfg, tmp_path, resume=True, log=lambda _: None) as resumed:
        resumed.run()

    assert child.returncode == 1 and f"FolderInUse: {tmp_path} is in use by another process (pid {os.getpid()})" in child.stderr, child.stderr
    assert resumed.federation.completed_rounds == 2


def test_resume_with_another_configuration_is_refused(runs) -> None:
    folder, _, _ = runs[Strategy.FULL]
    other = _config(Strategy.FULL, rounds=3)
    other = replace(other, federation=replace(other.federation, seed=SEED + 1))

    with pytest.raises(
        DifferentRun, match=rf"--resume: the run in {folder} was made with other settings that define it: seed \(saved {SEED}, given {SEED + 1}\); "
    ):
        Simulation.create(other, folder, resume=True, log=lambda _: None)
    assert len((folder / ROUNDS_LOG).read_text().splitlines()) == 2  # untouched


def test_a_new_run_in_a_folder_that_holds_one_is_refused(runs) -> None:
    folder, _, _ = runs[Strategy.USPLIT]
    before = {f: f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}

    with pytest.raises(ExistingRun, match=rf"--out-dir {folder} holds a run \(2 rounds completed \(state.json\)\): pass --resume"):
        Simulation.create(_config(Strategy.USPLIT), folder, log=lambda _: None)
    assert {f: f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()} == before


@pytest.mark.timeout(60)  # a run that is not refused trains for its rounds
@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_a_resume_with_nothing_to_resume_is_refused(folder: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`feddiff simulate --resume` on a folder without a checkpoint started a new run there from round 1."""
    from feddiff.cli import main

    out = tmp_path / "run"
    if folder == "empty":
        out.mkdir()
    where = "holds no checkpoint (no state.json)" if folder == "empty" else "does not exist"

    assert main(["simulate", "--model", "tiny", "--rounds", "1", "--max-images", "64", "--device", "cpu", "--resume", "--out-dir", str(out)]) == 2

    assert (
        capsys.readouterr().err
        == f"feddiff simulate: error: --resume: --out-dir {out} {where}: there is nothing to resume; drop --resume to start a new run there\n"
    )
    assert sorted(tmp_path.rglob("*")) == ([out] if folder == "empty" else [])
