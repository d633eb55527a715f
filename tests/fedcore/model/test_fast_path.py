"""The worker's fast path trains the same function as the fp32 eager loop, and is built once and
reused every round: same parameters, same optimizer state tensors, the same compiled module."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fedcore.federation.client import ClientRuntime, TrainTask
from fedcore.federation.engine import Federation, FederationConfig
from fedcore.federation.strategies import Strategy
from fedcore.model.diffusion import Schedule
from fedcore.model.parts import ALL_PARTS
from fedcore.model.training import LocalTrainer, ResolvedSpeed, SpeedConfig, TrainConfig
from fedcore.model.unet import build_model

FP32_EAGER: dict[str, Any] = {"bf16": "off", "channels_last": "off", "fused_adam": "off", "compile": "off"}
BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits
STEPS = 200
# On CPU, 100 steps at lr 2e-3 learn what 200 at 1e-3 do (the last losses a third of the first) in half the time,
# and a fast path whose Adam steps 5% too far still fails the bf16 bounds.
CPU_STEPS, CPU_LR = 100, 2e-3


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth blobs in [-1, 1] (learnable, unlike white noise): (n, 1, size, size)."""
    coarse = torch.rand(n, 1, size // 4, size // 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(size, size), mode="bilinear") * 2 - 1


def _run(speed: SpeedConfig, images: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(per-step losses, flat weight change, images seen) of one training from the same init and seed."""
    trainer = LocalTrainer(build_model("tiny", seed=0), Schedule(), speed)
    before = torch.cat([p.detach().float().flatten().cpu() for p in trainer.model.parameters()])
    result = trainer.train(trainer.prepare_data(images), cfg, seed=3)
    after = torch.cat([p.detach().float().flatten().cpu() for p in trainer.model.parameters()])
    return torch.tensor(result.losses), after - before, result.images_seen


def _assert_same_function(fast: tuple, ref: tuple, bf16: bool, steps: int = STEPS) -> None:
    (fast_losses, fast_change, fast_seen), (ref_losses, ref_change, ref_seen) = fast, ref
    assert fast_seen == ref_seen and len(fast_losses) == len(ref_losses) == steps
    rel = (fast_losses - ref_losses).abs() / ref_losses
    if bf16:
        assert rel.max() <= 4 * BF16_EPS, f"step {int(rel.argmax())} differs by {float(rel.max()):.2%}"
        assert rel.mean() <= BF16_EPS
        assert F.cosine_similarity(fast_change, ref_change, dim=0) >= 0.99
    else:
        assert rel.max() <= 1e-5
    assert ref_losses[-20:].mean() < 0.5 * ref_losses[:5].mean()  # it learned something


@pytest.mark.slow
def test_cpu_fast_path_loss_curve_stays_within_bf16_tolerance_of_fp32_eager() -> None:
    images = _images(320)
    cfg = TrainConfig(epochs=CPU_STEPS * 16 // 320, batch_size=16, lr=CPU_LR)
    fast_speed = SpeedConfig(device="cpu")  # auto: what measured fastest on this CPU

    fast = _run(fast_speed, images, cfg)
    ref = _run(SpeedConfig(device="cpu", **FP32_EAGER), images, cfg)

    _assert_same_function(fast, ref, bf16=ResolvedSpeed.of(fast_speed).bf16, steps=CPU_STEPS)


def test_every_toggle_can_be_turned_off() -> None:
    speed = ResolvedSpeed.of(SpeedConfig(device="cpu", **FP32_EAGER))

    assert not (speed.bf16 or speed.channels_last or speed.fused_adam or speed.compile or speed.cuda_graphs)


def test_the_last_partial_batch_is_trained() -> None:
    trainer = LocalTrainer(build_model("tiny", seed=0), Schedule(), SpeedConfig(device="cpu"))

    result = trainer.train(trainer.prepare_data(_images(40)), TrainConfig(epochs=1, batch_size=16), seed=0)

    assert result.images_seen == 40 and result.steps == 3


def _task(round_index: int) -> TrainTask:
    parts = frozenset(ALL_PARTS)
    return TrainTask(round_index, f"r{round_index}", parts, parts, frozenset(), TrainConfig(epochs=1, batch_size=8, lr=1e-3), seed=round_index)


def test_rounds_reuse_the_same_parameters_optimizer_state_and_module() -> None:
    fed = Federation(FederationConfig(strategy=Strategy.FULL, model="tiny"))
    trainer = LocalTrainer(build_model("tiny", seed=5), Schedule(), SpeedConfig(device="cpu"))
    runtime = ClientRuntime("alice", "tiny", trainer, trainer.prepare_data(_images(16)))
    net, optimizer = trainer.net, trainer.optimizer
    params = {n: p.data_ptr() for n, p in trainer.model.named_parameters()}
    payload = bytearray(fed.open_round(fed.plan(["alice"]), {"alice": 16}).payload(frozenset(ALL_PARTS)))

    states = []
    for _ in range(2):  # two rounds on the same weights payload
        task = _task(0)
        runtime.load(payload, task)
        assert all(torch.equal(trainer.model.state_dict()[n].cpu(), fed.global_state[n]) for n in fed.global_state)
        runtime.train(task)
        states.append({id(p): [v.data_ptr() for v in s.values() if torch.is_tensor(v)] for p, s in optimizer.state.items()})

    assert trainer.net is net and trainer.optimizer is optimizer
    assert {n: p.data_ptr() for n, p in trainer.model.named_parameters()} == params  # weights loaded in place
    assert states[0] == states[1]  # Adam's state was reset in place, not re-created


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_fast_path_matches_fp32_eager_and_compiles_once() -> None:
    from torch._dynamo.utils import counters

    images = _images(320).cuda()
    cfg = TrainConfig(epochs=STEPS * 16 // 320, batch_size=16, lr=1e-3)
    fast_speed = SpeedConfig(device="cuda")
    assert ResolvedSpeed.of(fast_speed).cuda_graphs

    fast = _run(fast_speed, images, cfg)
    ref = _run(SpeedConfig(device="cuda", **FP32_EAGER), images, cfg)

    _assert_same_function(fast, ref, bf16=ResolvedSpeed.of(fast_speed).bf16)
    trainer = LocalTrainer(build_model("tiny", seed=0), Schedule(), fast_speed)
    data = trainer.prepare_data(images[:40])  # batches of 16, 16 and 8: two static shapes
    trainer.train(data, TrainConfig(epochs=1, batch_size=16), seed=0)
    graphs = counters["stats"]["unique_graphs"]
    trainer.train(data, TrainConfig(epochs=1, batch_size=16), seed=1)  # the next round: nothing new compiled
    assert counters["stats"]["unique_graphs"] == graphs
