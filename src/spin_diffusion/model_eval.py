"""Evaluation of models (not images): render a prompt set with a denoiser, score the images, write eval.json.

`scoring` holds the scorers and statistics on images; this module turns models into images for them,
for the per-iteration evaluation of a run (`evaluate_denoiser`) and for `spin-diffusion evaluate`
(`evaluate_models`). Both write the one eval.json schema of `rundir`. All models see the same initial noise
for the same prompt, so win rates compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from spin_diffusion import data as data_lib
from spin_diffusion import distributed, encoding, hub, models, preflight, rundir, sampling, scoring, world
from spin_diffusion.config import RunConfig
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.families import Cond
from spin_diffusion.images import save_grid, tensor_to_pil
from spin_diffusion.report import ModelEntry, ReportData, write_report

# The built-in world's default scorers: all of color, shape and position right, and each one alone.
SHAPES_SCORERS = ("shapes_judge", "shapes_color", "shapes_shape", "shapes_position")


@torch.no_grad()
def render_images(
    c: models.Components,
    denoiser: torch.nn.Module,
    prompt_embeds: Cond,
    negative_embed: Cond,
    *,
    seeds: list[int],
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
    guidance: sampling.Guidance = sampling.Guidance(),
) -> list[Image.Image]:
    """Sample and decode one image per prompt (`prompt_embeds`: `encoding.encode`) with the given seeds;
    `guidance`: true CFG (FLUX.1) and skip-layer guidance (SD3), as the run's `sample` config sets them."""
    shape = (c.latent_channels, c.sample_size, c.sample_size)
    images: list[Image.Image] = []
    for start in range(0, len(prompt_embeds), batch_size):
        out = sampling.sample(
            denoiser,
            c.family,
            prompt_embeds[start : start + batch_size],
            negative_embed,
            image_size=c.resolution,
            seeds=seeds[start : start + batch_size],
            latent_shape=shape,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            guidance=guidance,
        )
        images += tensor_to_pil(encoding.decode_latents(c, out.latents.to(next(denoiser.parameters()).device)))
    return images


def render_shared(
    c: models.Components,
    denoiser: torch.nn.Module,
    prompt_embeds: Cond,
    negative_embed: Cond,
    folder: Path,
    *,
    seeds: list[int],
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
    guidance: sampling.Guidance = sampling.Guidance(),
) -> list[Image.Image] | None:
    """`render_images` with the prompts split over all ranks: each rank renders its contiguous part and writes
    it to `folder/00000.png …` (lossless, so the result equals a one-process render); after a barrier the main
    process reads them all back. Returns the N images in prompt order on the main process, None elsewhere."""
    part = distributed.split(len(prompt_embeds))
    images = render_images(
        c,
        denoiser,
        prompt_embeds[part.start : part.stop],
        negative_embed,
        seeds=seeds[part.start : part.stop],
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        guidance=guidance,
    )
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in zip(part, images, strict=True):
        img.save(folder / f"{i:05d}.png")
    distributed.barrier()
    if not distributed.is_main():
        return None
    out = []
    for i in range(len(prompt_embeds)):
        with Image.open(folder / f"{i:05d}.png") as img:
            out.append(img.convert("RGB"))
    return out


@dataclass
class Validation:
    """eval.validation_prompts, rendered with the model while it trains (`trainer.Validation`): the evaluation's
    sampler and seeds, images saved as folder/step_NNNNNNN/00000.png …"""

    c: models.Components
    prompts: list[str]
    embeds: Cond  # the prompts' conditioning (encoding.encode)
    negative_embed: Cond
    folder: Path
    every: int
    seeds: list[int]
    num_steps: int
    guidance_scale: float
    batch_size: int
    guidance: sampling.Guidance = sampling.Guidance()

    @classmethod
    def of(cls, cfg: RunConfig, c: models.Components, negative_embed: Cond, folder: Path) -> Validation | None:
        """The run's validation (None without eval.validation_prompts); encodes the prompts, so call it while the
        text encoders are loaded."""
        prompts = list(cfg.eval.validation_prompts)
        if not prompts:
            return None
        num_steps, guidance_scale = eval_sampler(cfg)
        return cls(
            c=c,
            prompts=prompts,
            embeds=encoding.encode(c, prompts),
            negative_embed=negative_embed,
            folder=folder,
            every=cfg.eval.validation_every,
            seeds=[sampling.sample_seed(cfg.eval.seed, 0, i) for i in range(len(prompts))],
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            batch_size=cfg.sample.batch_size,
            guidance=sampling.Guidance.of(cfg.sample),
        )

    def __call__(
        self, denoiser: torch.nn.Module, step: int, *, every_rank_renders_all: bool
    ) -> list[Image.Image] | None:
        folder = self.folder / f"step_{step:07d}"
        kwargs = dict(
            seeds=self.seeds,
            num_steps=self.num_steps,
            guidance_scale=self.guidance_scale,
            batch_size=self.batch_size,
            guidance=self.guidance,
        )
        if not every_rank_renders_all:
            return render_shared(self.c, denoiser, self.embeds, self.negative_embed, folder, **kwargs)
        images = render_images(self.c, denoiser, self.embeds, self.negative_embed, **kwargs)
        if not distributed.is_main():
            return None
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            img.save(folder / f"{i:05d}.png")
        return images


