"""Tests for fedcore.model.diffusion: the linear schedule, forward noising, the losses and the two samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcore.model.diffusion import (
    DiffusionConfig,
    SamplerKind,
    Schedule,
    noise_loss,
    q_sample,
    sample,
    sample_ddim,
    sample_ddpm,
    training_loss,
)
from fedcore.model.unet import build_model


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return build_model("tiny", seed=0).eval()


@pytest.fixture(scope="module")
def short_schedule() -> Schedule:
    return Schedule(DiffusionConfig(timesteps=20))


# --- schedule --------------------------------------------------------------------------------------------


def test_schedule_is_float64_linear_betas() -> None:
    schedule = Schedule()

    assert schedule.timesteps == 1000
    for name in ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance"):
        assert getattr(schedule, name).dtype == torch.float64, name
    np.testing.assert_allclose(schedule.betas.numpy(), np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-15)
    assert schedule.betas[0].item() == pytest.approx(1e-4, abs=1e-18)
    assert schedule.betas[-1].item() == pytest.approx(0.02, abs=1e-18)


def test_schedule_derived_terms_match_numpy() -> None:
    schedule = Schedule()
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])

    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod_prev.numpy(), abar_prev, rtol=1e-12)
    np.testing.assert_allclose(schedule.sqrt_alphas_cumprod.numpy(), np.sqrt(abar), rtol=1e-12)
    np.testing.assert_allclose(schedule.sqrt_one_minus_alphas_cumprod.numpy(), np.sqrt(1 - abar), rtol=1e-12)
    np.testing.assert_allclose(schedule.posterior_variance.numpy(), betas * (1 - abar_prev) / (1 - abar), rtol=1e-12)
    assert schedule.posterior_variance[0].item() == 0.0
    assert abar[-1] < 1e-4  # x_T is almost pure noise


def test_schedule_device_copies_are_float32_and_cached() -> None:
    schedule = Schedule()

    first = schedule.on("cpu")
    second = schedule.on(torch.device("cpu"))

    assert first is second
    assert first["sqrt_alphas_cumprod"].dtype == torch.float32
    torch.testing.assert_close(first["sqrt_alphas_cumprod"].double(), schedule.sqrt_alphas_cumprod, rtol=1e-7, atol=0)


# --- forward noising and losses --------------------------------------------------------------------------


def test_q_sample_matches_the_closed_form() -> None:
    schedule = Schedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[t.numpy()].reshape(-1, 1, 1, 1)
    expected = np.sqrt(abar) * x0.double().numpy() + np.sqrt(1 - abar) * noise.double().numpy()

    xt = q_sample(schedule, x0, t, noise)

    assert xt.shape == x0.shape and xt.dtype == torch.float32
    np.testing.assert_allclose(xt.double().numpy(), expected, rtol=0, atol=1e-6)
    # t = 0 keeps the image almost intact; t = T-1 is almost pure noise.
    assert (xt[0] - x0[0]).abs().max() < 0.05  # sqrt(1 - abar_0) = 0.01
    assert (xt[-1] - noise[-1]).abs().max() < 0.05


def test_huber_loss_is_smooth_l1() -> None:
    predicted = torch.tensor([0.0, 0.5, -3.0, 2.0])
    target = torch.tensor([0.2, -0.5, 0.0, 2.0])
    diff = (predicted - target).abs()
    expected = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()

    loss = noise_loss(predicted, target, "huber")

    torch.testing.assert_close(loss, expected)


def test_mse_loss_is_mean_squared_error() -> None:
    predicted = torch.tensor([0.0, 0.5, -3.0, 2.0])
    target = torch.tensor([0.2, -0.5, 0.0, 2.0])

    loss = noise_loss(predicted, target, "mse")

    torch.testing.assert_close(loss, ((predicted - target) ** 2).mean())
    assert loss.item() > noise_loss(predicted, target, "huber").item()  # large errors weigh more under MSE


def test_huber_is_half_mse_for_small_errors() -> None:
    g = torch.Generator().manual_seed(1)
    predicted = torch.rand(100, generator=g) * 0.5
    target = torch.rand(100, generator=g) * 0.5

    torch.testing.assert_close(noise_loss(predicted, target, "huber"), 0.5 * noise_loss(predicted, target, "mse"))


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        noise_loss(torch.zeros(2), torch.zeros(2), "l1")  # type: ignore[arg-type]  # an unknown loss, on purpose


def test_training_loss_is_deterministic_for_a_generator(tiny_model: torch.nn.Module) -> None:
    schedule = Schedule()
    x0 = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1

    with torch.no_grad():
        a = training_loss(tiny_model, schedule, x0, "huber", torch.Generator().manual_seed(3))
        b = training_loss(tiny_model, schedule, x0, "huber", torch.Generator().manual_seed(3))
        c = training_loss(tiny_model, schedule, x0, "huber", torch.Generator().manual_seed(4))

    assert a.ndim == 0 and torch.isfinite(a)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --- samplers --------------------------------------------------------------------------------------------


def test_ddim_returns_images_in_range_deterministically(tiny_model: torch.nn.Module) -> None:
    schedule = Schedule()
    shape = (2, 1, 28, 28)

    a = sample_ddim(tiny_model, schedule, shape, steps=5, generator=torch.Generator().manual_seed(0))
    b = sample_ddim(tiny_model, schedule, shape, steps=5, generator=torch.Generator().manual_seed(0))
    c = sample_ddim(tiny_model, schedule, shape, steps=5, generator=torch.Generator().manual_seed(1))

    assert a.shape == shape
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_ddpm_returns_images_in_range_deterministically(tiny_model: torch.nn.Module, short_schedule: Schedule) -> None:
    shape = (2, 1, 28, 28)

    a = sample_ddpm(tiny_model, short_schedule, shape, generator=torch.Generator().manual_seed(0))
    b = sample_ddpm(tiny_model, short_schedule, shape, generator=torch.Generator().manual_seed(0))
    c = sample_ddpm(tiny_model, short_schedule, shape, generator=torch.Generator().manual_seed(1))

    assert a.shape == shape
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_batches_seeds_and_restores_train_mode(sampler: SamplerKind, short_schedule: Schedule) -> None:
    model = build_model("tiny", seed=0).train()

    a = sample(model, short_schedule, 3, sampler=sampler, steps=4, seed=9, batch_size=2)
    b = sample(model, short_schedule, 3, sampler=sampler, steps=4, seed=9, batch_size=2)

    assert a.shape == (3, 1, 28, 28)
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert torch.equal(a, b)
    assert model.training


@pytest.mark.parametrize(("sampler", "total"), [("ddpm", 2 * 20), ("ddim", 2 * 4)])
def test_sample_reports_each_denoising_step_of_each_batch(sampler: SamplerKind, total: int, short_schedule: Schedule) -> None:
    tiny_model = build_model("tiny", seed=0)
    calls: list[tuple[int, int]] = []

    seen = sample(tiny_model, short_schedule, 3, sampler=sampler, steps=4, seed=9, batch_size=2, on_step=lambda done, of: calls.append((done, of)))
    unseen = sample(tiny_model, short_schedule, 3, sampler=sampler, steps=4, seed=9, batch_size=2)

    assert calls == [(done, total) for done in range(1, total + 1)]
    assert torch.equal(seen, unseen)


@pytest.mark.parametrize("steps", [0, -1, 21])
def test_ddim_refuses_step_counts_outside_the_schedule(steps: int, tiny_model: torch.nn.Module, short_schedule: Schedule) -> None:
    with pytest.raises(ValueError, match=r"DDIM steps must be in 1\.\.20"):
        sample_ddim(tiny_model, short_schedule, (1, 1, 28, 28), steps=steps, generator=torch.Generator())


@pytest.mark.parametrize("steps", [1, 20])
def test_ddim_accepts_the_bounds(steps: int, tiny_model: torch.nn.Module, short_schedule: Schedule) -> None:
    out = sample_ddim(tiny_model, short_schedule, (1, 1, 28, 28), steps=steps, generator=torch.Generator())

    assert out.shape == (1, 1, 28, 28)
    assert bool(torch.isfinite(out).all())
