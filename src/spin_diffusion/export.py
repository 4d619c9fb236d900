"""Writing a model: a diffusers pipeline folder of the family (safetensors) with its model card, atomically."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spin_diffusion.atomic import fresh_dir, move_into_place
from spin_diffusion.card import CardInfo, render_card
from spin_diffusion.lora import merge_lora, tuner_layers

if TYPE_CHECKING:
    from spin_diffusion.models import Components


def save_pipeline(c: Components, out_dir: str | Path, *, denoiser: Any = None, card: CardInfo | None = None) -> Path:
    """Write a full diffusers pipeline folder (safetensors) for ``c``, with ``denoiser`` replacing ``c.denoiser`` if
    given, and, with ``card``, its model card as README.md (``card.render_card``: metadata, training, evaluation,
    usage).

    With a VAE it is the family's pipeline (:func:`pipeline`: ``StableDiffusionPipeline`` without safety checker,
    ``StableDiffusionXLPipeline`` or ``StableDiffusion3Pipeline``) that loads offline with plain
    ``DiffusionPipeline.from_pretrained(out_dir)``. A denoiser carrying LoRA adapters is saved merged
    (a merged copy; the argument is not modified).

    Without a VAE (pixel space) no diffusers text-to-image class fits cleanly, so the folder is a
    ``StableDiffusionPipeline`` with ``"vae": [null, null]``: :func:`load_components` reads it, while
    diffusers needs ``DiffusionPipeline.from_pretrained(out_dir, vae=None)`` and ``output_type="latent"``.

    Written to ``<out_dir>.tmp`` (a stale one is removed first) and moved into place with
    ``os.replace``; an existing ``out_dir`` is replaced. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    denoiser = c.denoiser if denoiser is None else denoiser
    if tuner_layers(denoiser):
        denoiser = merge_lora(copy.deepcopy(denoiser))
    tmp = fresh_dir(out_dir)
    c.family.pipeline(c, denoiser).save_pretrained(tmp, safe_serialization=True)
    if card is not None:
        (tmp / "README.md").write_text(render_card(card_of(card, c)))
    return move_into_place(tmp, out_dir)


def card_of(info: CardInfo, c: Components) -> CardInfo:
    """``info`` with what the card says of the model ``c`` itself: its family, what was trained, its encoders."""
    return dataclasses.replace(
        info,
        pixel_space=c.vae is None,
        family=c.family.name,
        denoiser="UNet" if c.family.process.kind == "ddpm" else "transformer",
        text_encoders=c.family.num_text_encoders,
    )
