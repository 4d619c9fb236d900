"""Text and image encoding through a model's frozen encoders: prompt conditioning (any family, `encode`), SD-1.x/2.x
CLIP embeddings, VAE latents and decoded images.

Latent convention (the same as ``StableDiffusionPipeline``): the denoiser sees
``vae.encode(x).latent_dist.mean * scaling_factor``. We use the posterior *mean*, not a sample, so
that cached latents are deterministic. Without a VAE the model is pixel space and the "latents"
are the images themselves, in [-1, 1].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from spin_diffusion.families import Cond
    from spin_diffusion.models import Components


def _device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def encode(c: Components, prompts: list[str], *, batch_size: int = 64) -> Cond:
    """The text conditioning of ``prompts`` for any family (``c.family.encode``): embeddings, and pooled ones for
    SDXL/SD3."""
    return c.family.encode(c, list(prompts), batch_size=batch_size)


@torch.no_grad()
def encode_prompts(c: Components, prompts: list[str], *, batch_size: int = 64) -> Tensor:
    """SD-1.x/2.x text embeddings ``[N, L, D]`` (``last_hidden_state``), as StableDiffusionPipeline computes them.

    Padded to ``L = tokenizer.model_max_length`` (capped at the encoder's positions), truncated.
    Returned on the text encoder's device and dtype.
    """
    device, dtype = _device_dtype(c.text_encoder)
    max_len = int(c.tokenizer.model_max_length)
    max_pos = getattr(getattr(c.text_encoder, "config", None), "max_position_embeddings", None)
    if max_pos is not None:
        max_len = min(max_len, int(max_pos))
    use_mask = bool(getattr(getattr(c.text_encoder, "config", None), "use_attention_mask", False))
    out: list[Tensor] = []
    for i in range(0, len(prompts), batch_size):
        tok = c.tokenizer(
            list(prompts[i : i + batch_size]),
            padding="max_length",
            max_length=max_len,
            truncation=True,
            return_tensors="pt",
        )
        mask = tok.attention_mask.to(device) if use_mask else None
        out.append(c.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0].to(dtype))
    if not out:
        hidden = int(c.text_encoder.config.hidden_size)
        return torch.zeros(0, max_len, hidden, device=device, dtype=dtype)
    return torch.cat(out)


@torch.no_grad()
def encode_images(c: Components, images: Tensor, *, batch_size: int = 32) -> Tensor:
    """Images ``[N, 3, H, W]`` in [-1, 1] -> latents ``[N, C, H/f, W/f]`` (as the denoiser sees them).

    ``latents = (vae.encode(x).latent_dist.mean - shift_factor) * scaling_factor`` (the family's ``vae_latents``;
    Qwen-Image normalises per channel, FLUX.2 patchifies and BatchNorm-normalises): the posterior mean, so caching is
    deterministic. Without a VAE the images are returned unchanged (a copy). Batched by ``batch_size``; returned on
    the VAE's device and dtype.
    """
    if c.vae is None:
        return images.clone()
    device, dtype = _device_dtype(c.vae)
    out = [
        c.family.vae_latents(c, images[i : i + batch_size].to(device, dtype))
        for i in range(0, images.shape[0], batch_size)
    ]
    if not out:
        f = c.vae_scale_factor
        return torch.zeros(
            0, c.latent_channels, images.shape[2] // f, images.shape[3] // f, device=device, dtype=dtype
        )
    return torch.cat(out)


@torch.no_grad()
def decode_latents(c: Components, latents: Tensor, *, batch_size: int = 32) -> Tensor:
    """Latents ``[N, C, h, w]`` -> images ``[N, 3, h*f, w*f]`` in [0, 1] (clamped). Batched by ``batch_size``."""
    if c.vae is None:
        return (latents / 2 + 0.5).clamp(0, 1)
    device, dtype = _device_dtype(c.vae)
    out = [
        c.family.vae_images(c, latents[i : i + batch_size].to(device, dtype))
        for i in range(0, latents.shape[0], batch_size)
    ]
    if not out:
        f = c.vae_scale_factor
        return torch.zeros(0, 3, latents.shape[2] * f, latents.shape[3] * f, device=device, dtype=dtype)
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1)