def eval_sampler(cfg: RunConfig) -> tuple[int, float]:
    """(num_steps, guidance_scale) of evaluation images: eval.* when set, else the opponent's sample.*"""
    num_steps = cfg.eval.num_steps if cfg.eval.num_steps is not None else cfg.sample.num_steps
    guidance_scale = cfg.eval.guidance_scale if cfg.eval.guidance_scale is not None else cfg.sample.guidance_scale
    return num_steps, guidance_scale


@dataclass
class EvalSet:
    """Evaluation prompts, their embeddings, the scorers (loaded once per run) and, if known, real images."""

    prompts: list[str]
    embeds: Cond  # the prompts' conditioning (encoding.encode)
    scorers: list = field(default_factory=list)  # scoring.Scorer
    reference: list[Image.Image] = field(default_factory=list)


def default_scorer_names(cfg: RunConfig) -> list[str]:
    """eval.scorers, or the exact judge for the built-in shapes world."""
    return list(cfg.eval.scorers) or (list(SHAPES_SCORERS) if cfg.data.builtin == "shapes" else [])


def evaluate_denoiser(
    cfg: RunConfig,
    c: models.Components,
    denoiser: torch.nn.Module,
    eval_set: EvalSet,
    negative_embed: Cond,
    out_dir: Path,
    *,
    baseline: rundir.ModelEval | None = None,
) -> rundir.ModelEval | None:
    """Render the evaluation prompts with `denoiser` (on every rank, each its share, into out_dir/eval_images/), then
    on the main process score them (win rates against `baseline`, the base model's evaluation, if given) and
    write eval.json + grid.png to out_dir. The model is named after out_dir (e.g. "iter_01"). For the built-in
    shapes world the metrics include "fd", the Fréchet distance to the real images in the world's fixed feature
    space. Returns the model's evaluation on the main process, None on the others; call it on every rank."""
    seeds = [sampling.sample_seed(cfg.eval.seed, 0, i) for i in range(len(eval_set.prompts))]
    num_steps, guidance_scale = eval_sampler(cfg)
    images = render_shared(
        c,
        denoiser,
        eval_set.embeds,
        negative_embed,
        out_dir / "eval_images",
        seeds=seeds,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        batch_size=cfg.sample.batch_size,
        guidance=sampling.Guidance.of(cfg.sample),
    )
    if images is None:
        return None
    scorers = eval_set.scorers
    scores = scoring.score_images(images, eval_set.prompts, scorers)
    base = {k: torch.tensor(v) for k, v in baseline.scores.items()} if baseline is not None else None
    summary = scoring.summarize(scores, base, higher_is_better={s.name: s.higher_is_better for s in scorers})
    metrics: dict[str, float | None] = dict(scoring.flat_metrics(summary))
    if cfg.data.builtin == "shapes" and len(eval_set.reference) >= 2:
        metrics["fd"] = scoring.frechet_distance_metric(images, eval_set.reference, world.FeatureNet())
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = save_grid(images, out_dir / "grid.png")
    result = rundir.ModelEval(
        name=out_dir.name,
        metrics=metrics,
        scores={k: v.tolist() for k, v in scores.items()},
        grid="grid.png",
        grid_size=shown,
    )
    sampler = {"seed": cfg.eval.seed, "num_steps": num_steps, "guidance_scale": guidance_scale}
    rundir.write_eval(
        out_dir / rundir.EVAL_FILE,
        rundir.EvalFile(
            prompts=list(eval_set.prompts),
            models=[result],
            sampler=sampler,
            baseline=baseline.name if baseline is not None else None,
        ),
    )
    return result


