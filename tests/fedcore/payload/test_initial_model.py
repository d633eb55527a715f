"""Coded downloads of a fresh run: a round that changes nothing sends nothing, and a client builds version 0 of the
shared model (the initial model) from the run's seed, checked by digest; a build that differs falls back to the
values, a resumed run or one started from given weights never seeds, and malformed seed metadata is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from fedcore.errors import MissingSharedState, NotSafetensors, SchemaError
from fedcore.federation.client import ClientRuntime, TrainTask
from fedcore.federation.engine import Federation, FederationConfig, OpenRound
from fedcore.federation.strategies import Strategy
from fedcore.model.diffusion import Schedule
from fedcore.model.parts import ALL_PARTS, PART_ORDER, Part
from fedcore.model.training import LocalTrainer, SpeedConfig, TrainConfig
from fedcore.model.unet import build_model, layout_of
from fedcore.payload import coded, initial, serialization
from fedcore.payload.codecs import Codec
from fedcore.payload.serialization import PayloadMeta

SPEED = SpeedConfig(device="cpu", threads=1)
LAYOUT = layout_of(build_model("tiny", seed=0))
TRAIN = TrainConfig(epochs=1, batch_size=8, lr=1e-3)


def _federation(strategy: Strategy = Strategy.FULL, codec: str = "int8", **kwargs: object) -> Federation:
    return Federation(FederationConfig(strategy, "tiny", rounds=4, seed=3, train=TRAIN, compression=Codec.parse(codec)), **kwargs)  # type: ignore[arg-type]


def _runtime(client: str) -> ClientRuntime:
    """A client whose model starts from another seed than the run's: what it loads is what it was sent."""
    trainer = LocalTrainer(build_model("tiny", seed=11), Schedule(), SPEED)
    data = trainer.prepare_data(torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(len(client))) * 2 - 1)
    return ClientRuntime(client, "tiny", trainer, data)


def _open(federation: Federation, clients: list[str]) -> OpenRound:
    return federation.open_round(federation.plan(clients), dict.fromkeys(clients, 8))


def _step(open_round: OpenRound, client: str, task: TrainTask, value: float = 1e-3) -> None:
    """`client`'s update: `value` added to every parameter it returns (a new version of the shared model)."""
    steps = {n: torch.full(s.shape, value) for n, s in LAYOUT.specs(task.returns).items()}
    meta = PayloadMeta(kind="delta", model="tiny", wire_round=task.round_index, parts=task.returns, codec=task.codec.name)
    open_round.accept(client, coded.encode(steps, meta), mean_loss=0.1, images_seen=8)


