"""Model families: the one place that knows how a model is conditioned, noised, called and sampled.

Six families, told apart by the pipeline folder (``models.Components.family``):

============  ==========================  ===============================  ==========================================
family        text conditioning           forward process, target          denoiser call
============  ==========================  ===============================  ==========================================
``sd``        one CLIP, last hidden       DDPM: √ᾱ x₀ + √(1-ᾱ) ε; ε or v   ``unet(x, t, encoder_hidden_states=…)``
``sdxl``      two CLIPs, penultimate,     as ``sd``                        + ``added_cond_kwargs`` (pooled text
              concatenated; pooled 2nd                                     embedding, 6 time ids per image)
``sd3``       CLIP-L + CLIP-G + T5,       rectified flow: (1-σ) x₀ + σ ε;  ``transformer(x, σ·1000,
              pooled CLIP-L ⊕ CLIP-G      target ε - x₀ (velocity)         encoder_hidden_states, pooled_projections)``
``flux``      CLIP-L pooled + T5          as ``sd3``; σ shifted by image   ``transformer(pack(x), σ, guidance, …,
                                          size (dynamic shifting)          txt_ids, img_ids)``, output unpacked
``zimage``    Qwen3, each prompt's own    as ``sd3``                       ``transformer([x_i], 1 - σ, [tokens_i])``,
              tokens (a masked Cond)                                       output negated (it predicts x₀ - ε)
``flux2``     Qwen3 hidden states 9, 18,  as ``sd3`` on the pipeline's     ``transformer(tokens(x), σ, text, 4-D
              27 stacked (FLUX.2 klein)   patchified, BN-normalised        txt_ids / img_ids)``
                                          latents; σ uniform in training
``qwenimage`` Qwen2.5-VL, each prompt's   as ``flux`` (no guidance         ``transformer(pack(x), σ, text, text mask,
              own tokens (masked Cond)    embedding); its own VAE          img_shapes)``, output unpacked
============  ==========================  ===============================  ==========================================

Adding a family is one class here and one tiny preset (docs/FAMILIES.md, "Adding a family").

SDXL, SD3, FLUX and Z-Image prompts are encoded by the diffusers pipeline's own ``encode_prompt``, so training sees
exactly what the family's pipeline computes at inference. The losses never see any of this: they get per-sample
errors (``losses.denoise_error(prediction, target)``).

A "time" ``t`` is what the forward process is indexed by: an integer DDPM timestep, or the flow's σ ∈ (0, 1]
(float). ``ForwardProcess.model_timestep`` turns it into what the network takes (t itself, or σ·1000).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from spin_diffusion import encoding
from spin_diffusion.errors import SpinDiffusionError

if TYPE_CHECKING:
    from spin_diffusion.models import Components

# T5 tokens of an SD3 prompt when `model.max_sequence_length` is unset: 77 as in diffusers' SD3 training scripts
# (the pipeline's default is 256; the model card says to pass max_sequence_length=77 to generate exactly as trained).
SD3_MAX_SEQUENCE_LENGTH = 77
# T5 tokens of a FLUX.1 prompt when `model.max_sequence_length` is unset: FluxPipeline's default (512), which
# diffusers' FLUX training scripts use too (FLUX.1-schnell's pipeline card uses 256).
FLUX_MAX_SEQUENCE_LENGTH = 512
# Training σ density of SD3 (diffusers' default `weighting_scheme="logit_normal"`, mean 0, std 1): σ-index
# u = sigmoid(N(0, 1)), the loss weight is 1.
LOGIT_NORMAL_MEAN, LOGIT_NORMAL_STD = 0.0, 1.0


# LoRA's module names when model.lora_target_modules is unset (diffusers' LoRA scripts' default; FLUX.2 adds more)
ATTENTION_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# --------------------------------------------------------------------------------------------------
# Conditioning


@dataclass
class Cond:
    """The text conditioning of N prompts: ``embeds [N, L, D]``; for SDXL/SD3/FLUX.1 ``pooled [N, P]``; for the
    families whose prompts have their own lengths (Z-Image) ``mask [N, L]``, 1 on a prompt's tokens and 0 on the
    padding (kept as 0/1 numbers in the embeddings' dtype, so it travels through every cast and cache unchanged).

    Fields may be tensors or lazily read ``cache.RowStore`` objects; indexing returns tensors.
    """

    embeds: Any  # Tensor | RowStore  [N, L, D]
    pooled: Any = None  # Tensor | RowStore | None  [N, P]
    mask: Any = None  # Tensor | RowStore | None  [N, L]

    # the names of the fields in a cache shard (and in a batch's "context" dict)
    STORED = {"embeds": "prompt_embeds", "pooled": "pooled_embeds", "mask": "prompt_mask"}

    @property
    def shape(self) -> torch.Size:
        """The shape of ``embeds`` (``len(cond) == shape[0]``)."""
        return self.embeds.shape

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def _fields(self) -> dict[str, Any]:
        return {"embeds": self.embeds, "pooled": self.pooled, "mask": self.mask}

    def __getitem__(self, idx: Any) -> Cond:
        return self.map(lambda x: x[idx])

    def tensors(self) -> dict[str, Tensor]:
        """The named tensors, as stored in a cache shard: ``prompt_embeds`` and (if any) ``pooled_embeds`` and
        ``prompt_mask``."""
        return {self.STORED[k]: v for k, v in self._fields().items() if v is not None}

    @classmethod
    def from_tensors(cls, named: dict[str, Any]) -> Cond:
        """The Cond of :meth:`tensors`' names (a cache's stores, a batch's context)."""
        return cls(**{k: named.get(name) for k, name in cls.STORED.items()})

    def map(self, fn) -> Cond:
        """``fn`` applied to every tensor (e.g. ``lambda x: x.to(device)``)."""
        return Cond(**{k: None if v is None else fn(v) for k, v in self._fields().items()})

    def to(self, *args: Any, **kwargs: Any) -> Cond:
        return self.map(lambda x: x.to(*args, **kwargs))

    def repeat_interleave(self, k: int) -> Cond:
        return self.map(lambda x: x.repeat_interleave(k, dim=0))

    def expand(self, n: int) -> Cond:
        """A batch of ``n`` copies of a one-prompt Cond."""
        return self.map(lambda x: x.expand(n, *x.shape[1:]))

    def where(self, mask: Tensor, other: Cond) -> Cond:
        """Row i of ``other`` (a one-prompt Cond, broadcast) where ``mask[i]``, else row i of self."""

        def pick(x: Tensor | None, y: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            return torch.where(mask.reshape(-1, *([1] * (x.dim() - 1))), y.to(x), x)

        mine, theirs = self._fields(), other._fields()
        return Cond(**{k: pick(mine[k], theirs[k]) for k in mine})

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        first = conds[0]._fields()
        return Cond(**{k: None if v is None else torch.cat([c._fields()[k] for c in conds]) for k, v in first.items()})

    def tokens(self) -> list[Tensor]:
        """Each prompt's own tokens ``[L_i, D]`` (the rows where ``mask`` is 1; all L without a mask)."""
        if self.mask is None:
            return list(self.embeds.unbind(0))
        return [e[m > 0.5] for e, m in zip(self.embeds, self.mask, strict=True)]

    @staticmethod
    def padded(tokens: list[Tensor], length: int) -> Cond:
        """Prompts of their own lengths ``[L_i, D]`` (L_i <= ``length``) as one Cond padded to ``length``, with the
        mask that :meth:`tokens` reads back."""
        dim = tokens[0].shape[-1]
        embeds = tokens[0].new_zeros(len(tokens), length, dim)
        mask = tokens[0].new_zeros(len(tokens), length)
        for i, t in enumerate(tokens):
            embeds[i, : t.shape[0]] = t
            mask[i, : t.shape[0]] = 1
        return Cond(embeds, mask=mask)


# --------------------------------------------------------------------------------------------------
# Forward processes


class DDPMProcess:
    """The DDPM forward process of SD-1.x/2.x/XL: x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε, t ∈ {0..T-1} uniform; the network
    predicts ε or v = √ᾱ ε - √(1-ᾱ) x₀ (``prediction_type`` of the model's scheduler)."""

    kind = "ddpm"

    def __init__(self, scheduler_config: dict) -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise SpinDiffusionError(
                f"scheduler prediction_type {self.prediction_type!r} is not supported; "
                "use a model trained for 'epsilon' or 'v_prediction'"
            )
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.scheduler.alphas_cumprod

    def draw_times(self, generator: torch.Generator, k: int, latent_shape: Any = None) -> Tensor:
        """k training times: uniform integer timesteps (the same at every resolution). -> [k] long"""
        return torch.randint(0, self.num_train_timesteps, (k,), generator=generator)

    def noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, noise, t)

    def model_timestep(self, t: Tensor) -> Tensor:
        return t

    # spin_exact works in ε-space: the opponent's implied noise of a DDIM step (sampling.implied_noise)
    def exact_time(self, sampler: Any, step_index: Tensor) -> Tensor:
        return sampler.timesteps[step_index]

    def exact_winner_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise

    def exact_space(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Network output -> ε-prediction (for v: ε = √ᾱ v + √(1-ᾱ) x_t)."""
        if self.prediction_type == "epsilon":
            return pred
        a = self.alphas_cumprod.to(pred.device)[t].reshape(-1, *([1] * (pred.dim() - 1))).to(pred.dtype)
        return a.sqrt() * pred + (1 - a).sqrt() * x_t


class FlowProcess:
    """Rectified flow (SD3, SD3.5, FLUX.1): x_σ = (1-σ) x₀ + σ ε with σ from the model's shifted schedule, drawn by
    the logit-normal density of diffusers' SD3 training; the network predicts the velocity v = ε - x₀ and takes
    σ·1000 as its timestep. The loss is the unweighted velocity MSE (as flow_grpo's DPO and Flow-DPO).

    The shift is the scheduler's: a fixed ``shift`` (SD3: 3), or with ``use_dynamic_shifting`` (FLUX.1, some SD3.5
    configs) the resolution-dependent one the pipelines sample with, σ ↦ e^μ / (e^μ + 1/σ - 1) where μ grows
    linearly with the number of image tokens from ``base_shift`` (at ``base_image_seq_len``) to ``max_shift`` (at
    ``max_image_seq_len``). Training draws σ at the training resolution's μ, so it visits the noise levels the
    opponent samples at (as SD3's static shift does); ``patch`` pixels of latent per token side (2 for SD3/SD3.5's
    patch embedding and FLUX's 2×2 packing) turn a latent shape into the token count.
    """

    kind = "flow"
    prediction_type = "flow"

    def __init__(self, scheduler_config: dict, *, patch: int = 2) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.patch = patch
        self.dynamic = bool(self.scheduler.config.use_dynamic_shifting)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        # descending, σ_0 = 1: shifted by the fixed shift, or unshifted (dynamic: shifted per resolution by `mu`)
        self.sigmas = self.scheduler.sigmas[: self.num_train_timesteps].float()

    def mu(self, latent_shape: tuple[int, ...] | torch.Size) -> float | None:
        """The dynamic shift μ at latents of ``latent_shape`` (…, h, w), as FluxPipeline / StableDiffusion3Pipeline
        compute it (``calculate_shift``); None without dynamic shifting."""
        if not self.dynamic:
            return None
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        h, w = int(latent_shape[-2]), int(latent_shape[-1])
        config = self.scheduler.config
        return calculate_shift(
            (h // self.patch) * (w // self.patch),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )

    def training_sigmas(self, latent_shape: tuple[int, ...] | torch.Size | None) -> Tensor:
        """The T training σ (descending) at latents of ``latent_shape`` (needed with dynamic shifting). -> [T]"""
        if not self.dynamic:
            return self.sigmas
        if latent_shape is None:
            raise ValueError("a dynamically shifted flow schedule needs the latent shape")
        return self.scheduler.time_shift(self.mu(latent_shape), 1.0, self.sigmas).float()

    def draw_times(
        self, generator: torch.Generator, k: int, latent_shape: tuple[int, ...] | torch.Size | None = None
    ) -> Tensor:
        """k training σ: index = ⌊sigmoid(N(mean, std))·T⌋ into the shifted schedule. -> [k] float"""
        u = torch.sigmoid(torch.randn(k, generator=generator) * LOGIT_NORMAL_STD + LOGIT_NORMAL_MEAN)
        idx = (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        return self.training_sigmas(latent_shape)[idx]

    @staticmethod
    def _col(sigma: Tensor, like: Tensor) -> Tensor:
        return sigma.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        s = self._col(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def model_timestep(self, t: Tensor) -> Tensor:
        return t * self.num_train_timesteps

    # spin_exact works in velocity space: the opponent's implied velocity of an Euler step
    def exact_time(self, sampler: Any, step_index: Tensor) -> Tensor:
        return sampler.sigmas[step_index].float()

    def exact_winner_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def exact_space(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return pred


ForwardProcess = DDPMProcess | FlowProcess


# --------------------------------------------------------------------------------------------------
# Families


class Family:
    """How one family encodes prompts and calls its denoiser; ``process`` is its training forward process.

    The denoiser call is :meth:`predict` (one signature for every family): it builds the network's keyword
    inputs with :meth:`_inputs` and reads its output with :meth:`_output`, which each family overrides."""

    name = "sd"
    pipeline_class = "StableDiffusionPipeline"  # the diffusers pipeline class that samples, saves and reloads it
    denoiser_class = "UNet2DConditionModel"  # its denoiser's class: tells the family of a pipeline class not known
    num_text_encoders = 1  # text_encoder, text_encoder_2, ... the pipeline needs
    default_guidance_scale = 7.5  # the pipeline's `guidance_scale` default
    # the pipeline's argument that `sample.guidance_scale` is, and whether it guides only with a negative prompt
    guidance_argument = "guidance_scale"
    guidance_needs_negative_prompt = False
    uses_time_ids = False  # SDXL's micro-conditioning: 6 numbers per image
    # FLUX.1: `sample.guidance_scale` is the value fed to the guidance embedding (in sampling and in training), and
    # classifier-free guidance with the negative prompt is `true_cfg_scale`, as in FluxPipeline
    embedded_guidance = False
    skip_layer_guidance = False  # SD3/SD3.5: the transformer can skip blocks (skip-layer guidance)
    default_sample_size = 64  # latent side when the denoiser's config has no sample_size
    # text tokens per prompt when unset (`model.max_sequence_length`; None: the family's length is fixed)
    default_max_sequence_length: int | None = None

    def __init__(
        self,
        scheduler_config: dict,
        denoiser_config: Any = None,
        *,
        max_sequence_length: int | None = None,
        pipeline_config: dict | None = None,
    ) -> None:
        self.scheduler_config = dict(scheduler_config)  # the model's own scheduler (sampling builds on it)
        self.denoiser_config = denoiser_config
        # model_index.json's settings beside the components (FLUX.2 klein's is_distilled)
        self.pipeline_config = dict(pipeline_config or {})
        # T5 tokens per prompt (SD3: 77, FLUX: 512 unless set); None without T5
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.process: ForwardProcess = self._make_process(self.scheduler_config)

    def _make_process(self, scheduler_config: dict) -> ForwardProcess:
        return DDPMProcess(scheduler_config)

    def latent_channels(self, denoiser_config: Any) -> int:
        """Latent channels the denoiser takes (FLUX's packed input has 4 per latent channel)."""
        return int(denoiser_config.in_channels)

    def unused_parameters(self, denoiser: Any) -> list[torch.nn.Parameter]:
        """Parameters that no output depends on (DDP refuses to train a module with them unless told to search for
        them at every step, so training freezes them; they would get no gradient anyway)."""
        return []

    def lora_target_modules(self, denoiser: Any) -> list[str]:
        """The module names LoRA adapts when ``model.lora_target_modules`` is not set: the attention projections,
        diffusers' LoRA scripts' default (every block of SD, SDXL, SD3, FLUX.1, Z-Image and Qwen-Image has them)."""
        return list(ATTENTION_LORA_TARGETS)

    def outputs_what_it_takes(self, denoiser_config: Any) -> bool:
        """Does the denoiser output as many channels as it takes (no learned variance)?"""
        out = getattr(denoiser_config, "out_channels", None) or denoiser_config.in_channels
        return int(out) == int(denoiser_config.in_channels)

    def sample_size(self, denoiser_config: Any) -> int:
        """The denoiser's native latent side: its config's ``sample_size``, else the pipeline's default."""
        size = getattr(denoiser_config, "sample_size", None)
        if size is None:
            return self.default_sample_size
        return int(size[0] if isinstance(size, list | tuple) else size)

    def set_timesteps(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> None:
        """The sampling schedule of ``num_steps`` steps for latents of ``latent_shape``, as the family's pipeline
        sets it."""
        scheduler.set_timesteps(num_steps)

    def cfg_scale(self, guidance_scale: float) -> float:
        """The scale s of classifier-free guidance ``uncond + s · (cond - uncond)`` that the pipeline's
        ``guidance_scale`` means (1 = no guidance)."""
        return guidance_scale

    def guide(self, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
        """The guided prediction from the unconditional and conditional ones, as the pipeline combines them."""
        return uncond + scale * (cond - uncond)

    # The VAE: how images become the denoiser's latents and back, and its geometry
    def vae_latents(self, c: Components, images: Tensor) -> Tensor:
        """Images [N, 3, H, W] in [-1, 1] (on the VAE's device and dtype) -> latents [N, C, h, w] as the denoiser sees
        them: the posterior mean, shifted and scaled (``(mean - shift_factor) · scaling_factor``)."""
        return (c.vae.encode(images).latent_dist.mean - c.shift_factor) * c.scaling_factor

    def vae_images(self, c: Components, latents: Tensor) -> Tensor:
        """The inverse of :meth:`vae_latents`: latents -> decoded images [N, 3, H, W], about [-1, 1]."""
        return c.vae.decode(latents / c.scaling_factor + c.shift_factor).sample

    def vae_latent_channels(self, vae: Any) -> int:
        return int(vae.config.latent_channels)

    def vae_scale_factor(self, vae: Any) -> int:
        """Pixels per latent cell along one side."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def check_guidance_scale(self, guidance_scale: float) -> None:
        """Refuse, in one line, a ``sample.guidance_scale`` the model cannot sample with (every value is fine here)."""

    def encode(self, c: Components, prompts: list[str], *, batch_size: int = 64) -> Cond:
        return Cond(encoding.encode_prompts(c, prompts, batch_size=batch_size))

    def pipeline(self, c: Components, denoiser: Any = None) -> Any:
        """The family's plain diffusers pipeline sharing ``c``'s modules; ``denoiser`` replaces ``c.denoiser``."""
        import diffusers

        return diffusers.StableDiffusionPipeline(
            vae=c.vae,
            text_encoder=c.text_encoder,
            tokenizer=c.tokenizer,
            unet=c.denoiser if denoiser is None else denoiser,
            scheduler=c.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def negative(self, c: Components, text: str) -> Cond:
        """The unconditional input of classifier-free guidance for the negative prompt ``text``, as the family's
        pipeline makes it."""
        return self.encode(c, [text])

    def predict(
        self,
        model: Any,
        x: Tensor,
        timestep: Tensor,
        cond: Cond,
        time_ids: Tensor | None = None,
        *,
        guidance: float | None = None,
        skip_layers: tuple[int, ...] | None = None,
    ) -> Tensor:
        """The denoiser's output at latents ``x [B, C, h, w]`` (same shape). ``time_ids``: SDXL's micro-conditioning
        ``[B, 6]``; ``guidance``: the value of a guidance-distilled model's guidance embedding (FLUX.1);
        ``skip_layers``: transformer blocks to skip (SD3's skip-layer guidance). Families without them ignore them."""
        inputs = self._inputs(x, timestep, cond, CallExtras(time_ids, guidance, skip_layers))
        return self._output(model(**inputs).sample, x)

    def _inputs(self, x: Tensor, timestep: Tensor, cond: Cond, extras: CallExtras) -> dict[str, Any]:
        """The denoiser's keyword inputs (UNet2DConditionModel's)."""
        return {"sample": x, "timestep": timestep, "encoder_hidden_states": cond.embeds}

    def _output(self, out: Tensor, x: Tensor) -> Tensor:
        """The network's output as latents shaped like ``x``."""
        return out

    def time_ids(self, n: int, resolution: int, device: Any = None) -> Tensor | None:
        """Micro-conditioning of ``n`` generated images at ``resolution`` (None for families without it)."""
        return None


@dataclass(frozen=True)
class CallExtras:
    """What some families' denoisers take besides latents, time and text (see :meth:`Family.predict`)."""

    time_ids: Tensor | None = None  # SDXL [B, 6]
    guidance: float | None = None  # FLUX.1's guidance embedding
    skip_layers: tuple[int, ...] | None = None  # SD3's skip-layer guidance


def _encode_with_pipeline(c: Components, prompts: list[str], batch_size: int, call) -> Cond:
    """Conditioning of ``prompts`` from the family pipeline's own ``encode_prompt`` (``call(pipe, chunk, device)`` ->
    its Cond), ``batch_size`` prompts at a time."""
    pipe = c.family.pipeline(c)
    device = next(c.text_encoder.parameters()).device
    parts = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            parts.append(call(pipe, list(prompts[i : i + batch_size]), device))
    if not parts:
        return Cond(torch.zeros(0, 0, 0), torch.zeros(0, 0))
    return Cond.cat(parts)


class SDXLFamily(Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    num_text_encoders = 2
    default_guidance_scale = 5.0
    uses_time_ids = True

    def pipeline(self, c: Components, denoiser: Any = None) -> Any:
        import diffusers

        return diffusers.StableDiffusionXLPipeline(
            vae=c.vae,
            text_encoder=c.text_encoder,
            text_encoder_2=c.text_encoder_2,
            tokenizer=c.tokenizer,
            tokenizer_2=c.tokenizer_2,
            unet=c.denoiser if denoiser is None else denoiser,
            scheduler=c.scheduler,
            force_zeros_for_empty_prompt=c.pipeline_config.get("force_zeros_for_empty_prompt", True),
        )

    def encode(self, c: Components, prompts: list[str], *, batch_size: int = 64) -> Cond:
        def call(pipe: Any, chunk: list[str], device: Any) -> Cond:
            embeds, _, pooled, _ = pipe.encode_prompt(chunk, device=device, do_classifier_free_guidance=False)
            return Cond(embeds, pooled)

        return _encode_with_pipeline(c, prompts, batch_size, call)

    def negative(self, c: Components, text: str) -> Cond:
        cond = self.encode(c, [text])
        force_zeros = bool(c.pipeline_config.get("force_zeros_for_empty_prompt", True))
        if text == "" and force_zeros:  # StableDiffusionXLPipeline's default: zeros, not the encoded ""
            return cond.map(torch.zeros_like)
        return cond

    def _inputs(self, x: Tensor, timestep: Tensor, cond: Cond, extras: CallExtras) -> dict[str, Any]:
        if extras.time_ids is None:
            raise ValueError("SDXL needs time_ids")
        added = {"text_embeds": cond.pooled, "time_ids": extras.time_ids.to(x.device, cond.pooled.dtype)}
        return {**super()._inputs(x, timestep, cond, extras), "added_cond_kwargs": added}

    def time_ids(self, n: int, resolution: int, device: Any = None) -> Tensor:
        """original size (h, w) + crop top-left (0, 0) + target size (h, w), as the pipeline's default."""
        row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
        return row.expand(n, 6).to(device)


class FlowFamily(Family):
    """What SD3, SD3.5 and FLUX.1 share: a rectified-flow forward process on the model's (shifted) schedule, a
    transformer called with ``hidden_states`` / ``encoder_hidden_states`` / ``pooled_projections``, prompts
    encoded by the pipeline's ``encode_prompt`` (CLIP pooled + T5 sequence), and a pipeline of ``transformer``,
    ``scheduler``, ``vae`` and ``num_text_encoders`` text encoders with their tokenizers. What differs stays in each
    family: the latent patch of a token, packing and position ids, the guidance embedding, the T5 length, the
    sampling schedule and the ``encode_prompt`` call."""

    default_sample_size = 128  # the pipelines' default (1024 px with the 8x VAE)
    num_text_encoders = 2

    def _make_process(self, scheduler_config: dict) -> ForwardProcess:
        return FlowProcess(scheduler_config, patch=self.token_patch())

    def token_patch(self) -> int:
        """Latent cells per token side (the transformer's patch embedding)."""
        return int(getattr(self.denoiser_config, "patch_size", 2) or 2)

    def set_timesteps(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> None:
        mu = self.process.mu(latent_shape)
        scheduler.set_timesteps(num_steps, **({} if mu is None else {"mu": mu}))

    def pipeline(self, c: Components, denoiser: Any = None) -> Any:
        import diffusers

        parts = {
            "transformer": c.denoiser if denoiser is None else denoiser,
            "scheduler": c.scheduler,
            "vae": c.vae,
            "text_encoder": c.text_encoder,
            "tokenizer": c.tokenizer,
        }
        for n in range(2, self.num_text_encoders + 1):
            parts |= {
                f"text_encoder_{n}": getattr(c, f"text_encoder_{n}"),
                f"tokenizer_{n}": getattr(c, f"tokenizer_{n}"),
            }
        return getattr(diffusers, self.pipeline_class)(**parts, **self.pipeline_settings())

    def pipeline_settings(self) -> dict[str, Any]:
        """The pipeline's own settings beside its parts (model_index.json's), that its export must keep."""
        return {}

    def encode(self, c: Components, prompts: list[str], *, batch_size: int = 64) -> Cond:
        return _encode_with_pipeline(c, prompts, batch_size, self._encode_prompt)

    def _encode_prompt(self, pipe: Any, chunk: list[str], device: Any) -> Cond:
        """The Cond of ``chunk`` from the pipeline's ``encode_prompt``."""
        raise NotImplementedError

    def _inputs(self, x: Tensor, timestep: Tensor, cond: Cond, extras: CallExtras) -> dict[str, Any]:
        return {
            "hidden_states": x,
            "timestep": torch.as_tensor(timestep, device=x.device).expand(x.shape[0]),
            "encoder_hidden_states": cond.embeds,
            "pooled_projections": cond.pooled,
        }


class SD3Family(FlowFamily):
    """SD3 and SD3.5 (StableDiffusion3Pipeline): the transformer's qk-norm and SD3.5-medium's dual attention
    layers are inside the model; dynamic shifting and skip-layer guidance are the pipeline's."""

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_class = "SD3Transformer2DModel"
    default_guidance_scale = 7.0
    skip_layer_guidance = True
    default_max_sequence_length = SD3_MAX_SEQUENCE_LENGTH
    num_text_encoders = 3  # CLIP-L, CLIP-G, T5

    def _encode_prompt(self, pipe: Any, chunk: list[str], device: Any) -> Cond:
        embeds, _, pooled, _ = pipe.encode_prompt(
            chunk,
            chunk,
            chunk,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Cond(embeds, pooled)

    def _inputs(self, x: Tensor, timestep: Tensor, cond: Cond, extras: CallExtras) -> dict[str, Any]:
        extra = {"skip_layers": list(extras.skip_layers)} if extras.skip_layers else {}
        return {**super()._inputs(x, timestep, cond, extras), **extra}


def pack_latents(x: Tensor) -> Tensor:
    """FLUX's 2×2 patch packing (``FluxPipeline._pack_latents``): [B, C, h, w] -> [B, h/2 · w/2, 4C]."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents`: [B, h/2 · w/2, 4C] -> [B, C, h, w]."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def latent_image_ids(h: int, w: int, device: Any, dtype: torch.dtype) -> Tensor:
    """The (0, row, column) position ids of FLUX's packed tokens (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFamily(FlowFamily):
    """FLUX.1 (FluxPipeline / FluxTransformer2DModel): CLIP-L pooled + T5 sequence conditioning, 2×2-packed latents
    with (0, row, column) position ids, the flow-matching target, a timestep in [0, 1] (the pipeline's σ·1000 /
    1000), and for guidance-distilled models (FLUX.1-dev) the guidance embedding. Latents are kept unpacked
    [B, C, h, w] everywhere (cache, noising, Euler steps: all elementwise, so packing commutes with them) and
    packed only around the transformer call."""

    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_class = "FluxTransformer2DModel"
    default_guidance_scale = 3.5
    embedded_guidance = True
    default_max_sequence_length = FLUX_MAX_SEQUENCE_LENGTH

    @property
    def guidance_embeds(self) -> bool:
        """A guidance-distilled model (FLUX.1-dev) takes the guidance value as an embedding."""
        return bool(getattr(self.denoiser_config, "guidance_embeds", False))

    def token_patch(self) -> int:
        return 2  # FluxPipeline's 2x2 packing (the transformer's own patch_size is 1)

    def latent_channels(self, denoiser_config: Any) -> int:
        return int(denoiser_config.in_channels) // 4

    def set_timesteps(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> None:
        """FluxPipeline's schedule: σ = linspace(1, 1/n, n) shifted at μ of the image's token count."""
        import numpy as np

        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=self.process.mu(latent_shape))

    def _encode_prompt(self, pipe: Any, chunk: list[str], device: Any) -> Cond:
        embeds, pooled, _ = pipe.encode_prompt(
            chunk, chunk, device=device, max_sequence_length=self.max_sequence_length
        )
        return Cond(embeds, pooled)

    def _inputs(self, x: Tensor, timestep: Tensor, cond: Cond, extras: CallExtras) -> dict[str, Any]:
        b, _, h, w = x.shape
        embedded = None
        if self.guidance_embeds:
            if extras.guidance is None:
                raise ValueError("a guidance-distilled FLUX model needs the guidance value")
            embedded = torch.full((b,), float(extras.guidance), device=x.device, dtype=torch.float32)
        return {
            "hidden_states": pack_latents(x),
            "timestep": torch.as_tensor(timestep, device=x.device).expand(b).to(x.dtype) / 1000,
            "guidance": embedded,
            "pooled_projections": cond.pooled,
            "encoder_hidden_states": cond.embeds,
            "txt_ids": torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=x.dtype),
            "img_ids": latent_image_ids(h, w, x.device, x.dtype),
        }

    def _output(self, out: Tensor, x: Tensor) -> Tensor:
        return unpack_latents(out, x.shape[-2], x.shape[-1])


class ZImageFamily(FlowFamily):
    """Z-Image (ZImagePipeline / ZImageTransformer2DModel): one Qwen3 text encoder whose second-to-last hidden
    state, over the prompt's own tokens only (its chat template applied), is the conditioning: prompts keep their
    lengths, so a Cond carries the token mask and the transformer gets a list of ``[L_i, D]`` features. The
    transformer takes a list of ``[C, 1, h, w]`` latents and the time 1 - σ, and predicts x₀ - ε, the negated
    velocity (the pipeline negates it before its Euler step). ``guidance_scale`` g guides as ``cond + g (cond -
    uncond)``, classifier-free guidance of scale 1 + g, off at g = 0 (Z-Image-Turbo). Sampling σ = linspace(1, 1/n,
    n) on the scheduler's shift. Latents are FLUX.1's VAE's (shift and scale factors)."""

    name = "zimage"
    pipeline_class = "ZImagePipeline"
    denoiser_class = "ZImageTransformer2DModel"
    num_text_encoders = 1
    default_guidance_scale = 5.0
    default_max_sequence_length = 512  # ZImagePipeline's default

    def token_patch(self) -> int:
        return int(self.denoiser_config.all_patch_size[0])

    def set_timesteps(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> None:
        sigmas = torch.linspace(1.0, 1 / num_steps, num_steps).tolist()  # get_default_z_image_sigmas
        scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=self.process.mu(latent_shape))

    def cfg_scale(self, guidance_scale: float) -> float:
        return 1.0 + guidance_scale

    def _encode_prompt(self, pipe: Any, chunk: list[str], device: Any) -> Cond:
        tokens, _ = pipe.encode_prompt(
            chunk, device=device, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length
        )
        return Cond.padded(tokens, self.max_sequence_length)

    def _inputs(self, x: Tensor, timestep: Tensor, cond: Cond, extras: CallExtras) -> dict[str, Any]:
        t = torch.as_tensor(timestep, device=x.device).expand(x.shape[0])
        return {
            "x": list(x.unsqueeze(2).unbind(0)),
            "t": (1000 - t.float()) / 1000,
            "cap_feats": cond.tokens(),
        }

    def _output(self, out: Any, x: Tensor) -> Tensor:
        return -torch.stack(out).squeeze(2)


class UniformFlowProcess(FlowProcess):
    """Rectified flow with σ drawn uniformly from the scheduler's unshifted σ (1 … 1/T), loss weight 1: what
    diffusers' FLUX.2 [klein] training script does by default (``train_dreambooth_lora_flux2_klein.py``:
    ``weighting_scheme="none"`` draws u ~ U(0, 1) and takes ``scheduler.sigmas[⌊u·T⌋]`` of a scheduler with
    ``use_dynamic_shifting``, so no shift). FLUX.2's sampling shift μ (``compute_empirical_mu``) depends on the
    number of steps as well as on the image size, so there is no one shifted schedule to draw training σ from."""

    def training_sigmas(self, latent_shape: tuple[int, ...] | torch.Size | None) -> Tensor:
        return self.sigmas

    def draw_times(
        self, generator: torch.Generator, k: int, latent_shape: tuple[int, ...] | torch.Size | None = None
    ) -> Tensor:
        """k training σ: index = ⌊U(0, 1)·T⌋ into the unshifted schedule. -> [k] float"""
        idx = (torch.rand(k, generator=generator) * self.num_train_timesteps).long()
        return self.sigmas[idx.clamp(max=self.num_train_timesteps - 1)]


class Flux2KleinFamily(FlowFamily):
    """FLUX.2 [klein] (Flux2KleinPipeline / Flux2Transformer2DModel): one Qwen3 text encoder whose hidden states of
    layers 9, 18 and 27 (the pipeline's default ``text_encoder_out_layers``), stacked per token, over the chat
    template of each prompt padded to ``max_sequence_length`` tokens, are the conditioning (no mask: the transformer
    attends to the padding, as in the pipeline). Position ids are 4-D (t, h, w, l).

    Latents: the pipeline patchifies the VAE's 32-channel latents 2×2 (128 channels at half the side) and normalises
    them with the VAE's BatchNorm running mean and variance; its noise, Euler steps and transformer all work in that
    space. So this family's latents *are* those (``Components.latent_channels`` is 4× the VAE's and
    ``vae_scale_factor`` 2× the VAE's), made by :meth:`vae_latents` / undone by :meth:`vae_images`; cache, noising,
    sampling and spin_exact all see the pipeline's own space. A token is one latent cell.

    Sampling: σ = linspace(1, 1/n, n) shifted at ``compute_empirical_mu(tokens, n)``. Guidance: base klein does
    classifier-free guidance with the empty prompt at scale ``guidance_scale`` when it is > 1; a step-distilled
    klein (model_index.json ``is_distilled``) never does. The negative prompt is always empty, as in the pipeline.
    Training σ: :class:`UniformFlowProcess`."""

    name = "flux2"
    pipeline_class = "Flux2KleinPipeline"
    denoiser_class = "Flux2Transformer2DModel"
    num_text_encoders = 1
    default_guidance_scale = 4.0  # Flux2KleinPipeline's default
    default_max_sequence_length = 512  # Flux2KleinPipeline's default
    default_sample_size = 64  # the pipeline's 1024 px: 128 VAE cells, 64 after the 2x2 patchify

    def lora_target_modules(self, denoiser: Any) -> list[str]:
        """The attention projections and, as diffusers' klein LoRA script (train_dreambooth_lora_flux2_klein.py), the
        single blocks' fused q/k/v + MLP input and their output: the single blocks (20 of klein 4B's 25) have no
        ``to_q``, so the four attention names alone would leave them untrained."""
        singles = (
            f"single_transformer_blocks.{i}.attn.to_out" for i in range(len(denoiser.single_transformer_blocks))
        )
        return [*ATTENTION_LORA_TARGETS, "to_qkv_mlp_proj", *singles]

    def _make_process(self, scheduler_config: dict) -> ForwardProcess:
        return UniformFlowProcess(scheduler_config, patch=1)

    def token_patch(self) -> int:
        return 1

    @property
    def is_distilled(self) -> bool:
        """A step-distilled klein model samples without classifier-free guidance (model_index.json's flag)."""
        return bool(self.pipeline_config.get("is_distilled", False))

    def set_timesteps(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> None:
        """Flux2KleinPipeline's schedule: σ = linspace(1, 1/n, n) at μ = compute_empirical_mu(h·w, n)."""
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        mu = compute_empirical_mu(int(latent_shape[-2]) * int(latent_shape[-1]), num_steps)
        if scheduler.config.get("use_flow_sigmas"):
            scheduler.set_timesteps(num_steps, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)

    def cfg_scale(self, guidance_scale: float) -> float:
        """``guidance_scale`` when the pipeline guides (> 1, not distilled), else 1 (no guidance)."""
        return 1.0 if self.is_distilled or guidance_scale <= 1 else guidance_scale

    def check_guidance_scale(self, guidance_scale: float) -> None:
        """A step-distilled klein has no classifier-free guidance: its pipeline ignores guidance_scale > 1 (with a
        warning), so a run that sets it would not get what it asked for."""
        if self.is_distilled and guidance_scale > 1:
            raise SpinDiffusionError(
                f"sample.guidance_scale={guidance_scale}: a step-distilled FLUX.2 klein model (is_distilled) samples "
                "without classifier-free guidance; set sample.guidance_scale=1"
            )

    def pipeline_settings(self) -> dict[str, Any]:
        return {"is_distilled": self.is_distilled}

    def _encode_prompt(self, pipe: Any, chunk: list[str], device: Any) -> Cond:
        embeds, _ = pipe.encode_prompt(chunk, device=device, max_sequence_length=self.max_sequence_length)
        return Cond(embeds)

    def negative(self, c: Components, text: str) -> Cond:
        if text:
            raise SpinDiffusionError(
                f"sample.negative_prompt={text!r}: Flux2KleinPipeline always guides with the empty prompt; "
                "leave sample.negative_prompt empty for a FLUX.2 klein model"
            )
        return self.encode(c, [""])

    @staticmethod
    def _bn(c: Components, like: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE BatchNorm's running mean and std (√(var + eps)) as [1, 4C, 1, 1], as the pipeline reads them."""
        bn = c.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + c.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def vae_latents(self, c: Components, images: Tensor) -> Tensor:
        """Flux2KleinPipeline._encode_vae_image's: the posterior mean, patchified 2×2, then (x - BN mean) / BN std."""
        from diffusers import Flux2KleinPipeline

        x = Flux2KleinPipeline._patchify_latents(c.vae.encode(images).latent_dist.mean)
        bn_mean, bn_std = self._bn(c, x)
        return (x - bn_mean) / bn_std

    def vae_images(self, c: Components, latents: Tensor) -> Tensor:
        """The pipeline's decode step: x · BN std + BN mean, unpatchified, decoded."""
        from diffusers import Flux2KleinPipeline

        bn_mean, bn_std = self._bn(c, latents)
        return c.vae.decode(Flux2KleinPipeline._unpatchify_latents(latents * bn_std + bn_mean)).sample

    def vae_latent_channels(self, vae: Any) -> int:
        return 4 * int(vae.config.latent_channels)  # 2x2-patchified

    def vae_scale_factor(self, vae: Any) -> int:
        return 2 * super().vae_scale_factor(vae)

    def _inputs(self, x: Tensor, timestep: Tensor, cond: Cond, extras: CallExtras) -> dict[str, Any]:
        from diffusers import Flux2KleinPipeline

        b = x.shape[0]
        return {
            "hidden_states": Flux2KleinPipeline._pack_latents(x),  # [B, h·w, C], row-major tokens
            "timestep": torch.as_tensor(timestep, device=x.device).expand(b).to(x.dtype) / 1000,
            "guidance": None,
            "encoder_hidden_states": cond.embeds,
            "txt_ids": Flux2KleinPipeline._prepare_text_ids(cond.embeds).to(x.device),
            "img_ids": Flux2KleinPipeline._prepare_latent_ids(x).to(x.device),
        }

    def _output(self, out: Tensor, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return out[:, : h * w].permute(0, 2, 1).reshape(b, c, h, w)


class QwenImageFamily(FluxFamily):
    """Qwen-Image (QwenImagePipeline / QwenImageTransformer2DModel): FLUX.1's 2×2 packing, σ = linspace(1, 1/n, n)
    shifted at the image's μ and timestep σ, without a guidance embedding; the conditioning is Qwen2.5-VL's last
    hidden state over each prompt's own tokens after the pipeline's system template (a masked Cond, passed with
    ``encoder_hidden_states_mask``). ``guidance_scale`` is the pipeline's ``true_cfg_scale`` w with the negative
    prompt: ``uncond + w (cond - uncond)`` rescaled per image token to the conditional prediction's norm. The VAE is
    Qwen-Image's own (a causal video VAE seen one frame at a time): latents are its posterior mean normalised per
    channel, ``(mean - latents_mean) / latents_std``."""

    name = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    denoiser_class = "QwenImageTransformer2DModel"
    num_text_encoders = 1
    embedded_guidance = False
    default_guidance_scale = 4.0  # QwenImagePipeline's true_cfg_scale
    guidance_argument = "true_cfg_scale"
    guidance_needs_negative_prompt = True
    default_max_sequence_length = 1024  # QwenImagePipeline's (and its maximum)

    def unused_parameters(self, denoiser: Any) -> list[torch.nn.Parameter]:
        """The last block's text-stream output (its attention's ``to_add_out`` and ``txt_mlp``): the transformer
        drops the text tokens after that block."""
        last = denoiser.transformer_blocks[-1]
        return [*last.attn.to_add_out.parameters(), *last.txt_mlp.parameters()]

    def outputs_what_it_takes(self, denoiser_config: Any) -> bool:
        # out_channels counts latent channels, in_channels packed ones (4 per latent channel)
        return 4 * int(denoiser_config.out_channels or denoiser_config.in_channels // 4) == denoiser_config.in_channels

    def _encode_prompt(self, pipe: Any, chunk: list[str], device: Any) -> Cond:
        embeds, mask = pipe.encode_prompt(chunk, device=device, max_sequence_length=self.max_sequence_length)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return Cond.padded([e[m.bool()] for e, m in zip(embeds, mask, strict=True)], self.max_sequence_length)

    def guide(self, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
        """QwenImagePipeline's true CFG: the combination, times ‖cond‖ / ‖combination‖ over each packed token's
        channels."""
        combined = uncond + scale * (cond - uncond)
        cond_norm = torch.linalg.vector_norm(pack_latents(cond), dim=-1, keepdim=True)
        combined_norm = torch.linalg.vector_norm(pack_latents(combined), dim=-1, keepdim=True)
        return unpack_latents(pack_latents(combined) * (cond_norm / combined_norm), *cond.shape[-2:])

    def _inputs(self, x: Tensor, timestep: Tensor, cond: Cond, extras: CallExtras) -> dict[str, Any]:
        b, _, h, w = x.shape
        return {
            "hidden_states": pack_latents(x),
            "timestep": torch.as_tensor(timestep, device=x.device).expand(b).to(x.dtype) / 1000,
            "encoder_hidden_states": cond.embeds,
            "encoder_hidden_states_mask": cond.mask,
            "img_shapes": [[(1, h // 2, w // 2)]] * b,
        }

    def _moments(self, c: Components, like: Tensor) -> tuple[Tensor, Tensor]:
        z = c.vae.config.z_dim
        mean = torch.tensor(c.vae.config.latents_mean).view(1, z, 1, 1).to(like)
        std = torch.tensor(c.vae.config.latents_std).view(1, z, 1, 1).to(like)
        return mean, std

    def vae_latents(self, c: Components, images: Tensor) -> Tensor:
        posterior = c.vae.encode(images.unsqueeze(2)).latent_dist.mean[:, :, 0]
        mean, std = self._moments(c, posterior)
        return (posterior - mean) / std

    def vae_images(self, c: Components, latents: Tensor) -> Tensor:
        mean, std = self._moments(c, latents)
        return c.vae.decode((latents * std + mean).unsqueeze(2)).sample[:, :, 0]

    def vae_latent_channels(self, vae: Any) -> int:
        return int(vae.config.z_dim)

    def vae_scale_factor(self, vae: Any) -> int:
        return 2 ** len(vae.config.temperal_downsample)


_BY_NAME = {
    f.name: f for f in (Family, SDXLFamily, SD3Family, FluxFamily, ZImageFamily, QwenImageFamily, Flux2KleinFamily)
}
FAMILIES = tuple(_BY_NAME)
PIPELINE_CLASSES = {name: f.pipeline_class for name, f in _BY_NAME.items()}


def check_supported(pipeline_class: str) -> None:
    """Refuse, in one line and before anything is loaded, a pipeline of a model no family trains: FLUX.2 [dev]
    (Flux2Pipeline: a Mistral text encoder and a guidance-distilled transformer; only FLUX.2 klein is a family)."""
    if pipeline_class == "Flux2Pipeline":
        raise SpinDiffusionError(
            "a Flux2Pipeline (FLUX.2 [dev]) is not supported: of FLUX.2 only the klein models (Flux2KleinPipeline) are"
        )


def family_name(pipeline_class: str, denoiser: Any) -> str:
    """The family of a pipeline class name or, for a pipeline class no family names (a custom one), of its denoiser's
    class (``Family.denoiser_class``; SD and SDXL share the UNet class, and SDXL's has the text-time embedding)."""
    check_supported(pipeline_class)
    for name, cls in PIPELINE_CLASSES.items():
        if pipeline_class == cls:
            return name
    kind = type(denoiser).__name__
    if kind == Flux2KleinFamily.denoiser_class:
        raise SpinDiffusionError(
            f"a {pipeline_class} with a {kind} is not supported: of FLUX.2 only the klein models "
            "(Flux2KleinPipeline) are"
        )
    names = [name for name, f in _BY_NAME.items() if f.denoiser_class == kind]
    if not names:
        known = ", ".join(dict.fromkeys(f.denoiser_class for f in _BY_NAME.values()))
        raise SpinDiffusionError(
            f"a {pipeline_class} with a {kind} is not a model family spin-diffusion trains (its denoisers: {known})"
        )
    if len(names) > 1:  # the UNet of SD-1.x/2.x or SDXL
        return (
            "sdxl" if getattr(getattr(denoiser, "config", None), "addition_embed_type", None) == "text_time" else "sd"
        )
    return names[0]


def make(name: str, scheduler_config: dict, denoiser_config: Any = None, **options: Any) -> Family:
    """The family ``name`` on the model's noise schedule; ``denoiser_config`` gives what the family reads of the
    network (SD3's patch size, FLUX's guidance embedding); ``options``: the text length ``max_sequence_length`` and
    ``pipeline_config`` (model_index.json's settings: FLUX.2 klein's ``is_distilled``)."""
    if name not in _BY_NAME:
        raise SpinDiffusionError(f"unknown model family {name!r} (one of {', '.join(FAMILIES)})")
    return _BY_NAME[name](dict(scheduler_config), denoiser_config, **options)
