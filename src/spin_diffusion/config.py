"""Typed run configuration: frozen dataclasses, a YAML loader with dotted overrides, and validation.

A run is described by one :class:`RunConfig`. ``load_config(path, ["train.learning_rate=1e-5"])`` reads
the YAML file (or starts from defaults), applies the overrides, checks every key and type, and runs the
cross-field checks. Unknown keys and wrong types raise :class:`SpinDiffusionError` with the key named.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from spin_diffusion import atomic
from spin_diffusion.errors import SpinDiffusionError

Objective = Literal["spin_approx", "spin_exact", "sft", "dpo", "ddo", "caption_contrast"]
# the built-in models (presets.build_preset): tiny (SD-1.x family), the other families' tiny presets (tests), demo
Preset = Literal[
    "tiny", "demo", "tiny-sdxl", "tiny-sd3", "tiny-sd35", "tiny-flux", "tiny-zimage", "tiny-qwenimage", "tiny-flux2"
]
# A number, or one number per self-play iteration: value i trains θ_{i+1}; the last value repeats for later ones.
Schedule = float | tuple[float, ...]


def _check_schedule(key: str, value: Schedule) -> None:
    """Every value of a schedule is > 0 (nan refused too), and a list is not empty."""
    values = value if isinstance(value, tuple) else (value,)
    if not values:
        raise SpinDiffusionError(f"{key} must be a number or a non-empty list of numbers (one per iteration)")
    for i, v in enumerate(values):
        if not v > 0:
            where = f" (value {i + 1} of the list)" if isinstance(value, tuple) else ""
            raise SpinDiffusionError(f"{key} must be > 0, got {v}{where}")


def _as_schedule(value: Any) -> Any:
    """A list given in Python (``LossConfig(beta=[5000, 2500])``) becomes the tuple the YAML loader makes."""
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class ModelConfig:
    """Which model to start from and which of its parameters train (only the denoiser ever trains)."""

    # diffusers pipeline: a Hub id (stable-diffusion-v1-5/stable-diffusion-v1-5) or a local folder (model_index.json),
    # resolved as DiffusionPipeline.from_pretrained does (HF_HUB_OFFLINE=1: the cache only); None -> built-in `preset`
    path: str | None = None
    revision: str | None = None  # Hub ids: branch, tag or commit (None = main)
    variant: str | None = None  # weight files variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)
    # built-in model built from configs (no download): tiny (SD-1.x family), tiny-sdxl, tiny-sd3, tiny-sd35,
    # tiny-flux, tiny-zimage, tiny-qwenimage, tiny-flux2 (tests), demo
    preset: Preset = "tiny"
    # text tokens per prompt: T5's of SD3/SD3.5 and FLUX.1, Qwen3's of Z-Image (training and sampling; the model card
    # says to pass it to the pipeline); None = 77 for SD3 (diffusers' SD3 training scripts), 512 for FLUX and Z-Image
    # (their pipelines' default)
    max_sequence_length: int | None = None
    lora_rank: int = 0  # 0 = full fine-tuning of the denoiser; > 0 = LoRA of this rank (merged at each iteration end)
    lora_alpha: float | None = None  # LoRA scaling numerator; None -> equal to lora_rank
    # module names LoRA adapts; None = the family's: to_q/to_k/to_v/to_out.0, and for FLUX.2 also its single blocks'
    # to_qkv_mlp_proj and attn.to_out (diffusers' klein LoRA script's list)
    lora_target_modules: tuple[str, ...] | None = None
    gradient_checkpointing: bool = False  # trade compute for memory in the denoiser's backward pass

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise SpinDiffusionError(f"model.lora_rank must be >= 0, got {self.lora_rank}")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 512:
            raise SpinDiffusionError(f"model.max_sequence_length must be in 1..512, got {self.max_sequence_length}")
        if self.path is None and (self.revision is not None or self.variant is not None):
            raise SpinDiffusionError("model.revision and model.variant select files of model.path; set model.path")


@dataclass(frozen=True)
class DataConfig:
    """Where the (image, caption) pairs come from; for `dpo`, (caption, winner image, loser image) triples."""

    # imagefolder with metadata.jsonl/csv, a `datasets` folder, parquet/arrow file(s), or a Hub dataset id
    path: str | None = None
    split: str = "train"  # the split of a Hub dataset id or of a `datasets` folder / Hub-layout folder
    streaming: bool = False  # parquet read in place row group by row group (no arrow copy; larger than memory)
    builtin: Literal["shapes"] | None = None  # built-in procedural dataset (the demo world) instead of `path`
    num_builtin: int = 256  # size of the built-in dataset
    image_column: str = "image"  # column holding the image (or its file name, for imagefolders: file_name)
    caption_column: str = "text"  # column holding the caption; "caption" and "prompt" are also tried
    winner_column: str = "winner"  # dpo only: column of the preferred image
    loser_column: str = "loser"  # dpo only: column of the rejected image
    resolution: int | None = None  # training resolution in pixels; None -> the model's native resolution
    # Augmentations of the real images, drawn once per row when the cache encodes it (data.Augment).
    # Mirror with probability 1/2: on in Diffusion-DPO; off by default (it breaks captions saying left or right).
    random_flip: bool = False
    random_crop: bool = False  # a random instead of a centered square crop (SDXL's crop time ids follow it)
    max_samples: int | None = None  # use only the first N examples
    encode_batch_size: int = 32  # batch size for the one-off VAE/text-encoder pass that fills the cache
    # A bad example is an unreadable or missing image, one whose shorter side is < min_image_side, or an empty
    # caption. "error" stops at the first; "skip" leaves it out and lists it in run_dir/skipped.jsonl; "auto" is
    # error below 10 000 rows (a curated set: each bad row is a mistake worth fixing) and skip from there on
    # (scraped sets at Pick-a-Pic scale always hold some broken files; stopping a long encode for one is worse).
    on_bad_example: Literal["auto", "error", "skip"] = "auto"
    max_bad_fraction: float = 0.01  # skip: refuse the data if more rows than this are bad (a systematic problem)
    min_image_side: int | None = None  # pixels; None -> resolution // 8 (64 px for 512-px training)
    cache_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # storage dtype of cached latents/embeddings (reads: fp32)
    cache_shard_size: int = 1024  # rows per cache shard file (the unit of parallel encoding and resumption)

    def __post_init__(self) -> None:
        if self.cache_shard_size < 1:
            raise SpinDiffusionError(f"data.cache_shard_size must be >= 1, got {self.cache_shard_size}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise SpinDiffusionError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.min_image_side is not None and self.min_image_side < 0:
            raise SpinDiffusionError(f"data.min_image_side must be >= 0 or null, got {self.min_image_side}")


@dataclass(frozen=True)
class SampleConfig:
    """How the opponent θ_k samples its images. Evaluation images use num_steps and guidance_scale too, unless
    eval.num_steps / eval.guidance_scale are set, and always batch_size and negative_prompt."""

    num_steps: int = 50  # DDIM steps; also the trajectory length stored for spin_exact
    # classifier-free guidance; 1.0 disables it. FLUX.1: the value of the guidance embedding (FLUX.1-dev: 3.5),
    # in sampling and in training, as FluxPipeline and diffusers' FLUX training scripts use it
    guidance_scale: float = 7.5
    # FLUX.1 only: true classifier-free guidance with negative_prompt (FluxPipeline's true_cfg_scale); 1.0 = off
    true_cfg_scale: float = 1.0
    # SD3/SD3.5 only: skip-layer guidance (StableDiffusion3Pipeline's skip_guidance_layers; SD3.5 medium: [7, 8, 9]);
    # empty = off. Acts only with classifier-free guidance, for steps in (start, stop) of the schedule
    skip_guidance_layers: tuple[int, ...] = ()
    skip_layer_guidance_scale: float = 2.8  # weight of (conditional - conditional without those blocks)
    skip_layer_guidance_start: float = 0.01  # fraction of the steps where skip-layer guidance starts
    skip_layer_guidance_stop: float = 0.2  # fraction of the steps where it stops
    # DDIM η: 0 = deterministic given the initial noise, 1 = DDPM's posterior variance. None = 1.0 for spin_exact on a
    # DDPM-family model (its objective is the likelihood of the opponent's stochastic chain: docs/EXACT_OBJECTIVE.md)
    # and 0 otherwise (flow-matching models sample with deterministic Euler steps).
    eta: float | None = None
    batch_size: int = 8  # prompts per sampling batch (does not change the images)
    shard_size: int = 256  # prompts per saved shard (the unit of resumption)
    negative_prompt: str = ""  # unconditional prompt for guidance
    store_dtype: Literal["fp32", "fp16", "bf16"] = (
        "fp32"  # storage dtype of sampled latents/trajectories (reads: fp32)
    )
    # Opponent generation only (evaluation images always use fp32 DDIM, so scores stay comparable):
    # one: one opponent image per distinct caption, paired with every row of that caption (Pick-a-Pic repeats its
    # captions ~16 times: ~16x fewer images, the same results in the demo study: docs/CHEAPER_ITERATIONS.md);
    # every_row: one per training row (the paper). With distinct captions the two sample the same images.
    per_caption: Literal["every_row", "one"] = "one"
    scheduler: Literal["ddim", "dpmsolver++"] = "ddim"  # dpmsolver++: as good at ~20 steps as DDIM at 50; spin_approx
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = (
        "auto"  # denoiser compute dtype (autocast); auto: bf16 on CUDA, else fp32
    )
    # Whose samples are the losers at iteration k (spin_approx, ddo): latest = θ_k's only (the paper); all =
    # θ_0..θ_k's; an integer K >= 1 = the last K iterations' (θ_{k-K+1}..θ_k; 1 = latest). Each pair's loser is drawn
    # from the pool by its place in the pair stream; the reference stays θ_k. Earlier samples: iter_j/generated/.
    opponent_pool: Literal["latest", "all"] | int = "latest"


@dataclass(frozen=True)
class LossConfig:
    """The objective and its temperature. See spin_diffusion.losses for the formulas."""

    # spin_approx | spin_exact | ddo (self-play), caption_contrast (rounds against θ_k, no generation), sft, dpo
    objective: Objective = "spin_approx"
    # Same units as Diffusion-DPO's --beta_dpo: logit = -(beta/2) * Δ(mean-squared errors). A number, or one value
    # per self-play iteration, e.g. [5000, 2500]: 5000 trains θ_1, 2500 trains θ_2 and every later iteration.
    beta: Schedule = 5000.0
    timesteps_per_pair: int = 1  # K timesteps drawn per pair per step (spin_exact averages them inside ℓ)
    # winner and loser share ε (Diffusion-DPO code; DDO's Appendix D code too); False draws ε' independently
    share_noise: bool = True
    # λ >= 0: loss = preference loss + λ · (policy's denoising error on the real / winner images), the RPO remedy
    # when the winners' likelihood falls during training. 0 = off (the paper's objective). The preference loss pulls
    # that error down with weight (β/2)·σ(-logit), β/4 at the start of an iteration, so λ ≈ β/4 weighs both equally.
    sft_weight: float = 0.0
    # Diffusion-SDPO's winner-preserving guard, μ in [0, 1] (null = off): the loser's gradient is scaled per pair and
    # timestep so that the step does not raise the winner's error to first order (μ > 0: lowers it by at least μ
    # of a plain SFT step's first-order decrease). Fu et al. use 0.9 with Diffusion-DPO. losses.loser_guard_scale.
    loser_guard: float | None = None
    # DPO-Positive hinge λ_P >= 0 (0 = off): adds λ_P·min(0, reward_winner) to the logit, so the margin cannot be
    # widened by making the real image's error worse than the reference's. Pal et al. use 50 (and 5 for some tasks).
    dpop_lambda: float = 0.0
    # Caption contrast weight w >= 0 (0 = off): adds w · (DPO-form loss preferring each real image under its own
    # caption c over the same image under a mismatched caption c′, relative to θ_k; same x_t, t, ε; no generation)
    # to the spin_approx / spin_exact / ddo loss; objective caption_contrast trains the term alone (same β).
    caption_contrast_weight: float = 0.0
    # How c′ is drawn: random = uniformly among the other distinct captions of the data; one_word = among the captions
    # that differ from c in exactly one word (an attribute swap, the harder negative), random when c has none.
    caption_contrast_negatives: Literal["random", "one_word"] = "one_word"
    # DDO's weight α >= 0 of the generated (fake) term (objective ddo): −log σ(r(real)) − α·log(1 − σ(r(generated))).
    # 1 = the paper's code default (Zheng et al. 2025, App. D); the paper tunes α in [0.5, 50]. docs/OBJECTIVES.md
    ddo_fake_weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", _as_schedule(self.beta))
        _check_schedule("loss.beta", self.beta)
        if not self.sft_weight >= 0:  # also refuses nan
            raise SpinDiffusionError(f"loss.sft_weight must be >= 0, got {self.sft_weight}")
        if not self.dpop_lambda >= 0:
            raise SpinDiffusionError(f"loss.dpop_lambda must be >= 0, got {self.dpop_lambda}")
        if self.loser_guard is not None and not 0.0 <= self.loser_guard <= 1.0:
            raise SpinDiffusionError(f"loss.loser_guard must be in [0, 1] (or null = off), got {self.loser_guard}")
        if not self.caption_contrast_weight >= 0:
            raise SpinDiffusionError(f"loss.caption_contrast_weight must be >= 0, got {self.caption_contrast_weight}")
        if not self.ddo_fake_weight >= 0:
            raise SpinDiffusionError(f"loss.ddo_fake_weight must be >= 0, got {self.ddo_fake_weight}")
        if self.caption_contrast_weight > 0 and self.objective not in ("spin_approx", "spin_exact", "ddo"):
            raise SpinDiffusionError(
                "loss.caption_contrast_weight adds the caption contrast to a self-play loss (spin_approx, spin_exact, "
                f"ddo), not to {self.objective}; use loss.objective=caption_contrast for the term alone"
            )
        if self.objective == "ddo" and self.loser_guard is not None:
            raise SpinDiffusionError(
                "loss.loser_guard is derived for one logit per pair (SPIN, DPO); ddo's real and generated terms are "
                "separate logistics; set loss.loser_guard=null"
            )
        for key, value, off in (
            ("sft_weight", self.sft_weight, 0),
            ("dpop_lambda", self.dpop_lambda, 0),
            ("loser_guard", self.loser_guard, None),
        ):
            if self.objective == "sft" and value != off:
                raise SpinDiffusionError(
                    f"loss.{key} acts on the preference loss of the dpo / spin objectives; objective sft has none "
                    f"(set loss.{key}={'null' if off is None else off})"
                )
        if self.timesteps_per_pair < 1:
            raise SpinDiffusionError(f"loss.timesteps_per_pair must be >= 1, got {self.timesteps_per_pair}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of θ_{k+1} within one iteration (per-iteration values; the HF cards used 500 steps)."""

    # AdamW peak learning rate: a number, or one value per self-play iteration (the last repeats), like loss.beta
    learning_rate: Schedule = 2e-5
    batch_size: int = 8  # pairs (or images, for sft) per device per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step (or derived: total_batch_size)
    # Pairs (images for sft) per optimizer step over all processes; the accumulation is derived from it and the
    # process count (it must divide by batch_size × processes). null = batch_size × processes × accumulation.
    total_batch_size: int | None = None
    # Diffusion-DPO's --scale_lr: the learning rate used is learning_rate × pairs per optimizer step (its launchers:
    # 1e-8 × 2048 = 2.05e-5, SPIN-Diffusion's published rate for 2048 pairs).
    scale_lr: bool = False
    max_steps: int | None = None  # optimizer steps per iteration; None -> `epochs` over the data
    epochs: float = 1.0  # used when max_steps is None
    warmup_steps: int = 0  # linear warm-up from 0 to learning_rate
    lr_scheduler: Literal["linear", "constant", "constant_with_warmup", "cosine"] = "linear"  # after warm-up
    weight_decay: float = 1e-2  # AdamW (decoupled) weight decay
    adam_beta1: float = 0.9  # AdamW β1
    adam_beta2: float = 0.999  # AdamW β2
    adam_epsilon: float = 1e-8  # AdamW ε
    max_grad_norm: float = 1.0  # 0 disables clipping
    caption_dropout: float = (
        0.0  # fraction of pairs trained on the empty prompt (what makes CFG work when pretraining)
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # accelerate autocast of the trained model
    checkpoint_every: int = 100  # optimizer steps between resumable checkpoints (0 = only at the end)
    # Resumable checkpoints kept while an iteration trains, the newest first (null: all); --resume takes the newest.
    # They are removed once the iteration's model is exported, which supersedes them.
    checkpoints_total_limit: int | None = 1
    checkpoint_every_minutes: float = (
        0.0  # also checkpoint when this much time has passed since the last one (0 = off)
    )
    log_every: int = 10  # optimizer steps between log lines
    # Experiment trackers (accelerate's), logging the objective per step and the whole config as hyper-parameters.
    # wandb needs `pip install wandb` (WANDB_MODE=offline writes runs locally); all = every tracker installed.
    report_to: Literal["tensorboard", "wandb", "all", "none"] = "tensorboard"
    num_workers: int = 0  # data loader workers
    # adamw: torch's AdamW; adamw8bit: bitsandbytes' AdamW with 8-bit states (pip install "spin-diffusion[8bit]"):
    # 2 bytes of optimizer state per trained parameter instead of 8, same hyper-parameters
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    # Exponential moving average of the trained weights (diffusers' EMAModel: update n uses the decay
    # min(ema_decay, (1+n)/(10+n))); the EMA is exported, and is the next iteration's opponent. null = off.
    ema_decay: float | None = None
    allow_tf32: bool = True  # TF32 matmuls and convolutions on NVIDIA GPUs (Ampere and newer); no effect elsewhere
    # Compute the reference's denoising errors of every pair training will visit before it starts (θ_k is loaded to
    # generate anyway) and store them in iter_k/reference/: training then holds no reference copy and runs one model
    # forward fewer per pair, with the same result. false: a frozen reference runs beside the policy every step.
    precompute_reference: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "learning_rate", _as_schedule(self.learning_rate))
        _check_schedule("train.learning_rate", self.learning_rate)
        for name in ("batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise SpinDiffusionError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise SpinDiffusionError(f"train.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.total_batch_size is not None:
            if self.total_batch_size < 1:
                raise SpinDiffusionError(f"train.total_batch_size must be >= 1 or null, got {self.total_batch_size}")
            if self.gradient_accumulation_steps != 1:
                raise SpinDiffusionError(
                    "set train.total_batch_size or train.gradient_accumulation_steps, not both (the accumulation is "
                    "derived from the total)"
                )
            if self.total_batch_size % self.batch_size:
                raise SpinDiffusionError(
                    f"train.total_batch_size={self.total_batch_size} is not a multiple of train.batch_size="
                    f"{self.batch_size}"
                )
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise SpinDiffusionError(
                f"train.checkpoints_total_limit must be >= 1 or null (all), got {self.checkpoints_total_limit}"
            )
        if self.checkpoint_every_minutes < 0:
            raise SpinDiffusionError(
                f"train.checkpoint_every_minutes must be >= 0, got {self.checkpoint_every_minutes}"
            )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise SpinDiffusionError(f"train.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise SpinDiffusionError(f"train.ema_decay must be in [0, 1) or null (off), got {self.ema_decay}")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation after each iteration."""

    enabled: bool = True  # score each iteration (and the base) after training
    include_base: bool = True  # also score the starting model (iteration 0); win rates are against it
    prompts: str | None = None  # prompt file (.txt/.csv/.jsonl/.parquet); None -> the first training captions
    num_prompts: int = 64  # how many prompts to score
    scorers: tuple[str, ...] = ()  # e.g. ("pickscore", "clip"); () -> the default for the data (shapes judge, or none)
    scorer_paths: dict[str, str] = field(default_factory=dict)  # scorer name -> local weights folder
    seed: int = 1234  # evaluation images use their own seed so that all models see the same noise
    # Sampler of the evaluation images (always fp32 DDIM); None = sample.num_steps / sample.guidance_scale, the
    # opponent's. Set them to let the opponent sample cheaply (e.g. sample.num_steps=10, sample.guidance_scale=1)
    # while scores keep the settings they are compared at (e.g. 50 steps, CFG 7.5, as in the paper's evaluation).
    num_steps: int | None = None
    guidance_scale: float | None = None  # 1.0 disables classifier-free guidance
    # A few prompts rendered with the policy while it trains (the evaluation's sampler and seeds), saved as
    # iter_KK/validation/step_NNNNNNN/*.png and logged to the trackers; () = none.
    validation_prompts: tuple[str, ...] = ()
    validation_every: int = 100  # optimizer steps between validation renders

    def __post_init__(self) -> None:
        if self.num_steps is not None and self.num_steps < 1:
            raise SpinDiffusionError(f"eval.num_steps must be >= 1 or null, got {self.num_steps}")
        if self.validation_every < 1:
            raise SpinDiffusionError(f"eval.validation_every must be >= 1, got {self.validation_every}")


@dataclass(frozen=True)
class RunConfig:
    """One self-play run (or one sft / dpo baseline run)."""

    run_dir: str = "runs/spin"  # where caches, samples, checkpoints, exports and the report go
    seed: int = 0  # run seed; sampling seeds derive from (seed, iteration, prompt index)
    num_iterations: int = 3  # K self-play iterations (sft and dpo always train once)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.num_iterations < 1:
            raise SpinDiffusionError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.data.path is not None and self.data.builtin is not None:
            raise SpinDiffusionError("set either data.path or data.builtin, not both")
        objective = self.loss.objective
        schedules = {"loss.beta": self.loss.beta, "train.learning_rate": self.train.learning_rate}
        if objective == "sft":
            del schedules["loss.beta"]  # unused by sft
        for key, value in schedules.items():
            if not isinstance(value, tuple):
                continue
            if objective in ("sft", "dpo") and len(value) > 1:
                raise SpinDiffusionError(
                    f"{key} lists {len(value)} values, but {objective} trains once; give one number"
                )
            if len(value) > self.num_iterations:
                raise SpinDiffusionError(
                    f"{key} lists {len(value)} values for num_iterations={self.num_iterations}; give at most one "
                    "per iteration (the last one repeats)"
                )
        if self.sample.scheduler != "ddim" and self.loss.objective == "spin_exact":
            raise SpinDiffusionError(
                f"spin_exact needs sample.scheduler=ddim (it inverts the DDIM step), "
                f"not {self.sample.scheduler}; or use loss.objective=spin_approx"
            )
        pool = self.sample.opponent_pool
        if isinstance(pool, int) and pool < 1:
            raise SpinDiffusionError(f"sample.opponent_pool must be latest, all or an integer K >= 1; got {pool}")
        if pool not in ("latest", 1) and objective not in ("spin_approx", "ddo"):
            raise SpinDiffusionError(
                f"sample.opponent_pool={pool} draws losers from earlier iterations' final samples (spin_approx or "
                f"ddo), not for {objective}; set sample.opponent_pool=latest"
            )
        if self.sample.eta is not None and not self.sample.eta >= 0:
            raise SpinDiffusionError(f"sample.eta must be >= 0 (or null = automatic), got {self.sample.eta}")
        if self.sample.scheduler != "ddim" and self.sample.eta:
            raise SpinDiffusionError(
                f"sample.eta > 0 needs sample.scheduler=ddim ({self.sample.scheduler} is "
                "deterministic); set sample.eta=0"
            )


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) one YAML value against a field's annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except SpinDiffusionError as err:
                # a list that failed as a whole: the list arm's error names the bad element, not "not a number"
                if isinstance(value, (list, tuple)) and typing.get_origin(arg) is tuple:
                    errors.insert(0, str(err))
                else:
                    errors.append(str(err))
        if not errors:
            raise SpinDiffusionError(f"{key}: bad value {value!r}")
        # every arm said "<key> must be X; got <value>": one line that names them all (latest, all or an integer)
        head, tail = f"{key} must be ", f"; got {value!r}"
        if len(errors) > 1 and all(e.startswith(head) and e.endswith(tail) for e in errors):
            wants = [e.removeprefix(head).removesuffix(tail).removeprefix("one of ") for e in errors]
            raise SpinDiffusionError(f"{head}{' or '.join(wants)}{tail}")
        raise SpinDiffusionError(errors[0])
    if origin is Literal:
        if value not in args:
            raise SpinDiffusionError(f"{key} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise SpinDiffusionError(f"{key} must be a list; got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise SpinDiffusionError(f"{key} must be a mapping; got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpinDiffusionError(f"{key} must be a mapping of its fields; got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SpinDiffusionError(f"{key} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SpinDiffusionError(f"{key} must be an integer; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
        raise SpinDiffusionError(f"{key} must be a number; got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise SpinDiffusionError(f"{key} must be a string; got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this module, not user input


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise SpinDiffusionError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(sorted(types_))}"
        )
    kwargs = {name: _coerce(v, types_[name], f"{prefix}{name}") for name, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpinDiffusionError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value``; the value is read as YAML (``1e-5``, ``true``, ``[a, b]``, ``null``)."""
    if "=" not in text:
        raise SpinDiffusionError(f"override '{text}' must look like key=value, e.g. train.learning_rate=1e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise SpinDiffusionError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SpinDiffusionError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SpinDiffusionError(f"config file {p} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpinDiffusionError(f"config file {p} must hold a mapping of sections, e.g. 'train: {{...}}'")
    return data


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, values)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (if any), then dotted ``key=value`` overrides."""
    tree: dict[str, Any] = read_yaml(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that accepts dotted names: ``replace(cfg, **{"train.max_steps": 10})``."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **flat)


def at_iteration(value: Schedule, i: int) -> float:
    """Value ``i`` (0-based: i = 0 trains θ_1) of a per-iteration schedule; past its end the last value repeats."""
    if isinstance(value, tuple):
        return value[min(i, len(value) - 1)]
    return value


def for_iteration(cfg: RunConfig, i: int) -> RunConfig:
    """``cfg`` with every per-iteration schedule (loss.beta, train.learning_rate) resolved to the numbers of
    training ``i`` (0-based: the training of θ_{i+1}); what self_play hands the trainer."""
    return replace(
        cfg,
        **{
            "loss.beta": at_iteration(cfg.loss.beta, i),
            "train.learning_rate": at_iteration(cfg.train.learning_rate, i),
        },
    )


def for_world(train: TrainConfig, world_size: int) -> TrainConfig:
    """``train`` as it runs on ``world_size`` processes: the accumulation derived from ``total_batch_size`` and the
    learning rate(s) multiplied by the pairs per optimizer step when ``scale_lr``; the result has neither set, so
    applying it twice changes nothing. Raises SpinDiffusionError when the total does not divide."""
    accumulation = train.gradient_accumulation_steps
    if train.total_batch_size is not None:
        per_micro_step = train.batch_size * world_size
        if train.total_batch_size % per_micro_step:
            raise SpinDiffusionError(
                f"train.total_batch_size={train.total_batch_size} is not a multiple of train.batch_size × processes "
                f"= {train.batch_size} × {world_size}; change one of them"
            )
        accumulation = train.total_batch_size // per_micro_step
    lr = train.learning_rate
    if train.scale_lr:
        total = train.batch_size * accumulation * world_size
        lr = tuple(v * total for v in lr) if isinstance(lr, tuple) else lr * total
    return dataclasses.replace(
        train, gradient_accumulation_steps=accumulation, learning_rate=lr, total_batch_size=None, scale_lr=False
    )


def _plain(v: Any) -> Any:
    """YAML-ready values: tuples become lists."""
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML-ready dict (tuples become lists)."""
    return {k: _plain(v) for k, v in dataclasses.asdict(cfg).items()}


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config atomically."""
    atomic.write_text(path, dump_config(cfg))


# ---------------------------------------------------------------------------------------------------------------
# `spin-diffusion config --explain`: every key, read from the dataclasses and their comments (so it cannot drift)


@dataclass(frozen=True)
class KeyDoc:
    """One config key: its dotted name, its value in a config, its default and its meaning (the field's comment)."""

    key: str
    value: Any
    default: Any
    meaning: str


def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in this file: the comment on the field's own lines, else the comment lines just above
    it (joined into one line)."""
    import inspect
    import io
    import tokenize

    comments: dict[str, str] = {}
    above: list[str] = []
    field_name, inline, depth, prev = None, [], 0, None
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.COMMENT:
            (inline if field_name else above).append(tok.string.lstrip("#").strip())
        elif tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.OP and tok.string == ":" and depth == 0 and field_name is None and prev is not None:
            if prev.type == tokenize.NAME and prev.start[1] == 4:  # `    name: type = default` in the class body
                field_name = prev.string
        elif tok.type == tokenize.NEWLINE:
            if field_name is not None:
                comments[field_name] = " ".join(inline or above)
            field_name, inline, above = None, [], []
        elif tok.type == tokenize.NL and prev is not None and prev.type == tokenize.NL:
            above = []  # a blank line ends a comment block
        prev = tok
    return comments


def explain_keys(cfg: RunConfig | None = None) -> list[KeyDoc]:
    """Every leaf key of :class:`RunConfig` with its value in ``cfg`` (defaults when None), default and meaning."""
    cfg = cfg if cfg is not None else RunConfig()
    docs: list[KeyDoc] = []

    def walk(obj: Any, default: Any, prefix: str) -> None:
        comments = _field_comments(type(obj))
        for f in dataclasses.fields(obj):
            value, default_value = getattr(obj, f.name), getattr(default, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, default_value, f"{prefix}{f.name}.")
            else:
                docs.append(KeyDoc(f"{prefix}{f.name}", value, default_value, comments.get(f.name, "")))

    walk(cfg, RunConfig(), "")
    return docs


def hparams(cfg: RunConfig) -> dict[str, Any]:
    """The whole config as flat tracker hyper-parameters: dotted keys, scalars only (None and lists as text), as
    TensorBoard's hparams and Weights & Biases' config take them."""
    return {
        d.key: d.value if isinstance(d.value, bool | int | float | str) else json.dumps(_plain(d.value))
        for d in explain_keys(cfg)
    }


def format_explain(docs: list[KeyDoc]) -> str:
    """``key: value`` (with the default when the value differs from it), then the meaning, indented."""

    def shown(v: Any) -> str:
        return yaml.safe_dump(_plain(v), default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()

    lines = []
    for d in docs:
        differs = f"   (default: {shown(d.default)})" if d.value != d.default else ""
        lines += [f"{d.key}: {shown(d.value)}{differs}", f"    {d.meaning}"]
    return "\n".join(lines) + "\n"