def _model(runtime: ClientRuntime) -> dict[str, torch.Tensor]:
    """The client's full model as it samples with it (its personalised one under udec/ulatdec), a copy."""
    return {n: t.clone() for n, t in runtime.sampling_model().state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> bool:
    return all(torch.equal(a[n], b[n]) for n in names)


ALL_NAMES = LAYOUT.names(PART_ORDER)


def test_round_one_of_a_fresh_run_sends_no_tensors_and_the_client_builds_the_initial_model_from_the_seed() -> None:
    federation, client = _federation(), _runtime("a")
    open_round = _open(federation, ["a"])
    payload = open_round.payload_for("a")

    meta = serialization.read_meta(payload)
    assert (meta.version, meta.base, meta.codec, meta.seed, meta.digest) == (0, 0, "int8", 3, federation.seed_digest)
    assert serialization.read_header(payload)[1] == {}  # no tensors: a few hundred bytes of header
    assert len(payload) < 1024 < 4 * LAYOUT.total
    assert federation.seed_digest == initial.state_digest(initial.initial_state("tiny", 3), LAYOUT)

    client.load(payload, open_round.task("a"))
    open_round.mark_sent("a")

    assert client.shared_version == 0
    assert _equal(_model(client), federation.global_state, ALL_NAMES)  # the initial model, bit for bit
    assert _equal(client.shared, federation.shared, ALL_NAMES)  # type: ignore[arg-type]
    # the paper's count: the whole model received; the bytes: what went over the wire
    ledger = open_round.ledger_so_far()
    assert sum(ledger.traffic.down.values()) == LAYOUT.total
    assert sum(ledger.bytes_down.values()) == len(payload)


def test_a_round_opened_again_without_a_change_makes_no_version_and_its_holders_apply_nothing() -> None:
    federation, client = _federation(), _runtime("a")
    open_round = _open(federation, ["a"])
    task = open_round.task("a")
    client.load(open_round.payload_for("a"), task)
    open_round.mark_sent("a")
    _step(open_round, "a", task)
    open_round.close()
    open_round = _open(federation, ["a"])  # round 2: version 1, the change from version 0
    client.load(open_round.payload_for("a"), open_round.task("a"))
    open_round.mark_sent("a")
    before = _model(client)
    # int8 rounded the change: the global model's lead would go with the next one. A change the shared model
    # reconstructs exactly leaves none:
    federation.global_state = {n: s.clone() for n, s in federation.shared.items()}  # type: ignore[union-attr]

    again = _open(federation, ["a"])  # the same round after an attempt without quorum
    payload = again.payload_for("a")
    meta = serialization.read_meta(payload)
    client.load(payload, again.task("a"))

    assert federation.shared_version == 1
    assert (meta.version, meta.base, meta.seed) == (1, 1, -1)  # unchanged; version 0 is past: no seed
    assert serialization.read_header(payload)[1] == {}
    assert client.shared_version == 1
    assert _equal(_model(client), before, ALL_NAMES)
    assert _equal(client.shared, federation.shared, ALL_NAMES)  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", [Strategy.UDEC, Strategy.ULATDEC])
def test_a_client_first_contacted_in_round_two_applies_the_change_to_the_model_it_builds_from_the_seed(strategy: Strategy) -> None:
    federation = _federation(strategy, "topk:0.05+int8")
    early = _runtime("a")
    open_round = _open(federation, ["a"])
    task = open_round.task("a")
    early.load(open_round.payload_for("a"), task)
    open_round.mark_sent("a")
    early.train(task)
    open_round.accept("a", early.delta_payload(task), mean_loss=0.1, images_seen=8)
    open_round.close()

    open_round = _open(federation, ["a", "b"])
    late, from_values = _runtime("b"), _runtime("b")
    task = open_round.task("b")
    payload = open_round.payload_for("b")
    meta = serialization.read_meta(payload)
    late.load(payload, task)
    from_values.load(open_round.payload(ALL_PARTS), task)  # what it downloaded before: version 1's values

    assert task.receives == ALL_PARTS and task.private_parts  # the first contact: the private parts come with it
    assert (meta.version, meta.base, meta.seed) == (1, 0, 3)
    assert len(payload) < 4 * LAYOUT.total / 5
    assert _equal(_model(late), _model(from_values), ALL_NAMES)  # shared and private parts, bit for bit
    assert _equal(late.shared, federation.shared, ALL_NAMES)  # type: ignore[arg-type]


def test_a_build_from_the_seed_that_differs_is_refused_naming_both_digests_and_the_client_gets_the_values(monkeypatch: pytest.MonkeyPatch) -> None:
    federation, client = _federation(), _runtime("a")
    built = initial.initial_state

    def another_platform(model: str, seed: int) -> dict[str, torch.Tensor]:
        state = built(model, seed)
        state[ALL_NAMES[0]].view(-1)[0] += 1e-7  # one value initialised otherwise
        return state

    monkeypatch.setattr(initial, "initial_state", another_platform)
    open_round = _open(federation, ["a"])
    before = _model(client)
    ours = initial.state_digest(another_platform("tiny", 3), LAYOUT)

    with pytest.raises(MissingSharedState, match=f"seed 3 as digest {ours}, the coordinator's is {federation.seed_digest}"):
        client.load(open_round.payload_for("a"), open_round.task("a"))
    federation.refused_shared("a")  # what the coordinator does when the worker refuses its task so

    assert _equal(_model(client), before, ALL_NAMES) and client.shared_version == -1
    again = _open(federation, ["a"])  # the round again (no quorum): version 0 still, never the seed for this client
    payload = again.payload_for("a")
    meta = serialization.read_meta(payload)
    assert (meta.version, meta.base, meta.seed) == (0, -1, -1)
    client.load(payload, again.task("a"))
    again.mark_sent("a")
    assert _equal(_model(client), federation.global_state, ALL_NAMES)
    task = again.task("a")
    _step(again, "a", task)
    again.close()
    later = _open(federation, ["a"])  # it holds version 0 now: the change from it, applied to what it holds
    meta = serialization.read_meta(later.payload_for("a"))
    assert (meta.version, meta.base) == (1, 0)
    client.load(later.payload_for("a"), later.task("a"))  # no build (this one would differ again)
    assert _equal(client.shared, federation.shared, ALL_NAMES)  # type: ignore[arg-type]


def test_a_restarted_client_builds_version_0_again_from_the_seed() -> None:
    federation = _federation()
    open_round = _open(federation, ["a"])
    _runtime("a").load(open_round.payload_for("a"), open_round.task("a"))
    open_round.mark_sent("a")
    federation.forget_holdings("a")  # it restarted: a new process holds nothing

    assert not open_round.send_values("a")  # its download stays the one built from the seed
    restarted = _runtime("a")
    restarted.load(open_round.payload_for("a"), open_round.task("a"))
    assert _equal(restarted.shared, federation.shared, ALL_NAMES)  # type: ignore[arg-type]


def test_a_resumed_run_and_one_from_given_weights_never_build_from_the_seed(tmp_path: Path) -> None:
    federation = _federation()
    open_round = _open(federation, ["a"])
    task = open_round.task("a")
    open_round.mark_sent("a")
    _step(open_round, "a", task)
    open_round.close()
    federation.save(tmp_path)
    given = {n: t + 0.5 for n, t in build_model("tiny", seed=3).state_dict().items()}

    resumed = Federation.restore(federation.config, tmp_path)
    started = _federation(global_state=given)

    for fed in (resumed, started):
        assert fed is not None and fed.seed_digest is None
        client = _runtime("a")
        open_round = _open(fed, ["a"])
        payload = open_round.payload_for("a")
        meta = serialization.read_meta(payload)
        assert (meta.base, meta.seed) == (-1, -1)  # the values
        client.load(payload, open_round.task("a"))
        assert _equal(_model(client), fed.shared, ALL_NAMES)  # type: ignore[arg-type]


def _seeded_payload(**fields: str) -> bytes:
    """Round 1's payload of a fresh int8 run (seed 3) for the whole model, its metadata fields replaced."""
    federation = _federation()
    meta = serialization.read_meta(_open(federation, ["a"]).payload_for("a"))
    return safetensors.torch.save({}, metadata={**meta.as_metadata(), **fields})


DIGEST = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"seed": "x3"}, "seed 'x3' is not an integer"),
        ({"seed": "-3"}, "seed '-3' is not an integer"),
        ({"seed": str(1 << 64)}, "is not an integer in 0..18446744073709551615"),
        ({"seed": "\uff13"}, "is not an integer"),  # a decimal digit (fullwidth 3), but not ASCII
        ({"digest": DIGEST.upper()}, "is not 64 lowercase hex digits"),
        ({"digest": DIGEST[:63]}, "is not 64 lowercase hex digits"),
        ({"digest": ""}, "is not 64 lowercase hex digits"),
        ({"seed": "3", "digest": DIGEST, "base": "1", "version": "2"}, "a seed with base '1'"),
    ],
)
def test_malformed_seed_metadata_is_refused_and_the_model_is_untouched(fields: dict[str, str], words: str) -> None:
    payload = _seeded_payload(**fields)
    client = _runtime("a")
    before = _model(client)
    task = TrainTask(0, "t", ALL_PARTS, ALL_PARTS, frozenset(), TRAIN, 0, Codec.parse("int8"))

    with pytest.raises(NotSafetensors, match=words):
        client.load(payload, task)

    assert _equal(_model(client), before, ALL_NAMES) and client.shared_version == -1 and not client.shared


