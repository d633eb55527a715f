"""diffusers' UNet2DModel as a feddiff backbone: its config, its part rule, and the module the trainer calls.

diffusers is an optional dependency (the `diffusers` extra): this module imports it only when a model is built,
so that the core, the coordinator and the worker start without it and name the extra when a diffusers preset
is asked for."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from fedcore.errors import ModelUnavailable
from fedcore.model.denoiser import Denoiser
from fedcore.model.parts import Part, PartRule, prefix_rule

if TYPE_CHECKING:
    # from its own module: diffusers' top level defines a placeholder class first (for installs without torch)
    from diffusers.models.unets.unet_2d import UNet2DModel

EXTRA = "diffusers"  # feddiff's optional dependency: pip install 'feddiff[diffusers]'


def import_diffusers(model: str) -> ModuleType:
    """The diffusers package, offline: feddiff reads models from folders on disk and never from a hub
    (HF_HUB_OFFLINE, unless the environment says otherwise). ModelUnavailable, naming the extra, without it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import diffusers
    except ImportError as e:
        raise ModelUnavailable(
            f"model {model!r} is a diffusers UNet2DModel, but diffusers is not installed ({e}): "
            f"install feddiff's optional dependency with pip install 'feddiff[{EXTRA}]'"
        ) from None
    return diffusers


@dataclass(frozen=True)
class DiffusersUNetConfig:
    """A diffusers `UNet2DModel`, by the arguments of its constructor: the keys of the `config.json` that
    diffusers writes beside its weights. Every other argument keeps diffusers' default."""

    sample_size: int = 28  # H = W of the images
    in_channels: int = 1  # image channels in
    out_channels: int = 1  # channels out: the predicted noise
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # width of each resolution; all but the last halve H and W
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")  # one per width
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")  # the mirror image
    layers_per_block: int = 2  # ResNet blocks per down block (up blocks have one more)
    attention_head_dim: int | None = 8  # width of one attention head; None = one head as wide as the block
    norm_num_groups: int = 32  # GroupNorm groups; divides every width
    norm_eps: float = 1e-5
    downsample_padding: int = 1  # 0 = pad right and bottom by one before the stride-2 conv (Ho et al.'s code)
    flip_sin_to_cos: bool = True  # timestep embedding order: cos then sin
    freq_shift: int = 0  # timestep embedding frequency shift
    act_fn: str = "silu"
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0

    @property
    def channels(self) -> int:
        return self.in_channels

    @property
    def image_size(self) -> int:
        return self.sample_size

    def unet_kwargs(self) -> dict[str, Any]:
        """The arguments of `UNet2DModel(...)`."""
        return asdict(self)


DIFFUSERS_UNET_PART_RULE: PartRule = prefix_rule(
    {
        "conv_in": Part.ENCODER,
        "time_proj": Part.ENCODER,  # parameters only with a "fourier" or "learned" time embedding
        "time_embedding": Part.ENCODER,
        "class_embedding": Part.ENCODER,
        "down_blocks": Part.ENCODER,
        "mid_block": Part.BOTTLENECK,
        "up_blocks": Part.DECODER,
        "conv_norm_out": Part.DECODER,
        "conv_out": Part.DECODER,
    }
)


class DiffusersUNet(Denoiser):
    """A `UNet2DModel` as feddiff's trainer and samplers call it: `model(x, t)` is the predicted noise.

    The UNet's own modules are this module's children, under their own names, so the state dict is the one
    diffusers saves and loads (`conv_in.weight`, `down_blocks.0.resnets.0.conv1.weight`, ...), the part rule
    reads diffusers' names, and every payload and export carries them unchanged. The `UNet2DModel` object
    itself (`unet`) shares those modules: it runs the forward pass and is what a pipeline is saved from."""

    config: DiffusersUNetConfig
    part_rule = staticmethod(DIFFUSERS_UNET_PART_RULE)
    unet: UNet2DModel

    def __init__(self, cfg: DiffusersUNetConfig, unet: UNet2DModel):
        super().__init__()
        self.config = cfg
        object.__setattr__(self, "unet", unet)  # not registered: its children are, below
        for name, child in unet.named_children():
            self.add_module(name, child)

    def train(self, mode: bool = True) -> DiffusersUNet:
        super().train(mode)
        self.unet.training = mode
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) noisy images, t: (B,) integer timesteps -> predicted noise (B, C, H, W)
        return self.unet(x, t, return_dict=False)[0]


def build_diffusers_unet(cfg: DiffusersUNetConfig, name: str) -> DiffusersUNet:
    """A freshly initialised UNet2DModel of `cfg` (`name`, the preset, for the error without diffusers)."""
    diffusers = import_diffusers(name)
    return DiffusersUNet(cfg, diffusers.UNet2DModel(**cfg.unet_kwargs()))