def evaluate_models(
    model_dirs: list[str | Path],
    prompts_path: Path,
    *,
    scorers: list[str],
    scorer_paths: dict[str, str],
    baseline: int,
    out_dir: Path,
    num_prompts: int | None,
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
    seed: int,
    fid_reference: Path | None = None,
    fid_features: str | None = None,
) -> str:
    """`spin-diffusion evaluate`: every model renders every prompt with the same noise, then is scored.

    With `fid_reference` (a folder of real images) and `fid_features` (a local CLIP folder used as the
    feature network), each model also gets a set-level Fréchet distance (metric "fd", lower is better).

    Writes out_dir/eval.json (schema in `rundir`: mean, median, win rate vs the baseline model per scorer, and
    the per-prompt scores), a grid per model, table.md and report.html. Returns the table.
    """
    if not model_dirs:
        raise SpinDiffusionError("give at least one --model folder")
    if not 0 <= baseline < len(model_dirs):
        raise SpinDiffusionError(f"--baseline {baseline} is not an index into the {len(model_dirs)} --model folders")
    prompts = data_lib.load_prompts(prompts_path)[:num_prompts]
    main = distributed.is_main()  # scorers, FID and the outputs live on the main process; all ranks render
    built = [scoring.build_scorer(n, scorer_paths.get(n)) for n in scorers] if main else []  # fail early
    scoring.check_prompts(built, prompts)  # before any image is rendered
    folders = [hub.resolve_pipeline(m) for m in model_dirs]  # every model (folder or Hub id), before one renders
    for given, folder in zip(model_dirs, folders, strict=True):
        if not (folder / "model_index.json").is_file():
            raise SpinDiffusionError(f"--model {given} is not a diffusers pipeline (no model_index.json)")
    preflight.check_writable(out_dir, "--out")
    if (fid_reference is None) != (fid_features is None):
        raise SpinDiffusionError("FID needs both --fid-reference (real images) and --fid-features (a CLIP folder)")
    fid_net = scoring.clip_feature_network(fid_features) if fid_features is not None and main else None
    reference = _read_image_folder(fid_reference) if fid_reference is not None and main else []
    names = _unique_names(model_dirs)
    seeds = [sampling.sample_seed(seed, 0, i) for i in range(len(prompts))]
    device = distributed.state().device
    out_dir.mkdir(parents=True, exist_ok=True)

    all_scores: dict[str, dict[str, torch.Tensor]] = {}
    fds: dict[str, float] = {}
    shown: dict[str, int] = {}
    for name, path in zip(names, folders, strict=True):
        c = models.load_components(path)
        for module in (c.denoiser, *c.text_encoders(), c.vae):
            if module is not None:
                module.to(device)
        embeds = encoding.encode(c, prompts)
        negative = c.family.negative(c, "")
        images = render_shared(
            c,
            c.denoiser.eval(),
            embeds,
            negative,
            out_dir / f"{name}_images",
            seeds=seeds,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
        )
        if images is None:  # not the main process: it only renders its share
            continue
        shown[name] = save_grid(images, out_dir / f"{name}_grid.png")
        all_scores[name] = scoring.score_images(images, prompts, built)
        if fid_net is not None:
            fds[name] = scoring.frechet_distance_metric(images, reference, fid_net, device=device)
        del c, images

    if not main:
        return ""
    higher = {s.name: s.higher_is_better for s in built}
    base_name = names[baseline]
    results = []
    for name, scores in all_scores.items():
        base = None if name == base_name else all_scores[base_name]
        metrics: dict[str, float | None] = dict(
            scoring.flat_metrics(scoring.summarize(scores, base, higher_is_better=higher))
        )
        if name in fds:
            metrics["fd"] = fds[name]
        results.append(
            rundir.ModelEval(
                name=name,
                metrics=metrics,
                scores={k: v.tolist() for k, v in scores.items()},
                grid=f"{name}_grid.png",
                grid_size=shown[name],
            )
        )
    sampler = {"seed": seed, "num_steps": num_steps, "guidance_scale": guidance_scale}
    rundir.write_eval(
        out_dir / rundir.EVAL_FILE,
        rundir.EvalFile(prompts=prompts, models=results, sampler=sampler, baseline=base_name),
    )
    table = scoring.format_table({m.name: m.metrics for m in results}, [s.name for s in built], baseline=base_name)
    (out_dir / "table.md").write_text(table + "\n")
    entries = [
        ModelEntry(
            name=m.name,
            metrics={k: v for k, v in m.metrics.items() if v is not None},
            grid=m.grid,
            step=i,
            group="models",
            captions=prompts[: m.grid_size],
        )
        for i, m in enumerate(results)
    ]
    summary = f"{len(prompts)} prompts from {prompts_path}; win rates against {base_name} (ties count half)."
    write_report(
        ReportData(
            title="spin-diffusion evaluate",
            summary=summary,
            models=entries,
            x_label="model",
            lower_is_better={k for k, v in higher.items() if not v} | {"fd"},
            baseline=base_name,
        ),
        out_dir,
    )
    return table


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _read_image_folder(folder: Path) -> list[Image.Image]:
    """Every image file directly in `folder`, sorted by name, as RGB (the FID reference set)."""
    if not Path(folder).is_dir():
        raise SpinDiffusionError(f"--fid-reference {folder} is not a folder of images")
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise SpinDiffusionError(f"--fid-reference {folder} holds {len(files)} images; FID needs at least 2")
    images = []
    for path in files:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except OSError:
            raise SpinDiffusionError(f"cannot read reference image {path}") from None
    return images


def _unique_names(paths: list[str | Path]) -> list[str]:
    """Readable, distinct names for models: the shortest path (or Hub id) suffix that tells them apart."""
    parts = [tuple(str(p).split("/")) if hub.is_hub_id(str(p)) else Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["_".join(p[-depth:]).replace("/", "_") for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"model{i}" for i in range(len(paths))]
