"""A run's compression end to end in one process: the setting, the task that carries it, the client's coded
update with error feedback (what was sent plus the residual is the sum of the true deltas), the bound on a coded
payload's size, and a compressed simulation that resumes with its residuals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedcore.data.shards import SplitConfig
from fedcore.errors import MalformedTask, MissingSharedState, SettingsError
from fedcore.experiments.simulation import RESIDUALS, Simulation, SimulationConfig, client_ids
from fedcore.federation import checkpoint
from fedcore.federation.aggregate import delta
from fedcore.federation.client import ClientRuntime, TrainTask
from fedcore.federation.engine import Federation, FederationConfig
from fedcore.federation.strategies import Strategy, account, coded_bytes
from fedcore.model.diffusion import Schedule
from fedcore.model.parts import ALL_PARTS, PART_ORDER, Part
from fedcore.model.training import LocalTrainer, SpeedConfig, TrainConfig
from fedcore.model.unet import build_model, layout_of
from fedcore.payload import coded, serialization
from fedcore.payload.codecs import Codec, Identity
from fedcore.payload.serialization import PayloadMeta, PayloadReader
from fedcore.wire.convert import task_from_proto, task_to_proto
from fedcore.wire.stream import StreamHeader

SPEED = SpeedConfig(device="cpu", threads=1)
LAYOUT = layout_of(build_model("tiny", seed=0))


# --- the setting --------------------------------------------------------------------------------------------
def _federation(**values: object) -> FederationConfig:
    flat: dict[str, object] = {
        "strategy": "udec",
        "model": "tiny",
        "rounds": 1,
        "clients_per_round": 0,
        "seed": 0,
        "epochs": 1,
        "batch_size": 8,
        "lr": 1e-3,
        "loss": "huber",
    }
    return FederationConfig.from_settings(**{**flat, **values})  # type: ignore[arg-type]


def test_the_compression_setting_gives_the_codec_and_its_block() -> None:
    assert _federation().compression == Identity()
    assert _federation(compression="topk:0.05+int8", compression_block=32).compression == Codec.parse("topk:0.05+int8:32")
    assert "compression" not in _federation().as_json()  # a run without one resumes the runs of earlier versions
    assert _federation(compression="int4").as_json()["compression"] == "int4"


@pytest.mark.parametrize(
    ("values", "words"),
    [({"compression": "none", "compression_block": 8}, "has no int8 or int4 blocks"), ({"compression": "int8:32", "compression_block": 64}, "give one")],
)
def test_a_block_size_the_codec_cannot_take_is_refused(values: dict[str, object], words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        _federation(**values)


# --- the task -----------------------------------------------------------------------------------------------
def _task(codec: Codec) -> TrainTask:
    return TrainTask(
        0, "r0.1-w", frozenset({Part.DECODER}), frozenset({Part.DECODER}), frozenset({Part.ENCODER}), TrainConfig(epochs=1, batch_size=8), 5, codec
    )


@pytest.mark.parametrize("name", ["none", "bf16", "int8:32", "int4", "topk:0.05+int8"])
def test_a_task_carries_its_codec(name: str) -> None:
    msg = task_to_proto(_task(Codec.parse(name)), StreamHeader.of(b"x"))

    assert task_from_proto(msg).codec == Codec.parse(name)
    assert msg.train.compression == ("" if name == "none" else name)  # a run without compression: the wire as before


def test_a_task_of_a_codec_this_version_does_not_know_is_refused() -> None:
    msg = task_to_proto(_task(Identity()), StreamHeader.of(b"x"))
    msg.train.compression = "int3"

    with pytest.raises(MalformedTask, match="int3"):
        task_from_proto(msg)


# --- the client's coded update ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["int4", "topk:0.05+int8"])
def test_what_was_sent_plus_the_residual_is_the_sum_of_the_true_deltas(name: str) -> None:
    codec, parts = Codec.parse(name), frozenset({Part.DECODER})
    trainer = LocalTrainer(build_model("tiny", seed=0), Schedule(), SPEED)
    data = trainer.prepare_data(torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    runtime = ClientRuntime("c", "tiny", trainer, data)
    reader = PayloadReader(LAYOUT, kind="delta", model="tiny")
    state = build_model("tiny", seed=1).state_dict()
    sent = {n: torch.zeros(s.shape) for n, s in LAYOUT.specs(parts).items()}
    true = {n: torch.zeros(s.shape) for n, s in LAYOUT.specs(parts).items()}
    for r in range(3):
        task = TrainTask(r, f"r{r}.1-c", frozenset(ALL_PARTS), parts, frozenset(), TrainConfig(epochs=1, batch_size=8, lr=1e-3), r, codec)
        runtime.load(serialization.encode(state, PayloadMeta(kind="weights", model="tiny", wire_round=r, parts=frozenset(ALL_PARTS))), task)
        runtime.train(task)
        local = runtime.sampling_model().state_dict()
        payload = runtime.delta_payload(task)

        decoded, _ = coded.decode(reader, codec, payload, parts)
        for n, d in delta({n: local[n] for n in true}, {n: state[n] for n in true}).items():
            true[n] += d
            sent[n] += decoded[n]
        assert serialization.read_meta(payload).codec == name

    worst = max(float((sent[n] + runtime.residuals[n] - true[n]).abs().max()) for n in true)
    assert worst <= 1e-6
    assert max(float(r.abs().max()) for r in runtime.residuals.values()) > 1e-5  # something was held back


def test_a_coded_payload_fits_its_bound() -> None:
    g = torch.Generator().manual_seed(0)
    deltas = {n: torch.randn(s.shape, generator=g) for n, s in LAYOUT.specs(PART_ORDER).items()}
    for name in ("none", "bf16", "int8", "int4:16", "topk:1", "topk:0.05+int4"):
        meta = PayloadMeta(kind="delta", model="tiny", wire_round=0, parts=frozenset(PART_ORDER), codec=name)
        payload = coded.encode(deltas, meta)
        assert len(payload) <= coded.max_payload_bytes(LAYOUT, PART_ORDER, Codec.parse(name)), name


@pytest.mark.parametrize(("name", "larger"), [("none", "values"), ("int8", "values"), ("topk:1", "coded")])
def test_a_download_is_bounded_by_the_values_or_a_coded_change_whichever_is_larger(name: str, larger: str) -> None:
    codec = Codec.parse(name)
    values, change = serialization.max_payload_bytes(LAYOUT, PART_ORDER), coded.max_payload_bytes(LAYOUT, PART_ORDER, codec)
    bound = coded.max_download_bytes(LAYOUT, PART_ORDER, codec)

    assert bound == max(values, change) == {"values": values, "coded": change}[larger]


# --- a compressed simulation resumes with its residuals ----------------------------------------------------
def _config(rounds: int) -> SimulationConfig:
    train = TrainConfig(epochs=1, batch_size=32, lr=1e-3)
    return SimulationConfig(
        federation=FederationConfig(Strategy.UDEC, "tiny", rounds, seed=7, train=train, compression=Codec.parse("topk:0.05+int8")),
        data=SplitConfig(num_clients=2, split="iid", max_images=128),
        speed=SPEED,
    )


def test_a_compressed_simulation_resumes_with_its_residuals(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    with Simulation.create(_config(2), tmp_path / "straight", log=lambda _: None) as straight_run:
        straight_run.run()
    with Simulation.create(_config(2), tmp_path / "resumed", log=lambda _: None) as interrupted:
        interrupted.run_round()
    with Simulation.create(_config(2), tmp_path / "resumed", resume=True, log=lambda _: None) as resumed_run:
        resumed_run.run()

    straight, resumed = (serialization.load_file(tmp_path / d / "global-r0002.safetensors")[0] for d in ("straight", "resumed"))
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)
    for cid in client_ids(2):
        kept = checkpoint.load_private(tmp_path / "resumed" / RESIDUALS, cid)
        assert kept is not None and kept[1] == 2
        assert set(kept[0]) == set(LAYOUT.names([Part.DECODER]))


# --- accounting ---------------------------------------------------------------------------------------------
def test_a_strategys_bytes_with_a_codec_are_its_coded_updates_tensor_bytes() -> None:
    summary = account(Strategy.UDEC, LAYOUT.sizes, 3, 2)
    parts = frozenset({Part.DECODER})
    for name in ("int8", "topk:0.05+int4"):
        deltas = {n: torch.randn(s.shape) for n, s in LAYOUT.specs(parts).items()}
        _, entries, _ = serialization.read_header(coded.encode(deltas, PayloadMeta(kind="delta", model="tiny", wire_round=0, parts=parts, codec=name)))

        row = coded_bytes(summary, LAYOUT, Codec.parse(name))

        per_update = sum(e.end - e.begin for e in entries.values())
        assert row.bytes_up == 3 * 2 * per_update  # K x R updates of the decoder
        assert row.bytes_down == 3 * per_update  # round 1 built from the seed (nothing), then the decoder's change
        assert row.full_fedavg_fp32_bytes == 4 * summary.full_fedavg
        assert row.bytes_vs_fedavg_fp32 == round(4 * summary.full_fedavg / (row.bytes_down + row.bytes_up), 3)
        assert row.as_json() == {
            "compression": name,
            "bytes_down": row.bytes_down,
            "bytes_up": row.bytes_up,
            "full_fedavg_fp32_bytes": row.full_fedavg_fp32_bytes,
            "bytes_vs_fedavg_fp32": row.bytes_vs_fedavg_fp32,
        }


# --- coded downloads ----------------------------------------------------------------------------------------
def _runtime(client: str) -> ClientRuntime:
    trainer = LocalTrainer(build_model("tiny", seed=0), Schedule(), SPEED)
    data = trainer.prepare_data(torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(len(client))) * 2 - 1)
    return ClientRuntime(client, "tiny", trainer, data)


def _download_kind(payload: bytes, client: ClientRuntime) -> str:
    """What a download is to a client: the values, a change, or nothing (unchanged); ", seed" when the client
    holds no version and builds the change's base from the seed."""
    meta = serialization.read_meta(payload)
    kind = "values" if meta.base < 0 else "unchanged" if meta.version == meta.base else "change"
    return kind + (", seed" if meta.seed >= 0 and client.shared_version < 0 else "")


