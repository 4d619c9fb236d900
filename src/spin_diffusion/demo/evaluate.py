"""Scoring demo models on a fixed prompt set: the held-out test scenes (the report) or the validation scenes
(hyper-parameter choice), of the shapes world (`world`, the demo's) or the relation world (`relation_world`, the
self-play study's harder one). See `world.split_of` for the split.

Every model of a comparison renders the same prompts from the same initial noise (`EvalSpec.seed`), and is
judged per prompt by the world's exact judge, so win rates are paired. The Fréchet distance compares the
generated images with fresh renders of the same scenes (`reference_images`), in the shapes world's fixed feature
space for both worlds. One model's result is written to a JSON file once; asking again reads it back (a rerun of the
demo does not re-render).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spin_diffusion import atomic, encoding, models, relation_world, scoring
from spin_diffusion import world as shapes_world
from spin_diffusion.images import save_grid
from spin_diffusion.model_eval import render_images
from spin_diffusion.sampling import sample_seed

ATTRIBUTES = ("all", "color", "shape", "position")
METRIC_KEYS = {"all": "shapes_judge", "color": "shapes_color", "shape": "shapes_shape", "position": "shapes_position"}


@dataclass(frozen=True)
class JudgedWorld:
    """What scoring needs of a built-in world: its prompts of a split, its exact judge of one image as 0/1 scores
    under named keys ("shapes_judge" = every part right, in both worlds: the tables' and win rates' key), and a
    fresh render of a prompt's scene."""

    split_prompts: Callable[[str, int], list[str]]
    scores: Callable[[Image.Image, str], dict[str, float]]
    render: Callable[[str, np.random.Generator], Image.Image]


def _shapes_scores(image: Image.Image, prompt: str) -> dict[str, float]:
    verdict = shapes_world.judge(image, prompt)
    return {METRIC_KEYS[a]: float(getattr(verdict, a)) for a in ATTRIBUTES}


def _relation_scores(image: Image.Image, prompt: str) -> dict[str, float]:
    verdict = relation_world.judge(image, prompt)
    parts = {f"relation_{part}": float(getattr(verdict, part)) for part in ("color", "shape", "relation")}
    return {"shapes_judge": float(verdict.all), **parts}


WORLDS = {
    "shapes": JudgedWorld(
        shapes_world.split_prompts,
        _shapes_scores,
        lambda p, rng: shapes_world.render(shapes_world.parse_caption(p), rng=rng),
    ),
    "relations": JudgedWorld(
        relation_world.split_prompts,
        _relation_scores,
        lambda p, rng: relation_world.render(relation_world.parse_caption(p), rng=rng),
    ),
}


@dataclass(frozen=True)
class EvalSpec:
    """What one evaluation renders: prompts, noise seed and sampler."""

    prompts: tuple[str, ...]
    seed: int  # initial noise of prompt i: sampling.sample_seed(seed, 0, i)
    num_steps: int = 20
    guidance_scale: float = 3.0
    batch_size: int = 64

    @classmethod
    def for_split(cls, split: str, per_scene: int, *, seed: int, world: str = "shapes", **kwargs) -> EvalSpec:
        """`per_scene` prompts for each scene of `split` ("test" or "validation") of `world` (a key of WORLDS)."""
        return cls(prompts=tuple(WORLDS[world].split_prompts(split, per_scene)), seed=seed, **kwargs)


def reference_images(prompts: tuple[str, ...] | list[str], seed: int, world: str = "shapes") -> list[Image.Image]:
    """A real render of each prompt's scene (the Fréchet distance's reference set), deterministic in `seed`."""
    render_scene = WORLDS[world].render
    return [render_scene(p, np.random.default_rng([seed, 2, i])) for i, p in enumerate(prompts)]


@torch.no_grad()
def render(c: models.Components, spec: EvalSpec) -> list[Image.Image]:
    """The images `c` draws for `spec.prompts` (DDIM with classifier-free guidance against the empty prompt).

    Goes through `model_eval.render_images`, the library's own evaluation renderer, so the demo keeps working
    as the sampler's signature changes."""
    return render_images(
        c,
        c.denoiser,
        encoding.encode_prompts(c, list(spec.prompts)),
        encoding.encode_prompts(c, [""]),
        seeds=[sample_seed(spec.seed, 0, i) for i in range(len(spec.prompts))],
        num_steps=spec.num_steps,
        guidance_scale=spec.guidance_scale,
        batch_size=spec.batch_size,
    )


def evaluate(
    model: str | Path, spec: EvalSpec, out_json: Path, *, grid: Path | None = None, world: str = "shapes"
) -> dict:
    """Score the diffusers folder `model` on `spec` with `world`'s judge (a key of WORLDS); write {"metrics",
    "scores", "prompts", "sampler", "seconds"} to `out_json` (and a sample grid to `grid`). An existing `out_json`
    for the same spec is returned as it is."""
    out_json = Path(out_json)
    sampler = asdict(spec) | {"prompts": len(spec.prompts)}
    if out_json.exists():
        saved = json.loads(out_json.read_text())
        if saved.get("sampler") == sampler and saved.get("prompts") == list(spec.prompts):
            return saved
    started = time.perf_counter()
    c = models.load_components(model)
    images = render(c, spec)
    per_prompt = [WORLDS[world].scores(image, prompt) for image, prompt in zip(images, spec.prompts, strict=True)]
    scores = {key: [s[key] for s in per_prompt] for key in per_prompt[0]}
    metrics = {key: sum(values) / len(values) for key, values in scores.items()}
    if len(images) >= 2:
        reference = reference_images(spec.prompts, spec.seed, world)
        # in the shapes world's fixed feature space, for both worlds
        metrics["fd"] = scoring.frechet_distance_metric(images, reference, shapes_world.FeatureNet())
    if grid is not None:
        grid.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, grid)
    result = {
        "model": str(model),
        "metrics": metrics,
        "scores": scores,
        "prompts": list(spec.prompts),
        "sampler": sampler,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out_json, json.dumps(result, indent=1))
    return result


def win_rate_vs(result: dict, baseline: dict, key: str = "shapes_judge") -> float:
    """Paired win rate of `result` over `baseline` on per-prompt `key` scores (ties count 1/2)."""
    return scoring.win_rate(torch.tensor(result["scores"][key]), torch.tensor(baseline["scores"][key]))
