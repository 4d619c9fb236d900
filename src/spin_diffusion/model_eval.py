"""Evaluation of models (not images): render a prompt set with a UNet, score the images, write eval.json.

`evaluation` holds the scorers and statistics on images; this module turns models into images for them,
for the per-iteration evaluation of a run (`evaluate_unet`) and for `spin-diffusion evaluate`
(`evaluate_models`). All models see the same initial noise for the same prompt, so win rates compare like
with like.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from spin_diffusion import models, sampling
from spin_diffusion.config import RunConfig


@torch.no_grad()
def render_images(
    c: models.Components,
    unet: torch.nn.Module,
    prompt_embeds: torch.Tensor,
    negative_embed: torch.Tensor,
    *,
    seeds: list[int],
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
) -> list[Image.Image]:
    """Sample and decode one image per prompt embedding (`[N, L, D]`) with the given seeds."""
    shape = (c.latent_channels, c.sample_size, c.sample_size)
    images: list[Image.Image] = []
    for start in range(0, prompt_embeds.shape[0], batch_size):
        out = sampling.sample(
            unet,
            c.scheduler.config,
            prompt_embeds[start : start + batch_size],
            negative_embed,
            seeds=seeds[start : start + batch_size],
            latent_shape=shape,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
        )
        pixels = models.decode_latents(c, out.latents.to(next(unet.parameters()).device))
        for img in (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy():
            images.append(Image.fromarray(img))
    return images


@dataclass
class EvalSet:
    """Evaluation prompts, their embeddings and (if known) real reference images."""

    prompts: list[str]
    embeds: torch.Tensor  # [N, L, D]
    reference: list[Image.Image] = field(default_factory=list)


def evaluate_unet(
    cfg: RunConfig, c: models.Components, unet: torch.nn.Module, eval_set: EvalSet, negative_embed: torch.Tensor,
    out_dir: Path, *, baseline: dict[str, list[float]] | None = None,
) -> dict:
    """Render the evaluation prompts with `unet`, score them, and write eval.json + grid.png to out_dir."""
    from spin_diffusion import evaluation
    from spin_diffusion.report import make_grid

    seeds = [sampling.sample_seed(cfg.eval.seed, 0, i) for i in range(len(eval_set.prompts))]
    images = render_images(
        c, unet, eval_set.embeds, negative_embed, seeds=seeds, num_steps=cfg.sample.num_steps,
        guidance_scale=cfg.sample.guidance_scale, batch_size=cfg.sample.batch_size,
    )
    names = list(cfg.eval.scorers) or (["shapes_judge"] if cfg.data.builtin == "shapes" else [])
    scorers = [evaluation.build_scorer(n, cfg.eval.scorer_paths.get(n)) for n in names]
    scores = evaluation.score_images(images, eval_set.prompts, scorers)
    base = {k: torch.tensor(v) for k, v in baseline.items()} if baseline else None
    summary = evaluation.summarize(scores, base, higher_is_better={s.name: s.higher_is_better for s in scorers})
    metrics = {f"{name}_{stat}": value for name, stats in summary.items() for stat, value in stats.items()}
    if cfg.data.builtin == "shapes" and eval_set.reference:
        from spin_diffusion.demo import world

        metrics["fd"] = world.frechet_distance(
            world.image_features(world.pil_to_tensor(images)), world.image_features(world.pil_to_tensor(eval_set.reference))
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = min(32, len(images))
    scale = max(1, 64 // max(images[0].size)) if images else 1  # enlarge tiny demo images, never big ones
    make_grid(images[:shown], ncol=8, scale=scale).save(out_dir / "grid.png")
    result = {"metrics": metrics, "grid": "grid.png", "captions": eval_set.prompts[:shown],
              "scores": {k: v.tolist() for k, v in scores.items()}, "prompts": eval_set.prompts}
    tmp = out_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out_dir / "eval.json")
    return result


