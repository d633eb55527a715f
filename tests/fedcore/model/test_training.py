"""Tests for fedcore.model.training: seeded CPU training is reproducible and a reset optimizer is a fresh one."""

from __future__ import annotations

import pytest
import torch

from fedcore.model.diffusion import Schedule
from fedcore.model.training import LocalTrainer, ResolvedSpeed, SpeedConfig, TrainConfig, TrainingInterrupted, cpu_has_native_bf16
from fedcore.model.unet import build_model

CPU = SpeedConfig(device="cpu")
CFG = TrainConfig(epochs=2, batch_size=16, lr=1e-3)  # 40 images: batches of 16, 16, 8


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _trainer(seed: int = 0) -> LocalTrainer:
    return LocalTrainer(build_model("tiny", seed=seed), Schedule(), CPU)


def _weights(trainer: LocalTrainer) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in trainer.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_cpu_speed_resolves_to_what_measured_fastest_there() -> None:
    speed = ResolvedSpeed.of(CPU)

    assert speed.device == torch.device("cpu")
    assert speed.channels_last and speed.fused_adam and not speed.compile
    assert speed.bf16 == cpu_has_native_bf16()  # emulated bf16 is slower than fp32


def test_training_is_deterministic_for_a_seed(images: torch.Tensor) -> None:
    a, b = _trainer(), _trainer()
    initial = _weights(a)

    ra = a.train(a.prepare_data(images), CFG, seed=7)
    rb = b.train(b.prepare_data(images), CFG, seed=7)

    assert ra.losses == rb.losses
    assert _same(_weights(a), _weights(b))
    assert not _same(_weights(a), initial)  # it did train


def test_a_different_seed_trains_differently(images: torch.Tensor) -> None:
    a, b = _trainer(), _trainer()

    ra = a.train(a.prepare_data(images), CFG, seed=7)
    rb = b.train(b.prepare_data(images), CFG, seed=8)

    assert ra.losses != rb.losses
    assert not _same(_weights(a), _weights(b))


def test_reset_optimizer_equals_a_fresh_optimizer(images: torch.Tensor) -> None:
    reused = _trainer()
    data = reused.prepare_data(images)
    reused.train(data, CFG, seed=1)  # round 1 leaves Adam moments behind
    after_round_1 = _weights(reused)
    assert any(bool(v.abs().sum() > 0) for s in reused.optimizer.state.values() for v in s.values() if torch.is_tensor(v))

    fresh_model = build_model("tiny", seed=99)
    fresh_model.load_state_dict(after_round_1)
    fresh = LocalTrainer(fresh_model, Schedule(), CPU)

    r_reused = reused.train(data, CFG, seed=2)
    r_fresh = fresh.train(fresh.prepare_data(images), CFG, seed=2)

    assert r_reused.losses == r_fresh.losses
    assert _same(_weights(reused), _weights(fresh))


def test_reset_optimizer_sets_the_learning_rate(images: torch.Tensor) -> None:
    trainer = _trainer()

    trainer.train(trainer.prepare_data(images), TrainConfig(epochs=1, batch_size=40, lr=3e-3), seed=0)

    assert all(group["lr"] == 3e-3 for group in trainer.optimizer.param_groups)


def test_train_result_counts_images_and_steps(images: torch.Tensor) -> None:
    trainer = _trainer()
    calls = []

    result = trainer.train(trainer.prepare_data(images), CFG, seed=0, on_step=lambda *a: calls.append(a[:3]))

    assert result.images_seen == CFG.epochs * 40 == 80
    assert result.steps == CFG.epochs * 3 == len(result.losses) == len(calls)
    assert calls[:3] == [(0, 0, 3), (0, 1, 3), (0, 2, 3)] and calls[-1] == (1, 2, 3)
    assert result.mean_loss == pytest.approx(sum(result.losses) / len(result.losses))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.seconds > 0 and result.images_per_second > 0


def test_mse_loss_trains_too(images: torch.Tensor) -> None:
    huber, mse = _trainer(), _trainer()

    rh = huber.train(huber.prepare_data(images), TrainConfig(epochs=1, batch_size=40), seed=0)
    rm = mse.train(mse.prepare_data(images), TrainConfig(epochs=1, batch_size=40, loss="mse"), seed=0)

    assert rm.mean_loss > rh.mean_loss  # same noise and timesteps: MSE of the same errors is larger than Huber


def test_should_stop_interrupts_between_steps(images: torch.Tensor) -> None:
    trainer = _trainer()
    steps = []

    with pytest.raises(TrainingInterrupted, match="epoch 0, step 2"):
        trainer.train(trainer.prepare_data(images), CFG, seed=0, on_step=lambda *a: steps.append(a), should_stop=lambda: len(steps) >= 2)

    assert len(steps) == 2


def test_empty_shard_is_refused() -> None:
    trainer = _trainer()

    with pytest.raises(ValueError, match="empty shard"):
        trainer.train(torch.empty(0, 1, 28, 28), CFG, seed=0)


def test_prepare_data_is_float32_on_the_device() -> None:
    trainer = _trainer()

    data = trainer.prepare_data(torch.zeros(3, 1, 28, 28, dtype=torch.float64))

    assert data.dtype == torch.float32 and data.device.type == "cpu" and data.is_contiguous()


def test_cuda_request_without_cuda_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match=r"^device 'cuda': no such device here; this machine offers auto, cpu$"):
        ResolvedSpeed.of(SpeedConfig(device="cuda"))
