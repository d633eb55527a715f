"""The paper's UNet ("The Annotated Diffusion Model" design: ConvNeXt blocks, linear attention), and the model
presets: the paper's UNets and diffusers' UNet2DModels (fedcore.model.diffusers_unet), each built by name."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedcore.model.denoiser import Denoiser
from fedcore.model.diffusers_unet import DiffusersUNetConfig, build_diffusers_unet
from fedcore.model.parts import Part, PartLayout, PartRule, prefix_rule


@dataclass(frozen=True)
class UNetConfig:
    dim: int = 28  # base width; stage widths are dim * dim_mults
    dim_mults: tuple[int, ...] = (1, 2, 4)  # one down stage per entry; all but the last halve H and W
    channels: int = 1  # image channels in and out (the network predicts the noise)
    image_size: int = 28  # H = W of the images this model is trained on
    heads: int = 4  # attention heads in every (linear) attention layer
    dim_head: int = 32  # width of one attention head
    convnext_mult: int = 2  # ConvNeXt expansion factor

    @property
    def init_dim(self) -> int:
        return self.dim // 3 * 2

    @property
    def time_dim(self) -> int:
        return self.dim * 4


ModelConfig = UNetConfig | DiffusersUNetConfig  # a backbone family, by its config type

# the presets, as a setting's type
ModelName = Literal["paper-fmnist", "paper-celeba64", "tiny", "diffusers-tiny", "diffusers-fmnist", "ddpm-cifar10"]

PRESETS: dict[str, ModelConfig] = {
    # Fashion-MNIST 28x28, the paper's main model: 2,996,315 parameters.
    "paper-fmnist": UNetConfig(),
    # CelebA 64x64 RGB: 14,892,477 parameters.
    "paper-celeba64": UNetConfig(dim=64, channels=3, image_size=64),
    # For tests: same topology and part structure, 143,951 parameters; a CPU step at batch 128 takes ~0.3 s.
    "tiny": UNetConfig(dim=6, heads=2, dim_head=8),
    # diffusers UNet2DModel for tests and CPUs, Fashion-MNIST 28x28: 3 resolutions, attention at 14x14.
    "diffusers-tiny": DiffusersUNetConfig(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    ),
    # diffusers UNet2DModel for Fashion-MNIST 28x28, attention at 14x14 and 7x7 (the class defaults).
    "diffusers-fmnist": DiffusersUNetConfig(),
    # DDPM CIFAR-10 32x32 (Ho et al. 2020) as diffusers publishes it (google/ddpm-cifar10-32): 35,746,307 parameters.
    "ddpm-cifar10": DiffusersUNetConfig(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=None,
        norm_num_groups=32,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


class SinusoidalPositionEmbeddings(nn.Module):
    """Transformer position encoding of the timestep (Vaswani et al. 2017, section 3.5)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # (B,) -> (B, dim)
        half = self.dim // 2
        scale = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -scale)
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class ConvNextBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022) with the time embedding added after the depthwise conv."""

    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: int | None, mult: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(time_emb_dim, dim)) if time_emb_dim else None
        self.ds_conv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.net = nn.Sequential(
            nn.GroupNorm(1, dim),
            nn.Conv2d(dim, dim_out * mult, 3, padding=1),
            nn.GELU(),
            nn.GroupNorm(1, dim_out * mult),
            nn.Conv2d(dim_out * mult, dim_out, 3, padding=1),
        )
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ds_conv(x)
        if self.mlp is not None and time_emb is not None:
            h = h + self.mlp(time_emb)[:, :, None, None]  # (B, dim) -> (B, dim, 1, 1)
        return self.net(h) + self.res_conv(x)


class Attention(nn.Module):
    """Full softmax self-attention over all H*W positions."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # (B, 3*heads*d, H, W) -> 3 x (B, heads, H*W, d)
        q, k, v = (t.reshape(b, self.heads, -1, h * w).transpose(-1, -2) for t in self.to_qkv(x).chunk(3, dim=1))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, d)
        out = out.transpose(-1, -2).reshape(b, -1, h, w)
        return self.to_out(out)


class LinearAttention(nn.Module):
    """Linear attention (Shen et al. 2018): softmax over features for q, over positions for k."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # (B, 3*heads*d, H, W) -> 3 x (B, heads, d, H*W)
        q, k, v = (t.reshape(b, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)  # (B, heads, d, d)
        out = torch.einsum("bhde,bhdn->bhen", context, q)  # (B, heads, d, H*W)
        return self.to_out(out.reshape(b, -1, h, w))


class PreNormResidual(nn.Module):
    """x + fn(GroupNorm(x)); keeps the parameter names `fn.fn.*` / `fn.norm.*` of the reference code."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = _PreNorm(dim, fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class DownStage(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, cfg: UNetConfig, *, downsample: bool):
        super().__init__()
        self.block1 = ConvNextBlock(dim_in, dim_out, time_emb_dim=cfg.time_dim, mult=cfg.convnext_mult)
        self.block2 = ConvNextBlock(dim_out, dim_out, time_emb_dim=cfg.time_dim, mult=cfg.convnext_mult)
        self.attn = PreNormResidual(dim_out, LinearAttention(dim_out, cfg.heads, cfg.dim_head))
        self.resample = nn.Conv2d(dim_out, dim_out, 4, 2, 1) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, dim_in, H, W) -> the skip (B, dim_out, H, W) and the next stage's input (B, dim_out, H/2, W/2)
        x = self.attn(self.block2(self.block1(x, temb), temb))
        return x, self.resample(x)