def test_every_client_reconstructs_the_shared_model_bit_for_bit_a_late_and_a_restarted_one_from_the_values() -> None:
    train = TrainConfig(epochs=1, batch_size=8, lr=1e-3)
    federation = Federation(FederationConfig(Strategy.FULL, "tiny", rounds=4, seed=3, train=train, compression=Codec.parse("int8")))
    runtimes = {c: _runtime(c) for c in ("a", "b")}
    rounds = [("a", "b"), ("a", "b", "c"), ("a", "b", "c"), ("a", "b", "c")]  # c joins in round 2, b restarts before round 3
    got: dict[tuple[int, str], str] = {}
    for r, clients in enumerate(rounds):
        if r == 1:
            runtimes["c"] = _runtime("c")
        if r == 2:
            runtimes["b"] = _runtime("b")  # a new process: it holds nothing
            federation.forget_holdings("b")
        open_round = federation.open_round(federation.plan(list(clients)), dict.fromkeys(clients, 8))
        for c in clients:
            task = open_round.task(c)
            payload = open_round.payload_for(c)
            got[r, c] = _download_kind(payload, runtimes[c])
            runtimes[c].load(payload, task)
            open_round.mark_sent(c)
            assert runtimes[c].shared_version == federation.shared_version
            assert all(torch.equal(runtimes[c].shared[n], federation.shared[n]) for n in federation.global_state)  # type: ignore[index]
            runtimes[c].train(task)
            open_round.accept(c, runtimes[c].delta_payload(task), mean_loss=0.1, images_seen=8)
        open_round.close()

    assert got == {
        (0, "a"): "unchanged, seed", (0, "b"): "unchanged, seed",
        (1, "a"): "change", (1, "b"): "change", (1, "c"): "change, seed",
        (2, "a"): "change", (2, "b"): "values", (2, "c"): "change",
        (3, "a"): "change", (3, "b"): "change", (3, "c"): "change",
    }  # fmt: skip

    def lead() -> float:
        return max(float((federation.global_state[n] - s).abs().max()) for n, s in federation.shared.items())  # type: ignore[union-attr]

    before = lead()  # the last round's update, not sent yet
    federation.open_round(federation.plan(["a"]), {"a": 8})
    assert 0 < lead() < before / 50  # what this change does not carry (int8's rounding) goes with the next one