def test_a_seed_without_its_digest_is_refused() -> None:
    payload = _seeded_payload()
    metadata = dict(serialization.read_header(payload)[0])
    del metadata["digest"]

    with pytest.raises(NotSafetensors, match="digest '' is not 64 lowercase hex digits"):
        serialization.read_meta(safetensors.torch.save({}, metadata=metadata))


def test_an_unchanged_payload_that_holds_tensors_is_refused() -> None:
    federation, client = _federation(), _runtime("a")
    open_round = _open(federation, ["a"])
    meta = serialization.read_meta(open_round.payload_for("a"))
    task = open_round.task("a")
    payload = coded.encode({n: torch.zeros(s.shape) for n, s in LAYOUT.specs(PART_ORDER).items()}, meta)
    before = _model(client)

    with pytest.raises(SchemaError, match="unchanged payload of version 0 holds tensor"):
        client.load(payload, task)
    assert _equal(_model(client), before, ALL_NAMES)


def test_a_run_without_compression_sends_the_values_as_before() -> None:
    federation = _federation(codec="none")
    open_round = _open(federation, ["a"])
    meta = serialization.read_meta(open_round.payload_for("a"))

    assert federation.seed_digest is None and federation.shared is None
    assert (meta.version, meta.base, meta.seed, meta.codec) == (-1, -1, -1, "none")
    assert "seed" not in serialization.read_header(open_round.payload_for("a"))[0]
    assert Part.DECODER in open_round.task("a").receives