class UpStage(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, cfg: UNetConfig):
        super().__init__()
        self.block1 = ConvNextBlock(dim_in * 2, dim_out, time_emb_dim=cfg.time_dim, mult=cfg.convnext_mult)
        self.block2 = ConvNextBlock(dim_out, dim_out, time_emb_dim=cfg.time_dim, mult=cfg.convnext_mult)
        self.attn = PreNormResidual(dim_out, LinearAttention(dim_out, cfg.heads, cfg.dim_head))
        self.resample = nn.ConvTranspose2d(dim_out, dim_out, 4, 2, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # (B, dim_in, H, W) and its skip (B, dim_in, H, W) -> (B, dim_out, 2H, 2W)
        x = torch.cat((x, skip), dim=1)
        return self.resample(self.attn(self.block2(self.block1(x, temb), temb)))


UNET_PART_RULE: PartRule = prefix_rule(
    {
        "init_conv": Part.ENCODER,
        "time_mlp": Part.ENCODER,
        "downs": Part.ENCODER,
        "mid_block1": Part.BOTTLENECK,
        "mid_attn": Part.BOTTLENECK,
        "mid_block2": Part.BOTTLENECK,
        "ups": Part.DECODER,
        "final_block": Part.DECODER,
        "final_conv": Part.DECODER,
    }
)


class UNet(Denoiser):
    """Noise-prediction UNet. Parameter name prefixes define the parts (UNET_PART_RULE):
    encoder = init_conv, time_mlp, downs; bottleneck = mid_*; decoder = ups, final_*."""

    config: UNetConfig
    part_rule = staticmethod(UNET_PART_RULE)

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        widths = [cfg.init_dim, *(cfg.dim * m for m in cfg.dim_mults)]
        in_out = list(itertools.pairwise(widths))
        self.init_conv = nn.Conv2d(cfg.channels, cfg.init_dim, 7, padding=3)
        self.time_mlp = nn.Sequential(
            SinusoidalPositionEmbeddings(cfg.dim),
            nn.Linear(cfg.dim, cfg.time_dim),
            nn.GELU(),
            nn.Linear(cfg.time_dim, cfg.time_dim),
        )
        self.downs = nn.ModuleList(DownStage(d_in, d_out, cfg, downsample=i < len(in_out) - 1) for i, (d_in, d_out) in enumerate(in_out))
        mid = widths[-1]
        self.mid_block1 = ConvNextBlock(mid, mid, time_emb_dim=cfg.time_dim, mult=cfg.convnext_mult)
        self.mid_attn = PreNormResidual(mid, Attention(mid, cfg.heads, cfg.dim_head))
        self.mid_block2 = ConvNextBlock(mid, mid, time_emb_dim=cfg.time_dim, mult=cfg.convnext_mult)
        # Skips come from the deepest stages only, so the up path has one stage fewer than the down path.
        self.ups = nn.ModuleList(UpStage(d_out, d_in, cfg) for d_in, d_out in reversed(in_out[1:]))
        self.final_block = ConvNextBlock(cfg.dim, cfg.dim, time_emb_dim=None, mult=cfg.convnext_mult)
        self.final_conv = nn.Conv2d(cfg.dim, cfg.channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) noisy images, t: (B,) integer timesteps -> predicted noise (B, C, H, W)
        x = self.init_conv(x)
        temb = self.time_mlp(t)
        skips = []
        for stage in self.downs:
            skip, x = stage(x, temb)
            skips.append(skip)
        x = self.mid_block1(x, temb)
        x = self.mid_attn(x)
        x = self.mid_block2(x, temb)
        for stage in self.ups:
            x = stage(x, skips.pop(), temb)
        return self.final_conv(self.final_block(x))


def _build(cfg: ModelConfig, name: str) -> Denoiser:
    if isinstance(cfg, DiffusersUNetConfig):
        return build_diffusers_unet(cfg, name)
    return UNet(cfg)


def build_model(cfg: ModelConfig | str, *, seed: int | None = None) -> Denoiser:
    """A freshly initialised model of a preset or config; with a seed the weights are the same on every
    machine. ModelUnavailable when its backbone needs a dependency that is not installed."""
    name = cfg if isinstance(cfg, str) else type(cfg).__name__
    if isinstance(cfg, str):
        cfg = preset(cfg)
    if seed is None:
        return _build(cfg, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(cfg, name)


def layout_of(model: Denoiser) -> PartLayout:
    """The part schema of a model, from its own part rule."""
    return PartLayout.of(model.state_dict(), model.part_rule)