def test_a_change_from_another_version_than_the_client_holds_is_refused_and_the_next_download_is_the_values() -> None:
    codec = Codec.parse("int4")
    federation = Federation(FederationConfig(Strategy.FULL, "tiny", rounds=3, seed=3, compression=codec))
    client = _runtime("a")
    steps = {n: torch.full(s.shape, 1e-3) for n, s in LAYOUT.specs(PART_ORDER).items()}  # each round a new version
    for r in range(3):
        open_round = federation.open_round(federation.plan(["a"]), {"a": 8})
        task = open_round.task("a")
        payload = open_round.payload_for("a")
        open_round.mark_sent("a")  # counted every round; the download of round 1 never reaches the client
        if r == 0:
            client.load(payload, task)
        if r == 2:
            with pytest.raises(MissingSharedState, match="holds version 0 of the shared model, the change is from version 1"):
                client.load(payload, task)
            federation.refused_shared("a")  # what the coordinator does when the worker refuses the task so
        meta = PayloadMeta(kind="delta", model="tiny", wire_round=r, parts=task.returns, codec=codec.name)
        open_round.accept("a", coded.encode(steps, meta), mean_loss=0.1, images_seen=8)
        open_round.close()

    open_round = federation.open_round(federation.plan(["a"]), {"a": 8})
    assert serialization.read_meta(open_round.payload_for("a")).base == -1
    client.load(open_round.payload_for("a"), open_round.task("a"))
    assert all(torch.equal(client.shared[n], federation.shared[n]) for n in federation.global_state)  # type: ignore[index]
