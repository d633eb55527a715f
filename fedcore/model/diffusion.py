"""DDPM maths: the linear noise schedule, forward noising, the training loss, the DDPM / DDIM samplers, and the
sampling spec of an evaluation."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from fedcore.model.denoiser import Denoiser
from fedcore.settings import CONFIG, EvalSamples, SamplingSteps, Seed

LossKind = Literal["huber", "mse"]
# eps_theta(x_t, t) -> predicted noise: a Denoiser, or its torch.compile wrapper.
NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# on_step(done, total) of `sample`: denoising steps taken so far, out of all its batches' steps.
SamplingProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000  # T
    beta_start: float = 1e-4  # beta_1 (Ho et al. 2020, section 4)
    beta_end: float = 0.02  # beta_T
    loss: LossKind = "huber"  # the paper's smooth L1; "mse" is plain DDPM's simplified objective


class Schedule:
    """Linear beta schedule, computed in float64 and kept out of every state dict (it is never trained,
    exchanged or averaged). `on(device)` gives float32 copies for the hot path, cached per device."""

    def __init__(self, cfg: DiffusionConfig = DiffusionConfig()):
        self.config = cfg
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
        self.betas = betas
        self.alphas = alphas
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) variance, beta-tilde (Ho et al. 2020, eq. 7).
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self._device_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    @property
    def timesteps(self) -> int:
        return self.config.timesteps

    def on(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        device = torch.device(device)
        cached = self._device_cache.get(device)
        if cached is None:
            names = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
            cached = {n: getattr(self, n).to(device=device, dtype=torch.float32) for n in names}
            self._device_cache[device] = cached
        return cached


def _gather(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # (T,) indexed by (B,) -> (B, 1, 1, 1) to broadcast over images
    return values[t].view(-1, 1, 1, 1)


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward noising x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4)."""
    c = schedule.on(x0.device)
    return _gather(c["sqrt_alphas_cumprod"], t) * x0 + _gather(c["sqrt_one_minus_alphas_cumprod"], t) * noise


def noise_loss(predicted: torch.Tensor, noise: torch.Tensor, kind: LossKind) -> torch.Tensor:
    if kind == "huber":
        return F.smooth_l1_loss(predicted.float(), noise.float())
    if kind == "mse":
        return F.mse_loss(predicted.float(), noise.float())
    raise ValueError(f"unknown loss {kind!r}; expected 'huber' or 'mse'")


