"""The self-play loop (SPIN-Diffusion, Algorithm 1) and the sft / dpo baselines, with a resumable run dir.

This is the only module that knows about iterations. For k = 0 … K-1:

    generate:k    θ_k samples one image per training prompt        -> iter_k/generated/
    reference:k   θ_k's errors on every pair train:k+1 will visit   -> iter_k/reference/  (train.precompute_reference)
    train:k+1     θ_{k+1} learns to prefer real over θ_k's images   -> iter_{k+1}/train/, iter_{k+1}/model/
    eval:k+1      θ_{k+1} is scored on the evaluation prompts      -> iter_{k+1}/eval.json

(plus eval:0 for the base model). Every phase writes its outputs first and then appends its name to
state.json, so `run(cfg, resume=True)` after a kill at any moment skips finished phases, and a phase
killed half way picks up its own partial work (generation shards, training checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from spin_diffusion import (
    atomic,
    card,
    distributed,
    encoding,
    export,
    lora,
    models,
    objectives,
    preemption,
    preflight,
    presets,
    reference,
    sampling,
    trainer,
)
from spin_diffusion import cache as cache_lib
from spin_diffusion import data as data_lib
from spin_diffusion.config import (
    ModelConfig,
    RunConfig,
    SampleConfig,
    config_from_dict,
    for_iteration,
    for_world,
    hparams,
    read_yaml,
    replace,
    save_config,
    to_dict,
)
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.families import ATTENTION_LORA_TARGETS, Cond, Family
from spin_diffusion.model_eval import EvalSet, Validation, default_scorer_names, evaluate_denoiser
from spin_diffusion.rundir import CONFIG_FILE, EVAL_FILE, STATE_FILE, iter_dir, read_eval

if TYPE_CHECKING:
    from accelerate import PartialState


class RunState:
    """The list of finished phases, persisted atomically in run_dir/state.json."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STATE_FILE
        self.completed: list[str] = []
        self.info: dict = {}
        if self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                raise SpinDiffusionError(f"{self.path} is corrupt; restore it or start a new run dir") from None
            self.completed = list(saved.get("completed", []))
            self.info = dict(saved.get("info", {}))

    def done(self, phase: str) -> bool:
        return phase in self.completed

    def mark(self, phase: str, **info: object) -> None:
        if phase not in self.completed:
            self.completed.append(phase)
        if info:
            self.info[phase] = info
        if distributed.is_main():  # every rank keeps the same list in memory; one writes it
            atomic.write_json(self.path, {"completed": self.completed, "info": self.info})


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diff = _first_difference(va, vb, f"{prefix}{key}.")
            if diff:
                return diff
        elif va != vb:
            return f"{prefix}{key}: {va!r} (saved) vs {vb!r} (now)"
    return None


def _comparable(values: dict) -> dict:
    """A config dict with `sample.eta: null` replaced by the DDIM η it stands for (as `opponent_eta` picks it for
    DDPM-family models): runs saved with the old default η = 0 resume, a spin_exact run saved at η = 0 does not. And
    `model.lora_target_modules` as the four attention names reads as None (the family's list): runs saved before that
    default existed wrote those names out, and they are every family's list but FLUX.2's (whose resumed iterations
    then adapt its single blocks too)."""
    sample = dict(values["sample"])
    if sample.get("eta") is None:
        exact = objectives.get(values["loss"]["objective"]).trajectory and sample.get("scheduler") == "ddim"
        sample["eta"] = 1.0 if exact else 0.0
    model = dict(values["model"])
    if tuple(model.get("lora_target_modules") or ()) == ATTENTION_LORA_TARGETS:
        model["lora_target_modules"] = None
    return {**values, "sample": sample, "model": model}


def _read_saved(path: Path) -> RunConfig:
    """A run dir's config.yaml through today's defaults, except a default that changed since: a run saved before
    `sample.per_caption` existed sampled every row."""
    raw = read_yaml(path)
    if "per_caption" not in (raw.get("sample") or {}):
        raw = {**raw, "sample": {**(raw.get("sample") or {}), "per_caption": "every_row"}}
    return config_from_dict(raw)


