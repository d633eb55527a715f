"""Sample grids as PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fedcore.atomic import atomic_write
from fedcore.data.datasets import from_model_range


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] -> one (rows*H, cols*W[, C]) uint8 array with `pad` pixels between."""
    x = from_model_range(images).cpu().numpy()  # (N, C, H, W) uint8
    n, c, h, w = x.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        out[y0 : y0 + h, x0 : x0 + w] = x[i].transpose(1, 2, 0)
    return out[..., 0] if c == 1 else out


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 2) -> Path:
    """Write a PNG grid of images in model range, atomically; `scale` enlarges small images (nearest neighbour)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    atomic_write(path, lambda f: img.save(f, format="PNG"))
    return path


def png_bytes(images: torch.Tensor, nrow: int | None = None) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(grid(images, nrow)).save(buf, format="PNG")
    return buf.getvalue()


def png_within(images: torch.Tensor, most_bytes: int) -> bytes:
    """A square grid PNG of the first 64, 16, 4 or 1 of `images` (N, C, H, W in [-1, 1]): the largest that
    takes at most `most_bytes`; b"" when not even one image does (large images of noise compress badly)."""
    for side in (8, 4, 2, 1):
        png = png_bytes(images[: side * side], nrow=side)
        if len(png) <= most_bytes:
            return png
    return b""