def training_draws(
    schedule: Schedule, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's random draws of Algorithm 1, in this order: t ~ U{0..T-1} per sample (B,), then the noise eps
    of the batch's `shape` (B, C, H, W)."""
    t = torch.randint(0, schedule.timesteps, (shape[0],), device=device, generator=generator)
    noise = torch.randn(shape, device=device, dtype=dtype, generator=generator)
    return t, noise


def noise_prediction_loss(model: NoisePredictor, schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, kind: LossKind) -> torch.Tensor:
    """The loss of predicting `noise` from x_t (Algorithm 1, line 5), a mean over the elements of the batch."""
    return noise_loss(model(q_sample(schedule, x0, t, noise), t), noise, kind)


def training_loss(
    model: NoisePredictor,
    schedule: Schedule,
    x0: torch.Tensor,
    kind: LossKind,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One DDPM training objective: t ~ U{0..T-1} per sample, predict the added noise (Algorithm 1)."""
    t, noise = training_draws(schedule, x0.shape, x0.dtype, x0.device, generator)
    return noise_prediction_loss(model, schedule, x0, t, noise, kind)


SamplerKind = Literal["ddpm", "ddim"]


def ddpm_step(schedule: Schedule, x: torch.Tensor, eps: torch.Tensor, i: int, noise: torch.Tensor | None) -> torch.Tensor:
    """x_{i-1} from x_i and the predicted noise eps (Ho et al. 2020, Algorithm 2, line 4, with sigma_i^2 =
    beta-tilde_i); `noise` is its z, unused at i = 0. Without clipping x_0 this is step() of diffusers'
    DDPMScheduler (epsilon prediction, variance "fixed_small"), which goes through the predicted x_0 (eq. 15
    into eq. 7) to the same mean."""
    beta, alpha = float(schedule.betas[i]), float(schedule.alphas[i])
    sqrt_1m_abar = float(schedule.sqrt_one_minus_alphas_cumprod[i])
    mean = (x - beta / sqrt_1m_abar * eps) / alpha**0.5  # eq. 11
    if i == 0:
        return mean
    if noise is None:
        raise ValueError(f"step {i} > 0 needs its noise z")
    return mean + float(schedule.posterior_variance[i]) ** 0.5 * noise


@torch.no_grad()
def sample_ddpm(
    model: NoisePredictor,
    schedule: Schedule,
    shape: tuple[int, int, int, int],
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2, with sigma_t^2 = beta-tilde_t). The
    noise is drawn as diffusers' DDPMPipeline draws it: x_T, then each step's z after the model's call.
    `on_step` is called after each step (it must not read x: that would wait for the device)."""
    x = torch.randn(shape, generator=generator, device=device)
    for i in reversed(range(schedule.timesteps)):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        eps = model(x, t).float()
        noise = torch.randn(shape, generator=generator, device=device) if i > 0 else None
        x = ddpm_step(schedule, x, eps, i, noise)
        if on_step is not None:
            on_step()
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def sample_ddim(
    model: NoisePredictor,
    schedule: Schedule,
    shape: tuple[int, int, int, int],
    *,
    steps: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0) on `steps` evenly spaced timesteps;
    `on_step` is called after each (it must not read x: that would wait for the device)."""
    if not 1 <= steps <= schedule.timesteps:
        raise ValueError(f"DDIM steps must be in 1..{schedule.timesteps}, got {steps}")
    stride = schedule.timesteps // steps
    timesteps = list(range(0, schedule.timesteps, stride))[:steps]
    x = torch.randn(shape, generator=generator, device=device)
    abar = schedule.alphas_cumprod
    for idx in reversed(range(len(timesteps))):
        i = timesteps[idx]
        abar_t = float(abar[i])
        abar_prev = float(abar[timesteps[idx - 1]]) if idx > 0 else 1.0
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        eps = model(x, t).float()
        x0 = ((x - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5).clamp(-1.0, 1.0)
        eps = (x - abar_t**0.5 * x0) / (1 - abar_t) ** 0.5  # re-derived from the clipped x0
        x = abar_prev**0.5 * x0 + (1 - abar_prev) ** 0.5 * eps
        if on_step is not None:
            on_step()
    return x.clamp(-1.0, 1.0)


def sample(
    model: Denoiser,
    schedule: Schedule,
    n: int,
    *,
    sampler: SamplerKind = "ddim",
    steps: int = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 500,
    on_step: SamplingProgress | None = None,
) -> torch.Tensor:
    """n images in [-1, 1], (n, C, H, W), generated in batches; seeded so the same model gives the same images.
    `on_step(done, total)` is called after each denoising step of each batch: `total` = batches x steps (T for
    DDPM), `done` counts from 1 to it."""
    cfg = model.config
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    total = math.ceil(n / batch_size) * (schedule.timesteps if sampler == "ddpm" else steps)
    done = itertools.count(1)
    tick = None if on_step is None else lambda: on_step(next(done), total)
    try:
        for start in range(0, n, batch_size):
            shape = (min(batch_size, n - start), cfg.channels, cfg.image_size, cfg.image_size)
            if sampler == "ddpm":
                out.append(sample_ddpm(model, schedule, shape, generator=generator, device=device, on_step=tick).cpu())
            else:
                out.append(sample_ddim(model, schedule, shape, steps=steps, generator=generator, device=device, on_step=tick).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


@dataclass(frozen=True)
class SamplingSpec:
    """An evaluate task's sampling; its types carry the ranges a worker runs (`fedcore.settings`)."""

    __pydantic_config__ = CONFIG

    num_samples: EvalSamples = 2000  # images generated per evaluated model
    sampler: SamplerKind = "ddim"  # "ddim" during training, "ddpm" (all T steps) for the paper-protocol number
    steps: SamplingSteps = 100  # DDIM steps
    seed: Seed = 0
