"""Training throughput of the worker's fast path on a diffusers UNet2DModel against a plain diffusers training
loop, same model, batch, images and device.

- diffusers loop: the loop of diffusers' unconditional-image-generation example, plainly: a DataLoader over a
  Dataset with per-item transforms (uint8 -> [0, 1] -> [-1, 1]), the batch copied to the device every step,
  `UNet2DModel(...).sample`, `DDPMScheduler.add_noise`, MSE on the noise, AdamW, fp32, eager.
- fast path: fedcore.model.training.LocalTrainer as the worker builds it around the same architecture (the preset's
  UNet2DModel): data on the device, bf16 autocast, channels_last, fused Adam, torch.compile with CUDA graphs
  on CUDA (each per the --flags), the same objective (--loss mse).
Both start from the same initial weights and run in alternating blocks so that both see the same machine load.
The images are seeded uniform noise of the preset's shape unless --data-dir gives a folder: throughput does
not depend on what the pixels show.

    python -m bench.diffusers_throughput                              # a GPU: ddpm-cifar10, batch 128
    python -m bench.diffusers_throughput --quick                      # CPU smoke: diffusers-tiny, a few steps
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from bench.report import emit, log, machine
from bench.train_throughput import add_speed_flags, compare, speed_from, sync
from fedcore.data.datasets import to_model_range
from fedcore.model.diffusers_unet import DiffusersUNet, import_diffusers
from fedcore.model.diffusion import Schedule
from fedcore.model.training import LocalTrainer, ResolvedSpeed, resolve_device
from fedcore.model.unet import build_model, preset
from fedcore.payload.pretrained import scheduler_kwargs


@dataclass(frozen=True)
class Plan:
    """How much to run: GPU defaults, or a smoke on a CPU with --quick."""

    model: str  # a diffusers preset
    batch: int
    images: int  # images in the pool both loops draw from
    warmup: int  # fast-path steps before timing (compilation happens here)
    steps: int  # steps per timed block, each side
    blocks: int  # alternating blocks per side


def plan_for(device: torch.device, quick: bool) -> Plan:
    if device.type == "cuda" and not quick:
        return Plan(model="ddpm-cifar10", batch=128, images=12_800, warmup=20, steps=50, blocks=3)
    if quick:
        return Plan(model="diffusers-tiny", batch=16, images=64, warmup=1, steps=2, blocks=1)
    return Plan(model="ddpm-cifar10", batch=32, images=1_024, warmup=1, steps=3, blocks=2)


def load_images(shape: tuple[int, int, int], count: int, data_dir: str, seed: int) -> torch.Tensor:
    """(count, C, H, W) uint8: a folder's images brought to the shape, or seeded noise."""
    if data_dir:
        from fedcore.data.datasets import load_image_folder

        return torch.from_numpy(load_image_folder(data_dir, shape[1], shape[0]).images[:count].copy())
    return torch.randint(0, 256, (count, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# --- the plain diffusers loop -------------------------------------------------------------------------------


class TransformedImages(Dataset):
    """Images as torchvision would serve them: one at a time, ToTensor then Normalize([0.5], [0.5])."""

    def __init__(self, images: torch.Tensor):
        self.images = images  # (N, C, H, W) uint8

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.images[i].float() / 255 - 0.5) / 0.5


class DiffusersLoop:
    """diffusers' example training loop without accelerate: fp32, eager, a fresh DataLoader epoch after epoch."""

    def __init__(self, initial: DiffusersUNet, images: torch.Tensor, device: torch.device, batch: int, workers: int):
        diffusers = import_diffusers(type(initial.config).__name__)
        self.device = device
        self.unet = diffusers.UNet2DModel(**initial.config.unet_kwargs())
        self.unet.load_state_dict(initial.state_dict())
        self.unet.to(device).train()
        self.noise_scheduler = diffusers.DDPMScheduler(**scheduler_kwargs())
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        self.loader = DataLoader(TransformedImages(images), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
        self._batches = self._forever()

    def _forever(self) -> Iterator[torch.Tensor]:
        while True:
            yield from self.loader

    def run(self, steps: int) -> tuple[int, float]:
        """(images, seconds) of `steps` training steps, timed to the last kernel."""
        sync(self.device)
        start, images = time.perf_counter(), 0
        for _ in range(steps):
            clean = next(self._batches).to(self.device)
            noise = torch.randn(clean.shape, device=self.device)
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (clean.shape[0],), device=self.device)
            noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
            loss = F.mse_loss(self.unet(noisy, timesteps).sample, noise)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            images += clean.shape[0]
        sync(self.device)
        return images, time.perf_counter() - start


# --- main ---------------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: diffusers-tiny, a few steps (CPU, seconds)")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default=None, help="a diffusers preset (default: ddpm-cifar10; diffusers-tiny with --quick)")
    p.add_argument("--data-dir", default="", help="a folder of images (default: seeded noise of the preset's shape)")
    p.add_argument("--loader-workers", type=int, default=4, help="DataLoader workers of the diffusers loop")
    p.add_argument("--seed", type=int, default=0)
    add_speed_flags(p)
    for name in ("batch", "images", "warmup", "steps", "blocks"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the plan")
    args = p.parse_args()

    device = resolve_device(args.device)
    speed = speed_from(args, device)
    plan = plan_for(device, args.quick)
    overrides = {f: getattr(args, f) for f in ("model", "batch", "images", "warmup", "steps", "blocks") if getattr(args, f) is not None}
    plan = Plan(**{**plan.__dict__, **overrides})
    cfg = preset(plan.model)
    resolved = ResolvedSpeed.of(speed)
    log(f"device {device}, fast path {resolved}, plan {plan}")

    images = load_images((cfg.channels, cfg.image_size, cfg.image_size), plan.images, args.data_dir, args.seed)
    initial = build_model(plan.model, seed=args.seed)
    if not isinstance(initial, DiffusersUNet):
        raise SystemExit(f"--model {plan.model!r} is not a diffusers preset")
    loop = DiffusersLoop(initial, images, device, plan.batch, 0 if args.quick else args.loader_workers)
    fast = LocalTrainer(initial, Schedule(), speed)
    data = fast.prepare_data(to_model_range(images))

    speeds = compare("diffusers_loop", loop.run, fast, data, batch=plan.batch, warmup=plan.warmup, steps=plan.steps, blocks=plan.blocks, loss="mse")

    figures: dict[str, object] = {**machine(), "device": str(device), "model": plan.model, "batch_size": plan.batch, **speeds}
    figures["speedup_vs_diffusers_loop"] = float(speeds["fast_images_per_s"]) / float(speeds["diffusers_loop_images_per_s"])
    emit(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
