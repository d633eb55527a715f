"""The network the trainer and the samplers call, eps_theta(x_t, t): what every backbone declares of itself."""

from __future__ import annotations

from typing import Protocol

from torch import nn

from fedcore.model.parts import PartRule


class ImageShape(Protocol):
    """What code that does not know the backbone reads of its config: the images it generates."""

    @property
    def channels(self) -> int: ...

    @property
    def image_size(self) -> int: ...


class Denoiser(nn.Module):
    """A noise-prediction network: `model(x, t)`, x (B, C, H, W) noisy images and t (B,) integer timesteps,
    is the predicted noise (B, C, H, W). Each backbone (unet.py, diffusers_unet.py) sets its config and the
    rule that names the part of each of its parameters."""

    config: ImageShape
    part_rule: PartRule