def check_run_dir(cfg: RunConfig, *, resume: bool) -> Path:
    """Check that the run dir may be started (fresh) or continued (resume); writes nothing. Every rank calls it
    before anything is written, so all of them see the folder as it was. Returns the run dir."""
    run_dir = Path(cfg.run_dir)
    saved_cfg = run_dir / CONFIG_FILE
    if saved_cfg.exists():
        if not resume:
            raise SpinDiffusionError(
                f"{run_dir} already holds a run; pass --resume to continue it, or choose another --run-dir"
            )
        # the saved config read back through today's defaults: a key added since the run started is not a change, nor
        # is a default that became automatic (sample.eta) where the automatic value is the one the run used
        saved = _comparable(to_dict(_read_saved(saved_cfg)))
        diff = _first_difference(saved, _comparable(to_dict(cfg)))
        if diff:
            raise SpinDiffusionError(f"--resume with a config that differs from the saved one ({diff})")
    elif resume and (run_dir / STATE_FILE).exists():
        raise SpinDiffusionError(f"{run_dir} has no {CONFIG_FILE}; cannot resume it")
    return run_dir


def create_run_dir(cfg: RunConfig) -> Path:
    """Create the run dir and save the config (main process), once every check of the start has passed."""
    run_dir = Path(cfg.run_dir)
    saved_cfg = run_dir / CONFIG_FILE
    distributed.barrier()  # every rank has checked the folder before the main process writes to it

    def create() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not saved_cfg.exists():
            save_config(cfg, saved_cfg)

    distributed.on_main(create)
    if not saved_cfg.exists():  # another node's main process wrote it into a folder this node cannot see
        raise SpinDiffusionError(
            f"{run_dir} is not shared between the processes of this run (rank {distributed.state().process_index} "
            f"cannot see {CONFIG_FILE}); on several nodes put run_dir on a filesystem that every node mounts"
        )
    return run_dir


def load_saved_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise SpinDiffusionError(f"no run to resume in {run_dir} (missing {CONFIG_FILE})")
    return _read_saved(path)


def load_base_components(cfg: RunConfig) -> models.Components:
    if cfg.model.path is not None:
        c = models.load_components(cfg.model.path, revision=cfg.model.revision, variant=cfg.model.variant)
    else:
        c = presets.build_preset(cfg.model.preset, seed=cfg.seed)
    if cfg.model.max_sequence_length is None:
        return c
    if c.family.default_max_sequence_length is None:
        raise SpinDiffusionError(
            "model.max_sequence_length is the text length of SD3, FLUX and Z-Image models; a "
            f"{c.family.name} model's is fixed"
        )
    return dataclasses.replace(c, max_sequence_length=cfg.model.max_sequence_length)


def model_id(cfg: RunConfig, c: models.Components) -> str:
    """Identifies the frozen parts (VAE, text encoder) of ``c``, loaded for ``cfg``, for the latent cache key."""
    # the T5 length changes the cached prompt embeddings (SD3, FLUX)
    t5 = f":max_sequence_length={cfg.model.max_sequence_length}" if cfg.model.max_sequence_length else ""
    if c.source is not None:  # the folder it was loaded from: a Hub id's snapshot folder names its commit
        return f"path:{c.source.resolve()}" + (f":variant={cfg.model.variant}" if cfg.model.variant else "") + t5
    return f"preset:{cfg.model.preset}:seed={cfg.seed}" + t5


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class RunSummary:
    run_dir: Path
    iterations: int
    metrics: dict[int, dict[str, float]]  # iteration -> metrics
    wall_seconds: float
    report: Path | None


@dataclass
class _Run:
    """What the phases of a run share: the config as it runs, the loaded model, the cached data, the evaluation."""

    cfg: RunConfig  # as it runs on this many processes (config.for_world)
    as_given: RunConfig  # as the run dir records it
    run_dir: Path
    dist: PartialState  # this process (distributed.state)
    state: RunState
    c: models.Components
    objective: objectives.Objective
    num_iterations: int  # K for self-play; sft and dpo train once
    resolution: int
    cache: cache_lib.LatentCache | cache_lib.PairCache  # real images; (winner, loser) pairs for dpo
    negative_embed: Cond  # the unconditional input of guidance (sample.negative_prompt)
    empty_embed: Cond  # caption dropout trains on the encoded empty prompt
    eval_set: EvalSet | None
    validation: Validation | None


