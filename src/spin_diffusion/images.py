"""PIL images <-> tensors, and image grids. The one place where pixels change representation.

Tensors are ``[N, 3, H, W]`` float32 RGB in ``[0, 1]``; PIL images are RGB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from spin_diffusion.errors import SpinDiffusionError


def pil_to_tensor(images: Sequence[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB PIL images -> ``[N, 3, H, W]`` float32 in [0, 1]; resized (bicubic) to ``size=(H, W)`` when given.
    Images of different sizes without ``size`` are an error."""
    if len(images) == 0:
        raise SpinDiffusionError("pil_to_tensor needs at least one image")
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
    if len({a.shape for a in arrays}) != 1:
        raise SpinDiffusionError(
            f"images differ in size ({sorted({a.shape[:2] for a in arrays})}); pass size=(H, W) to resize them"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[N, 3, H, W]`` floats in [0, 1] -> N RGB PIL images (clamped, rounded to uint8)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise SpinDiffusionError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in arrays]


def make_grid(images: Sequence[Image.Image], *, ncol: int = 8, scale: int = 2, pad: int = 2) -> Image.Image:
    """Tile images into one RGB grid on a white background, row by row.

    Every image is resized to the first image's size times ``scale`` (nearest neighbour, so small demo images
    stay crisp). With ``cols = min(ncol, n)`` and ``rows = ceil(n / ncol)`` the result is
    ``cols * w * scale + (cols + 1) * pad`` wide and ``rows * h * scale + (rows + 1) * pad`` high.
    """
    if not images:
        raise SpinDiffusionError("make_grid got no images; pass at least one PIL image")
    if ncol < 1 or scale < 1 or pad < 0:
        raise SpinDiffusionError(f"make_grid needs ncol >= 1, scale >= 1, pad >= 0; got {ncol}, {scale}, {pad}")
    n = len(images)
    cols, rows = min(ncol, n), math.ceil(n / ncol)
    cw, ch = images[0].width * scale, images[0].height * scale
    grid = Image.new("RGB", (cols * cw + (cols + 1) * pad, rows * ch + (rows + 1) * pad), "white")
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        cell = img.convert("RGB").resize((cw, ch), Image.Resampling.NEAREST)
        grid.paste(cell, (pad + c * (cw + pad), pad + r * (ch + pad)))
    return grid


def save_grid(images: Sequence[Image.Image], path, *, max_images: int = 32) -> int:
    """Save the first ``max_images`` images as an 8-wide grid (tiny demo images enlarged to about 64 px, big
    ones not); returns how many it shows."""
    shown = min(max_images, len(images))
    make_grid(images[:shown], ncol=8, scale=max(1, 64 // max(images[0].size))).save(path)
    return shown