def run(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> RunSummary:
    """Run SPIN-Diffusion (objective spin_approx / spin_exact) or a baseline (sft / dpo) end to end.

    Algorithm 1 of the paper, each phase resumable: the opponent θ_k generates an image for every training prompt,
    θ_{k+1} is trained to prefer the real images over them, exported and evaluated; K times."""
    started = time.perf_counter()
    r = _set_up(cfg, resume=resume)
    start = _finished_iterations(r)
    opponent = r.c.denoiser if start == 0 else models.load_denoiser(iter_dir(r.run_dir, start) / "model")
    opponent.to(r.dist.device)
    if r.cfg.eval.include_base and not r.state.done("eval:0"):
        _evaluate(r, 0, r.c.denoiser if start == 0 else load_base_components(r.cfg).denoiser.to(r.dist.device))
    if start > 0:
        _evaluate(r, start, opponent)  # a kill between train:k and eval:k leaves θ_k unscored

    for k in range(start, r.num_iterations):
        data = _train_data(r)
        if r.objective.self_play:
            _generate(r, k, opponent, data, progress=progress)  # generate:k -> data.loser (and its trajectory)
        stored = _precompute_reference(r, k, opponent, data, progress=progress)  # reference:k -> θ_k's errors
        opponent = _train_and_export(r, k, opponent, data, stored, progress=progress)  # train:k+1 -> θ_{k+1}
        _stop_if_asked(f"stopped after training θ_{k + 1} (exported to {iter_dir(r.run_dir, k + 1) / 'model'})")
        _evaluate(r, k + 1, opponent)  # eval:k+1, and its table in θ_{k+1}'s model card

    report_path = None
    if r.dist.is_main_process and r.cfg.eval.enabled:
        from spin_diffusion import report

        report_path = report.write_report(report.collect_run(r.run_dir), r.run_dir)
    metrics = {int(p.split(":")[1]): m for p, m in r.state.info.items() if p.startswith("eval:")}
    return RunSummary(
        run_dir=r.run_dir,
        iterations=r.num_iterations,
        metrics=metrics,
        wall_seconds=time.perf_counter() - started,
        report=report_path,
    )


def _set_up(cfg: RunConfig, *, resume: bool) -> _Run:
    """Check everything that can fail on user input, then create the run dir and fill the latent cache.

    Every check runs before the run dir is written, so a failed start leaves nothing behind and the corrected
    command needs no --resume."""
    dist = distributed.state()
    preflight.check_training(cfg.train)
    trainer.set_tf32(cfg.train.allow_tf32, dist.device)
    run_dir = check_run_dir(cfg, resume=resume)
    as_given = cfg  # what the run dir records; `cfg` below is it as it runs on this many processes
    cfg = replace(cfg, train=for_world(cfg.train, dist.num_processes))  # refuses a total batch that does not divide
    objective = objectives.get(cfg.loss.objective)

    c = load_base_components(cfg)
    _place_frozen_parts(c, dist.device, cfg.train.mixed_precision)
    resolution = cfg.data.resolution or c.resolution
    images, bad_examples = _load_data(cfg, objective, resolution)
    if _contrast(cfg) and len(set(images.captions)) < 2:
        raise SpinDiffusionError(
            f"the caption contrast draws a mismatched caption c′ from the data, but it has "
            f"{len(set(images.captions))} distinct caption(s); it needs at least 2 (or set "
            "loss.caption_contrast_weight=0 and another loss.objective)"
        )
    eval_set = _eval_set(cfg, c, images.captions, images) if cfg.eval.enabled else None
    _check_sampling(cfg.sample, c)
    negative_embed = c.family.negative(c, cfg.sample.negative_prompt)  # as the family's pipeline makes it
    empty_embed = encoding.encode(c, [""])
    validation = Validation.of(cfg, c, negative_embed, folder=run_dir)  # each iteration renders into its own folder
    preflight.check_writable(run_dir, "run_dir")
    preflight.check_disk(
        run_dir,
        disk_estimate(cfg, c, images, resolution, embed_shape=tuple(negative_embed.shape[1:])),
        already_written=preflight.folder_bytes(run_dir) if resume else 0,
    )

    create_run_dir(as_given)  # the first write
    state = RunState(run_dir)
    cache = _build_cache(cfg, c, objective, images, bad_examples, run_dir, resolution)
    _record_skipped(run_dir, images, cache, cfg.data.max_bad_fraction, state)
    # Every embedding the run needs is computed by now (cache, eval prompts, negative and empty prompt): the text
    # encoders leave the accelerator (SD3's T5-XXL alone is 9.5 GB in bf16).
    for encoder in c.text_encoders():
        encoder.to("cpu")
    return _Run(
        cfg=cfg,
        as_given=as_given,
        run_dir=run_dir,
        dist=dist,
        state=state,
        c=c,
        objective=objective,
        num_iterations=cfg.num_iterations if objective.iterates else 1,
        resolution=resolution,
        cache=cache,
        negative_embed=negative_embed,
        empty_embed=empty_embed,
        eval_set=eval_set,
        validation=validation,
    )


def _place_frozen_parts(c: models.Components, device: torch.device, mixed_precision: str) -> None:
    """The text encoders and the VAE onto the accelerator. On GPUs the text encoders run in the training's
    mixed-precision dtype, as diffusers' training scripts cast them to weight_dtype (SD3's T5-XXL: 8.9 GiB in bf16
    instead of 17.7); on CPU they stay fp32."""
    encoder_dtype = None
    if device.type == "cuda":
        encoder_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    for encoder in c.text_encoders():
        encoder.to(device, dtype=encoder_dtype)
    if c.vae is not None:
        c.vae.to(device)


def _load_data(
    cfg: RunConfig, objective: objectives.Objective, resolution: int
) -> tuple[data_lib.CaptionedImages | data_lib.PreferencePairs, cache_lib.BadExamples]:
    """The run's examples (captioned images, or (winner, loser) pairs for dpo) and what to do with bad ones; checks
    a sample of them before anything is written."""
    if objective.loser == "pairs":
        images = data_lib.load_preference_pairs(cfg.data)
    else:
        images = data_lib.load_captioned_images(cfg.data, seed=cfg.seed)
    bad_examples = cache_lib.BadExamples(
        on_bad=data_lib.bad_example_policy(cfg.data, len(images) + len(images.skipped)),
        min_side=cfg.data.min_image_side if cfg.data.min_image_side is not None else resolution // 8,
        max_fraction=cfg.data.max_bad_fraction,
    )
    data_lib.check_sample(images, policy=bad_examples.on_bad, min_side=bad_examples.min_side)
    return images, bad_examples


def _check_sampling(sample_cfg: SampleConfig, c: models.Components) -> None:
    """Refuse a sampler the family lacks, guidance it cannot take, and a DDIM η for a flow-matching model."""
    sampling.make_scheduler(sample_cfg.scheduler, c.family)
    sampling.Guidance.of(sample_cfg).check(c.family, getattr(c.denoiser.config, "num_layers", None))
    c.family.check_guidance_scale(sample_cfg.guidance_scale)
    if sample_cfg.eta and c.family.process.kind == "flow":
        raise SpinDiffusionError(
            f"sample.eta={sample_cfg.eta}: the {c.family.name} family samples with deterministic Euler steps (no η); "
            "set sample.eta=0 or leave it null"
        )


def _build_cache(
    cfg: RunConfig,
    c: models.Components,
    objective: objectives.Objective,
    images: data_lib.CaptionedImages | data_lib.PreferencePairs,
    bad_examples: cache_lib.BadExamples,
    run_dir: Path,
    resolution: int,
) -> cache_lib.LatentCache | cache_lib.PairCache:
    """Cached latents and embeddings (computed once per run dir): every rank encodes its share of the shards, then
    all of them read the same files lazily."""
    if objective.loser == "pairs":
        build, cache_dir = cache_lib.build_pair_cache, run_dir / "cache" / "pairs"
    else:
        build, cache_dir = cache_lib.build_latent_cache, run_dir / "cache" / "real"
    return build(
        c,
        images,
        cache_dir,
        resolution=resolution,
        batch_size=cfg.data.encode_batch_size,
        model_id=model_id(cfg, c),
        dtype=cfg.data.cache_dtype,
        shard_size=cfg.data.cache_shard_size,
        bad_examples=bad_examples,
        augment=data_lib.Augment(flip=cfg.data.random_flip, crop=cfg.data.random_crop, seed=cfg.seed),
    )


def _finished_iterations(r: _Run) -> int:
    """k of the newest finished model θ_k (the current opponent): train:1 … train:k are done."""
    start = 0
    while start < r.num_iterations and r.state.done(f"train:{start + 1}"):
        start += 1
    return start


def _evaluate(r: _Run, k: int, denoiser: torch.nn.Module) -> None:
    """eval:k — every rank renders its share of the evaluation prompts; the main process scores and records them,
    and writes the evaluation table into θ_k's model card (k > 0)."""
    phase = f"eval:{k}"
    if r.eval_set is None or r.state.done(phase):
        return
    baseline = None
    base_eval = iter_dir(r.run_dir, 0) / EVAL_FILE
    if k > 0 and r.dist.is_main_process and base_eval.exists():
        baseline = read_eval(base_eval).model()
    result = evaluate_denoiser(
        r.cfg, r.c, denoiser, r.eval_set, r.negative_embed, iter_dir(r.run_dir, k), baseline=baseline
    )
    r.state.mark(phase, **(result.metrics if result is not None else {}))
    r.dist.wait_for_everyone()
    if k > 0 and r.dist.is_main_process and r.state.info.get(phase):
        model_card = _card_info(r, k, steps=r.state.info[f"train:{k}"]["steps"])
        atomic.write_text(
            iter_dir(r.run_dir, k) / "model" / "README.md",
            card.render_card(
                dataclasses.replace(model_card, evaluation=r.state.info[phase], eval_prompts=len(r.eval_set.prompts))
            ),
        )


def _card_info(r: _Run, k: int, *, steps: int) -> card.CardInfo:
    """The model card of θ_k (before its evaluation)."""
    info = card.card_info(
        for_iteration(r.cfg, k - 1), iteration=k, steps=steps, data_size=len(r.cache), resolution=r.resolution
    )
    cfg = r.cfg
    call = sampling.pipeline_kwargs(
        r.c.family, cfg.sample.guidance_scale, sampling.Guidance.of(cfg.sample), cfg.sample.negative_prompt
    )
    return dataclasses.replace(export.card_of(info, r.c), call_kwargs={k: repr(v) for k, v in call.items()})


def _contrast(cfg: RunConfig) -> bool:
    """Does the run train the caption contrast (alone, or beside the self-play loss)?"""
    return cfg.loss.objective == "caption_contrast" or cfg.loss.caption_contrast_weight > 0


def _train_data(r: _Run) -> trainer.TrainData:
    """The cached tensors every iteration trains on; the loser of self-play is added by `_generate`."""
    cache, pairs = r.cache, r.objective.loser == "pairs"  # dpo: the cache holds (winner, loser) images
    caption_ids = caption_first_row = neighbours = None
    if _contrast(r.cfg):
        one_word = r.cfg.loss.caption_contrast_negatives == "one_word"
        caption_ids, caption_first_row, neighbours = trainer.caption_table(list(cache.captions), one_word)
    return trainer.TrainData(
        winner=cache.winner_latents if pairs else cache.latents,
        prompt_embeds=cache.prompt_embeds,
        empty_embed=r.empty_embed,
        winner_time_ids=cache.winner_time_ids if pairs else cache.time_ids,
        loser_time_ids=cache.loser_time_ids if pairs else r.c.family.time_ids(1, r.resolution),
        loser=cache.loser_latents if pairs else None,
        caption_ids=caption_ids,
        caption_first_row=caption_first_row,
        caption_neighbours=neighbours,
    )


def _generate(r: _Run, k: int, opponent: torch.nn.Module, data: trainer.TrainData, *, progress: bool) -> None:
    """generate:k — θ_k's own image for every prompt that train:k+1 will visit, in the order of its first visit (the
    pair stream is a seeded permutation per epoch, so this is known before training starts); sets data.loser."""
    cfg, cache = r.cfg, r.cache
    gen_dir = iter_dir(r.run_dir, k) / "generated"
    phase = f"generate:{k}"
    visited = trainer.visited_rows(
        len(data), train_seed(cfg, k), trainer.stream_positions(len(data), cfg.train, r.dist.num_processes)
    )
    plan = sampling.opponent_prompts(cache.captions, visited, cfg.sample.per_caption)
    if not r.state.done(phase):
        gen_started = time.perf_counter()
        spec = sampling.GenerationSpec(
            run_seed=cfg.seed,
            iteration=k,
            num_prompts=plan.num_prompts,
            num_steps=cfg.sample.num_steps,
            guidance_scale=cfg.sample.guidance_scale,
            eta=opponent_eta(cfg, r.c.family),
            latent_shape=tuple(cache.latents.shape[1:]),
            store_trajectory=r.objective.trajectory,
            shard_size=cfg.sample.shard_size,
            store_dtype=cfg.sample.store_dtype,
            scheduler=cfg.sample.scheduler,
            dtype=sampling.resolve_dtype(cfg.sample.dtype, r.dist.device),
            prompts=plan.prompts,
            per_caption=cfg.sample.per_caption,
            guidance=sampling.Guidance.of(cfg.sample),
        )
        sampling.generate_shards(
            opponent,
            r.c.family,
            plan.conditioning(cache.prompt_embeds),
            r.negative_embed,
            gen_dir,
            spec,
            batch_size=cfg.sample.batch_size,
            image_size=r.resolution,
            rank=r.dist.process_index,
            world_size=r.dist.num_processes,
            progress=progress and r.dist.is_main_process,
        )
        r.dist.wait_for_everyone()
        _stop_if_asked(f"generation of θ_{k} stopped; its finished shards are kept in {gen_dir}")
        r.state.mark(
            phase,
            generated=len(plan.visited),
            prompts=plan.num_prompts,
            wall_seconds=round(time.perf_counter() - gen_started, 2),  # this session's share after a resume
        )
    generated = sampling.load_generated(gen_dir)
    if len(generated.latents) != plan.num_prompts:  # sampled per row, now per caption (or the reverse)
        raise SpinDiffusionError(
            f"{gen_dir} holds θ_{k}'s samples of {len(generated.latents)} prompts, but sample.per_caption="
            f"{cfg.sample.per_caption} samples {plan.num_prompts}; resume with the value the run started with"
        )
    if generated.prompts is not None and not torch.equal(generated.prompts, plan.visited):
        raise SpinDiffusionError(
            f"{gen_dir} holds θ_{k}'s samples of {len(generated.prompts)} prompts, but this training visits "
            f"{len(plan.visited)} others (train.* or the number of processes changed); resume with the "
            "original settings"
        )
    data.loser = plan.per_row(generated.latents)  # per_caption=one: a caption's sample serves its rows
    if r.objective.trajectory:
        data.loser_trajectory = plan.per_row(generated.trajectory)
        data.sampler = sampling.SamplerSchedule.of(generated)
        # the guard's noise-free loser target rebuilds θ_k's guided step (trainer._micro_step_loss)
        data.guidance_scale = sampling.cfg_scale(
            r.c.family, cfg.sample.guidance_scale, sampling.Guidance.of(cfg.sample)
        )
        data.negative_embed = r.negative_embed
    earlier = pool_iterations(cfg.sample.opponent_pool, k)
    if earlier:
        pool, has = [], []
        for j in earlier:  # their samples are on disk (generate:j finished before train:j+1)
            old = sampling.load_generated(iter_dir(r.run_dir, j) / "generated")
            pool.append(plan.per_row(old.latents))
            has.append(_rows_held(old, plan, len(data)))
        data.loser_pool, data.loser_pool_has = tuple(pool), torch.stack(has)


def pool_iterations(pool: str | int, k: int) -> list[int]:
    """The earlier iterations whose samples join θ_k's as losers at iteration k (sample.opponent_pool), oldest first:
    latest -> none; all -> 0..k-1; K -> the last K-1 before k (K iterations with k itself)."""
    if pool == "latest":
        return []
    first = 0 if pool == "all" else max(0, k - int(pool) + 1)
    return list(range(first, k))


def _rows_held(generated: sampling.GeneratedSet, plan: sampling.OpponentPrompts, num_rows: int) -> torch.Tensor:
    """[N] bool: the training rows whose prompt `generated` sampled (an earlier iteration visited other rows when
    it trained on part of the data)."""
    if generated.prompts is None:
        return torch.ones(num_rows, dtype=torch.bool)
    held = torch.zeros(max(plan.num_prompts, int(generated.prompts.max()) + 1), dtype=torch.bool)
    held[generated.prompts] = True
    row_prompt = torch.arange(num_rows) if plan.row_prompt is None else plan.row_prompt
    return held[row_prompt]


def _precompute_reference(
    r: _Run, k: int, opponent: torch.nn.Module, data: trainer.TrainData, *, progress: bool
) -> trainer.ReferenceOutputs | None:
    """reference:k — θ_k's terms on every visit of train:k+1 (train.precompute_reference; dpo: the base model's),
    computed while θ_k is loaded, so the training holds no reference model. None when the objective has no
    reference or the option is off."""
    cfg = r.cfg
    if not (r.objective.needs_ref and cfg.train.precompute_reference):
        return None
    cfg_k = for_iteration(cfg, k)
    folder, phase = iter_dir(r.run_dir, k) / "reference", f"reference:{k}"
    as_given = to_dict(r.as_given)
    settings = {name: as_given[name] for name in ("seed", "model", "data", "sample", "loss", "train")}
    key = reference.run_key({**settings, "iteration": k, "processes": r.dist.num_processes}, opponent)
    where = dict(
        key=key,
        data=data,
        train_cfg=cfg_k.train,
        shard_micro_steps=max(1, cfg.sample.shard_size // cfg.train.batch_size),
        rank=r.dist.process_index,
        world_size=r.dist.num_processes,
    )
    if not r.state.done(phase):
        started = time.perf_counter()
        reference.precompute(
            opponent,
            folder=folder,
            objective=cfg.loss.objective,
            loss_cfg=cfg_k.loss,
            family=r.c.family,
            seed=train_seed(cfg, k),
            lora=cfg.model.lora_rank > 0,
            guidance=cfg.sample.guidance_scale,
            barrier=r.dist.wait_for_everyone,
            progress=progress and r.dist.is_main_process,
            **where,
        )
        r.dist.wait_for_everyone()
        _stop_if_asked(f"the reference terms of θ_{k} stopped; their finished shards are kept in {folder}")
        r.state.mark(phase, wall_seconds=round(time.perf_counter() - started, 2))
    return reference.load(folder, **where)


def _train_and_export(
    r: _Run,
    k: int,
    opponent: torch.nn.Module,
    data: trainer.TrainData,
    stored: trainer.ReferenceOutputs | None,
    *,
    progress: bool,
) -> torch.nn.Module:
    """train:k+1 — θ_{k+1} starts from θ_k and is trained against the frozen θ_k, with this iteration's values of
    the per-iteration schedules (loss.beta, train.learning_rate); exported to iter_{k+1}/model (and lora/).
    With `stored` (reference:k) it holds no reference model. Returns θ_{k+1}, frozen: the next opponent."""
    cfg, next_dir = r.cfg, iter_dir(r.run_dir, k + 1)
    cfg_k = for_iteration(cfg, k)
    needs_ref = r.objective.needs_ref and stored is None
    policy, ref = _policy_and_ref(cfg.model, r.c.family, opponent, needs_ref=needs_ref, seed=train_seed(cfg, k))
    result = trainer.train(
        policy,
        ref,
        data,
        objective=cfg.loss.objective,
        loss_cfg=cfg_k.loss,
        train_cfg=cfg_k.train,
        family=r.c.family,
        out_dir=next_dir / "train",
        seed=train_seed(cfg, k),
        progress=progress,
        hparams=hparams(r.as_given),
        validation=r.validation and dataclasses.replace(r.validation, folder=next_dir / "validation"),
        guidance=cfg.sample.guidance_scale,
        reference=stored,
    )
    policy = result.policy  # under FSDP a new, unsharded module with the full weights on every rank
    if cfg.model.lora_rank > 0:
        if r.dist.is_main_process:
            lora.save_lora(policy, next_dir / "lora", r.c)
        policy = lora.merge_lora(policy)
    if r.dist.is_main_process:
        export.save_pipeline(r.c, next_dir / "model", denoiser=policy, card=_card_info(r, k + 1, steps=result.steps))
    r.dist.wait_for_everyone()
    used = {"learning_rate": cfg_k.train.learning_rate}  # the schedules' values for this iteration
    if r.objective.needs_ref:
        used["beta"] = cfg_k.loss.beta
    r.state.mark(
        f"train:{k + 1}",
        steps=result.steps,
        final_loss=result.final_loss,
        wall_seconds=round(result.wall_seconds, 2),
        **used,
    )
    if r.dist.is_main_process:
        trainer.remove_checkpoints(next_dir / "train")
    del ref
    return policy.eval().requires_grad_(False)


def _record_skipped(
    run_dir: Path,
    images: data_lib.CaptionedImages | data_lib.PreferencePairs,
    cache: cache_lib.LatentCache | cache_lib.PairCache,
    max_fraction: float,
    state: RunState,
) -> None:
    """List every example left out (at load: empty captions, missing files; at encoding: unreadable or tiny
    images) in run_dir/skipped.jsonl, count them in state.json (and so in the report), say so on stderr, and
    refuse the data when too many are bad in total."""
    skipped = images.skipped + [{"where": images.where(i), "reason": r} for i, r in sorted(cache.skipped.items())]
    total = len(images) + len(images.skipped)
    if len(skipped) > max_fraction * total:
        raise SpinDiffusionError(
            f"{len(skipped)} of {total} examples are unusable (more than data.max_bad_fraction={max_fraction}); "
            f"first: {skipped[0]['reason']}"
        )
    if not distributed.is_main():
        return
    if skipped:
        atomic.write_text(run_dir / "skipped.jsonl", "".join(json.dumps(row) + "\n" for row in skipped))
        print(
            f"warning: skipped {len(skipped)} of {total} examples (data.on_bad_example=skip); the list and the "
            f"reasons are in {run_dir / 'skipped.jsonl'}",
            file=sys.stderr,
            flush=True,
        )
    state.info["data"] = {"examples": total, "used": len(cache), "skipped": len(skipped)}


def _stop_if_asked(message: str) -> None:
    """Stop every rank between phases once any of them got SIGTERM/SIGINT (all ranks call this together)."""
    if preemption.agree(distributed.state().device, preemption.requested())[0]:
        raise preemption.Preempted(message)


def disk_estimate(
    cfg: RunConfig,
    c: models.Components,
    images: data_lib.CaptionedImages | data_lib.PreferencePairs,
    resolution: int,
    *,
    embed_shape: tuple[int, ...],
) -> preflight.DiskEstimate:
    """What this run will write to its run dir (see preflight.estimate_run_bytes); `embed_shape` = (L, D) of one
    caption's embedding."""
    spec = objectives.get(cfg.loss.objective)

    def params(module: torch.nn.Module | None) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    f = c.vae_scale_factor
    latent = (c.latent_channels, resolution // f, resolution // f)
    denoiser_params = params(c.denoiser)
    num_captions = len(set(images.captions))
    return preflight.estimate_run_bytes(
        num_rows=len(images),
        num_captions=num_captions,
        opponent_samples=num_captions if cfg.sample.per_caption == "one" else None,
        latent_shape=latent,
        embed_shape=embed_shape,
        cache_dtype=cfg.data.cache_dtype,
        images_per_row=2 if spec.loser == "pairs" else 1,
        iterations=cfg.num_iterations if spec.iterates else 1,
        self_play=spec.self_play,
        store_dtype=cfg.sample.store_dtype,
        trajectory_steps=cfg.sample.num_steps if spec.trajectory else None,
        pipeline_params=denoiser_params + sum(params(e) for e in c.text_encoders()) + params(c.vae),
        denoiser_params=denoiser_params,
        trainable_params=denoiser_params if cfg.model.lora_rank == 0 else 0,
        eval_images=cfg.eval.num_prompts if cfg.eval.enabled else 0,
        image_pixels=resolution * resolution,
        reference_bytes=reference_bytes(cfg, c, len(images), latent),
    )


def reference_bytes(cfg: RunConfig, c: models.Components, num_rows: int, latent_shape: tuple[int, ...]) -> int:
    """Bytes of one iteration's stored reference terms (train.precompute_reference): per visit up to 3 float32
    errors per timestep (2, or 3 with the caption contrast), and for the exact path's guard at η > 0 θ_k's guided
    loser prediction (a float32 latent per timestep)."""
    spec = objectives.get(cfg.loss.objective)
    if not (spec.needs_ref and cfg.train.precompute_reference):
        return 0
    visits = trainer.stream_positions(num_rows, for_iteration(cfg, 0).train, distributed.state().num_processes)
    per_visit = 3 * 4
    if cfg.loss.loser_guard is not None and spec.trajectory and opponent_eta(cfg, c.family) > 0:
        per_visit += 4 * int(np.prod(latent_shape))
    return visits * cfg.loss.timesteps_per_pair * per_visit


def opponent_eta(cfg: RunConfig, family: Family) -> float:
    """DDIM η of the opponent's sampler: sample.eta when set; else 1.0 for an objective on the opponent's stored chain
    (spin_exact) with DDIM on a DDPM-family model, whose per-step Gaussian needs σ_t > 0 to be a likelihood at all
    (docs/EXACT_OBJECTIVE.md), and 0.0 otherwise (flow-matching models: deterministic Euler steps)."""
    if cfg.sample.eta is not None:
        return cfg.sample.eta
    stochastic = objectives.get(cfg.loss.objective).trajectory and cfg.sample.scheduler == "ddim"
    return 1.0 if stochastic and family.process.kind != "flow" else 0.0


def train_seed(cfg: RunConfig, k: int) -> int:
    """Seed of the training of θ_{k+1} (pair order and (t, ε) draws); distinct from every sampling seed."""
    return int(np.random.SeedSequence([cfg.seed, k, 0, 1]).generate_state(1)[0])


def _policy_and_ref(
    model_cfg: ModelConfig, family: Family, opponent: torch.nn.Module, *, needs_ref: bool, seed: int
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """θ_{k+1} starts as θ_k. Full fine-tuning: ref = frozen copy; LoRA: ref = the same denoiser, adapters off."""
    policy = opponent
    policy.requires_grad_(True)
    if model_cfg.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    if model_cfg.lora_rank > 0:
        policy.requires_grad_(False)
        lora.add_lora(
            policy,
            rank=model_cfg.lora_rank,
            alpha=model_cfg.lora_alpha or model_cfg.lora_rank,
            target_modules=list(model_cfg.lora_target_modules or family.lora_target_modules(policy)),
            seed=seed,
        )
        return policy, None
    ref = models.frozen_copy(policy) if needs_ref else None
    return policy, ref


def _eval_set(
    cfg: RunConfig,
    c: models.Components,
    captions: list[str],
    images: data_lib.CaptionedImages | data_lib.PreferencePairs,
) -> EvalSet:
    if cfg.eval.prompts is not None:
        prompts = data_lib.load_prompts(cfg.eval.prompts)[: cfg.eval.num_prompts]
        reference: list[Image.Image] = []
    else:
        prompts = captions[: cfg.eval.num_prompts]
        # the real images of these prompts: the shapes world's Fréchet distance compares against them
        reference = [images.image(i) for i in range(len(prompts))] if cfg.data.builtin == "shapes" else []
    from spin_diffusion import scoring

    scorers = []
    if distributed.is_main():  # the other ranks only render
        scorers = [scoring.build_scorer(n, cfg.eval.scorer_paths.get(n)) for n in default_scorer_names(cfg)]
        scoring.check_prompts(scorers, prompts)
    return EvalSet(prompts=prompts, embeds=encoding.encode(c, prompts), scorers=scorers, reference=reference)
