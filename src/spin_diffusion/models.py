"""Model components: load a diffusers pipeline (a folder or a Hub id), build tiny presets, LoRA helpers, export.

A Hub id is resolved to its cached snapshot by spin_diffusion.hub (as diffusers does); the folder is then read
with ``local_files_only=True``. The presets are built from configs with the tokenizer shipped in
``spin_diffusion/assets/tokenizer``.

Only the UNet ever trains. The text encoder and the VAE come back frozen (``eval()``,
``requires_grad_(False)``). The UNet comes back in ``eval()`` mode with ``requires_grad`` on; the
trainer calls ``.train()`` itself.

Latent convention (the same as ``StableDiffusionPipeline``): the UNet sees
``vae.encode(x).latent_dist.mean * scaling_factor``. We use the posterior *mean*, not a sample, so
that cached latents are deterministic. Without a VAE the model is pixel space and the "latents"
are the images themselves, in [-1, 1].
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from spin_diffusion import families, hub
from spin_diffusion.card import CardInfo, render_card
from spin_diffusion.errors import SpinDiffusionError

__all__ = [
    "Components",
    "PRESETS",
    "TOKENIZER_DIR",
    "adapters_disabled",
    "add_lora",
    "build_preset",
    "decode_latents",
    "encode_images",
    "encode",
    "encode_prompts",
    "frozen_copy",
    "load_components",
    "lora_state_dict",
    "merge_lora",
    "pipeline",
    "save_lora",
    "save_pipeline",
]

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"  # vocab.json + merges.txt (make_tokenizer.py)
PRESETS = ("tiny", "demo", "tiny-sdxl", "tiny-sd3")


@dataclass
class Components:
    """The pieces of a text-to-image latent diffusion model that spin_diffusion uses.

    ``scheduler`` is the inference scheduler as saved in the folder (used for sampling and written
    back by :func:`save_pipeline`); :meth:`noise_scheduler` gives the training forward process.
    """

    unet: Any  # diffusers.UNet2DConditionModel
    text_encoder: torch.nn.Module  # CLIPTextModel (or any encoder whose output has last_hidden_state)
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    scheduler: Any  # diffusers SchedulerMixin
    vae: Any | None  # diffusers.AutoencoderKL; None = pixel-space model (latents are images in [-1, 1])
    pipeline_class: str = "StableDiffusionPipeline"  # `_class_name` of model_index.json
    source: Path | None = None  # folder it was loaded from; None for presets
    # SDXL: CLIP-G (with projection); SD3: CLIP-G and T5 (text_encoder_3). None for SD-1.x/2.x.
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: Any = None
    pipeline_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra model_index.json entries

    @functools.cached_property
    def family(self) -> families.Family:
        """How this model is conditioned, noised and called (``families``): sd, sdxl or sd3."""
        return families.make(families.family_name(self.pipeline_class, self.unet), self.scheduler.config)

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: ``"epsilon"``, ``"v_prediction"`` or ``"flow"`` (velocity ε - x₀)."""
        return self.family.process.prediction_type

    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders this model has (one for SD, two for SDXL, three for SD3)."""
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]

    @property
    def shift_factor(self) -> float:
        """Subtracted from the VAE posterior mean before scaling (SD3's VAE: ``shift_factor``); 0 elsewhere."""
        value = getattr(self.vae.config, "shift_factor", None) if self.vae is not None else None
        return 0.0 if value is None else float(value)

    @property
    def latent_channels(self) -> int:
        """Channels of the UNet's input latents (the VAE's latent channels; image channels without a VAE)."""
        if self.vae is not None:
            return int(self.vae.config.latent_channels)
        return int(self.unet.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side: ``2 ** (len(vae.block_out_channels) - 1)``; 1 without a VAE."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        """Multiplier from VAE posterior mean to UNet latents (``vae.config.scaling_factor``); 1.0 without a VAE."""
        if self.vae is None:
            return 1.0
        value = getattr(self.vae.config, "scaling_factor", None)
        return 1.0 if value is None else float(value)

    @property
    def sample_size(self) -> int:
        """Native latent side length (``unet.config.sample_size``)."""
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def resolution(self) -> int:
        """Native image side length in pixels: ``sample_size * vae_scale_factor``."""
        return self.sample_size * self.vae_scale_factor

    def noise_scheduler(self) -> Any:
        """A fresh ``DDPMScheduler`` with this model's betas and prediction type (DDPM families only; the forward
        process of any family is ``family.process``)."""
        from diffusers import DDPMScheduler

        if self.family.process.kind != "ddpm":
            raise SpinDiffusionError(f"a {self.family.name} model has no DDPM noise schedule")
        return DDPMScheduler.from_config(self.scheduler.config)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    msg = lines[0] if lines else type(exc).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SpinDiffusionError(f"cannot read {path}: {_first_line(e)}") from e
    if not isinstance(data, dict):
        raise SpinDiffusionError(f"cannot read {path}: expected a JSON object")
    return data


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def _check_compatible(c: Components) -> None:
    """Raise SpinDiffusionError when the components cannot form a plain text-to-image model of their family."""
    where = f" in {c.source}" if c.source is not None else ""
    cfg = c.unet.config
    family = c.family.name  # raises for unsupported prediction types
    if cfg.in_channels != c.latent_channels:
        raise SpinDiffusionError(
            f"the denoiser{where} takes {cfg.in_channels} input channels but latents have {c.latent_channels} "
            "(inpainting/depth models are not supported; use a text-to-image model)"
        )
    if cfg.out_channels != cfg.in_channels:
        raise SpinDiffusionError(
            f"the denoiser{where} outputs {cfg.out_channels} channels for {cfg.in_channels} input channels "
            "(learned-variance models are not supported; use an epsilon/v-prediction or flow-matching model)"
        )
    needs = {"sd": 1, "sdxl": 2, "sd3": 3}[family]
    if len(c.text_encoders()) < needs or (family == "sd3" and c.text_encoder_2 is None):
        raise SpinDiffusionError(
            f"a {c.pipeline_class}{where} needs {needs} text encoder(s), found {len(c.text_encoders())}"
        )
    if family == "sd":
        hidden = getattr(getattr(c.text_encoder, "config", None), "hidden_size", None)
        if isinstance(cfg.cross_attention_dim, int) and hidden is not None and hidden != cfg.cross_attention_dim:
            raise SpinDiffusionError(
                f"the text encoder{where} gives {hidden}-dim embeddings but the UNet expects "
                f"cross_attention_dim={cfg.cross_attention_dim}"
            )
    if family == "sdxl":
        hidden = c.text_encoder.config.hidden_size + c.text_encoder_2.config.hidden_size
        if cfg.cross_attention_dim != hidden:
            raise SpinDiffusionError(
                f"the two text encoders{where} give {hidden}-dim embeddings together but the UNet expects "
                f"cross_attention_dim={cfg.cross_attention_dim}"
            )


def load_components(
    path: str | Path, *, dtype: torch.dtype = torch.float32, revision: str | None = None, variant: str | None = None
) -> Components:
    """Load a diffusers pipeline (``model_index.json`` + ``unet/``, ``text_encoder/``, ...) from a local folder or a
    Hub id (``revision``: branch, tag or commit; ``variant``: e.g. ``fp16`` weight files), as
    ``DiffusionPipeline.from_pretrained`` resolves them (spin_diffusion.hub).

    ``vae/`` is optional: without it the model is pixel space. Raises SpinDiffusionError (one line) when the model
    cannot be found, is not a diffusers pipeline, or a component cannot be read.
    """
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = hub.resolve_pipeline(path, revision=revision, variant=variant)
    if not (root / "model_index.json").is_file() or not ((root / "unet").is_dir() or (root / "transformer").is_dir()):
        raise SpinDiffusionError(
            f"{path} is not a diffusers pipeline (it needs model_index.json and unet/ or transformer/; "
            "save one with DiffusionPipeline.save_pretrained)"
        )
    index = _read_json(root / "model_index.json")
    pipeline_class = str(index.get("_class_name") or "StableDiffusionPipeline")

    def entry_class(name: str) -> str | None:
        value = index.get(name)
        if isinstance(value, list | tuple) and len(value) == 2 and value[1]:
            return str(value[1])
        return None

    def load(name: str, fn):
        folder = root / name
        if not folder.is_dir():
            raise SpinDiffusionError(f"cannot load {name}: folder {folder} is missing")
        try:
            return fn(folder)
        except SpinDiffusionError:
            raise
        except Exception as e:  # any loader failure becomes one user-facing line
            raise SpinDiffusionError(f"cannot load {name} from {folder}: {_first_line(e)}") from e

    denoiser_name = "transformer" if (root / "transformer").is_dir() and not (root / "unet").is_dir() else "unet"

    def load_denoiser(folder: Path) -> Any:
        cls = getattr(diffusers, entry_class(denoiser_name) or "", None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            cls = UNet2DConditionModel
        return cls.from_pretrained(folder, local_files_only=True, torch_dtype=dtype, variant=variant)

    unet = load(denoiser_name, load_denoiser)

    def load_text_encoder(name: str):
        def fn(folder: Path) -> torch.nn.Module:
            cls = getattr(transformers, entry_class(name) or "", None) or transformers.AutoModel
            return cls.from_pretrained(folder, local_files_only=True, variant=variant).to(dtype)

        return fn

    def load_tokenizer(name: str):
        def fn(folder: Path) -> Any:
            cls = getattr(transformers, entry_class(name) or "", None)
            if cls is None or not hasattr(cls, "from_pretrained"):
                cls = transformers.AutoTokenizer
            return cls.from_pretrained(folder, local_files_only=True)

        return fn

    def load_scheduler(folder: Path) -> Any:
        config = _read_json(folder / "scheduler_config.json")
        name = config.get("_class_name") or entry_class("scheduler")
        cls = getattr(diffusers, str(name), None)
        if cls is None or not hasattr(cls, "from_config"):
            raise SpinDiffusionError(f"cannot load scheduler from {folder}: unknown scheduler class {name!r}")
        return cls.from_config(config)

    def optional(name: str, fn) -> Any:
        """Components 2 and 3 (SDXL, SD3): loaded when model_index.json names them."""
        if entry_class(name) is None:
            return None
        return load(name, fn)

    text_encoder = _freeze(load("text_encoder", load_text_encoder("text_encoder")))
    tokenizer = load("tokenizer", load_tokenizer("tokenizer"))
    scheduler = load("scheduler", load_scheduler)
    extra = {}
    for n in ("2", "3"):
        encoder = optional(f"text_encoder_{n}", load_text_encoder(f"text_encoder_{n}"))
        extra[f"text_encoder_{n}"] = _freeze(encoder) if encoder is not None else None
        extra[f"tokenizer_{n}"] = optional(f"tokenizer_{n}", load_tokenizer(f"tokenizer_{n}"))
    vae = None
    if (root / "vae").is_dir() and index.get("vae", ["", ""]) != [None, None]:
        # An fp16 VAE that asks for it (force_upcast, SDXL's default) runs in fp32, as the diffusers pipelines decode
        # and its training scripts encode ("to avoid NaN"); the fp16-fix VAE sets force_upcast=False.
        vae_dtype = dtype
        if dtype == torch.float16 and _read_json(root / "vae" / "config.json").get("force_upcast", True):
            vae_dtype = torch.float32
        vae = _freeze(
            load(
                "vae",
                lambda f: AutoencoderKL.from_pretrained(
                    f, local_files_only=True, torch_dtype=vae_dtype, variant=variant
                ),
            )
        )
    unet.eval()
    settings = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list | tuple)}
    c = Components(
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        vae,
        pipeline_class=pipeline_class,
        source=root,
        pipeline_config=settings,
        **extra,
    )
    _check_compatible(c)
    return c


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------

# UNet / text encoder / VAE sizes. "tiny" copies diffusers' get_dummy_components sizes (tests);
# "demo" is the CPU demo world: 32x32 RGB images, 16x16x4 latents, ~1 M-parameter UNet.
_PRESET_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": dict(
            sample_size=8,
            block_out_channels=(4, 8),
            layers_per_block=1,
            norm_num_groups=2,
            cross_attention_dim=8,
            attention_head_dim=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        "text": dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2),
        "vae": dict(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2),
        "scheduler": dict(beta_schedule="scaled_linear"),
    },
    "demo": {
        # Three levels (16, 8, 4): the 4x4 level sees the latent's borders everywhere, which is where a conv
        # UNet gets its sense of position from; with two levels "on the left" stayed at chance after 500 steps.
        "unet": dict(
            sample_size=16,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            norm_num_groups=32,
            cross_attention_dim=32,
            attention_head_dim=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        # (8, 16) without mid-block attention: fits the shapes world in ~200 steps (reconstructions are judged
        # 100 % correct) at about half the cost per step of (16, 32).
        "vae": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False),
        "scheduler": dict(beta_schedule="scaled_linear"),
    },
}


def _load_shipped_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    # Positional paths: the parameter names differ between transformers 4 (vocab_file) and 5 (vocab).
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=16)


DEMO_VAE_DIR = Path(__file__).parent / "assets" / "demo_vae"  # made by scripts/train_demo_vae.py


def build_preset(
    name: Literal["tiny", "demo", "tiny-sdxl", "tiny-sd3"], *, seed: int = 0, pretrained_vae: bool = True
) -> Components:
    """Build a randomly initialised built-in model from configs (no download, no files).

    - ``"tiny-sdxl"``, ``"tiny-sd3"``: for tests, the SDXL and SD3 families at the ``"tiny"`` sizes
      (:func:`_build_family_preset`).

    - ``"tiny"``: for tests. UNet (4, 8) channels, 8x8x4 latents, 16x16 images, 8-dim text encoder.
    - ``"demo"``: the CPU demo world. UNet (32, 64, 64) channels, ~1.7 M parameters, 16x16x4 latents,
      32x32 images; CLIP text encoder with 32-dim hidden states, 2 layers; VAE (8, 16) channels.

    Both use the shipped 16-token CLIP BPE tokenizer and a DDIM scheduler (SD-1.x betas:
    ``scaled_linear`` 0.00085..0.012 over 1000 steps, epsilon prediction, ``steps_offset=1``). The
    ``"demo"`` VAE is the shipped one, fitted to the shapes world with a calibrated ``scaling_factor``
    (``pretrained_vae=False`` gives a random one, as ``"tiny"`` always has, with ``scaling_factor=1.0``).

    The same ``seed`` gives bit-identical weights. The global torch RNG is left untouched.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if name in ("tiny-sdxl", "tiny-sd3"):
        return _build_family_preset(name, seed)
    if name not in _PRESET_CONFIGS:
        raise SpinDiffusionError(f"unknown model preset {name!r} (choose one of: {', '.join(PRESETS)})")
    cfg = _PRESET_CONFIGS[name]
    tokenizer = _load_shipped_tokenizer()
    latent_channels = 4
    vae_factor = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            in_channels=latent_channels,
            out_channels=latent_channels,
            **cfg["unet"],
        )
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **cfg["text"],
        )
        text_encoder = CLIPTextModel(text_config)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(cfg["vae"]["block_out_channels"]),
            up_block_types=("UpDecoderBlock2D",) * len(cfg["vae"]["block_out_channels"]),
            latent_channels=latent_channels,
            sample_size=cfg["unet"]["sample_size"] * vae_factor,
            scaling_factor=1.0,
            **cfg["vae"],
        )
    if name == "demo" and pretrained_vae and (DEMO_VAE_DIR / "config.json").exists():
        # The demo world's VAE is shipped, trained and checked (scripts/train_demo_vae.py); the UNet is random.
        vae = AutoencoderKL.from_pretrained(DEMO_VAE_DIR, local_files_only=True)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="epsilon",
        **cfg["scheduler"],
    )
    unet.eval()
    c = Components(unet, _freeze(text_encoder), tokenizer, scheduler, _freeze(vae), "StableDiffusionPipeline", None)
    _check_compatible(c)
    return c


def _tiny_t5_tokenizer() -> Any:
    """A T5 tokenizer built offline (a Unigram model over letters and a few word pieces), for ``tiny-sd3``."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + list(string.ascii_lowercase + string.digits + ",.-'")
    pieces += ["\u2581" + ch for ch in string.ascii_lowercase]
    vocab = [(p, 0.0 if i < 3 else -float(len(p) == 1)) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0, model_max_length=77
    )


def _build_family_preset(name: str, seed: int) -> Components:
    """``tiny-sdxl``: UNet (4, 8) with SDXL's text-time embedding (pooled 8 + 6 time ids x 4), CLIP (8-dim) +
    CLIP with projection (8-dim, pooled 8), concatenated cross-attention 16, SDXL's Euler scheduler config.
    ``tiny-sd3``: SD3Transformer2DModel (2 layers, patch 2), CLIP-L + CLIP-G with projections (pooled 8 + 8),
    a T5 encoder (32-dim) with an offline tokenizer, FlowMatchEulerDiscreteScheduler (shift 3, as SD3), a VAE with
    SD3's scaling and shift factors. Both: 8x8x4 latents, 16x16 images; same seed, same weights."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer = _load_shipped_tokenizer()
    tiny = _PRESET_CONFIGS["tiny"]

    def clip_config(projection: int = 8) -> Any:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=projection,
            **tiny["text"],
        )

    extra: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "tiny-sdxl":
            unet = UNet2DConditionModel(
                in_channels=4,
                out_channels=4,
                **{**tiny["unet"], "cross_attention_dim": 16},
                addition_embed_type="text_time",
                addition_time_embed_dim=4,
                projection_class_embeddings_input_dim=8 + 6 * 4,
            )
            text_encoder = CLIPTextModel(clip_config())
            extra = dict(text_encoder_2=_freeze(CLIPTextModelWithProjection(clip_config())), tokenizer_2=tokenizer)
            vae_extra: dict[str, Any] = {"scaling_factor": 0.13025}
            scheduler: Any = EulerDiscreteScheduler(
                num_train_timesteps=1000,
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                steps_offset=1,
                timestep_spacing="leading",
                prediction_type="epsilon",
            )
            pipeline_class = "StableDiffusionXLPipeline"
        else:
            unet = SD3Transformer2DModel(
                sample_size=8,
                patch_size=2,
                in_channels=4,
                out_channels=4,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=2,
                joint_attention_dim=32,
                caption_projection_dim=16,
                pooled_projection_dim=16,
                pos_embed_max_size=16,
            )
            text_encoder = CLIPTextModelWithProjection(clip_config())
            tokenizer_3 = _tiny_t5_tokenizer()
            t5 = T5EncoderModel(
                T5Config(vocab_size=len(tokenizer_3), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
            )
            extra = dict(
                text_encoder_2=_freeze(CLIPTextModelWithProjection(clip_config())),
                tokenizer_2=tokenizer,
                text_encoder_3=_freeze(t5),
                tokenizer_3=tokenizer_3,
            )
            vae_extra = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
            pipeline_class = "StableDiffusion3Pipeline"
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            sample_size=16,
            **tiny["vae"],
            **vae_extra,
        )
    unet.eval()
    c = Components(unet, _freeze(text_encoder), tokenizer, scheduler, _freeze(vae), pipeline_class, None, **extra)
    _check_compatible(c)
    return c


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def _device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def encode(c: Components, prompts: list[str], *, batch_size: int = 64) -> families.Cond:
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
    """Images ``[N, 3, H, W]`` in [-1, 1] -> UNet latents ``[N, C, H/f, W/f]``.

    ``latents = (vae.encode(x).latent_dist.mean - shift_factor) * scaling_factor``: the posterior mean, so caching is
    deterministic. Without a VAE the images are returned unchanged (a copy). Batched by ``batch_size``;
    returned on the VAE's device and dtype.
    """
    if c.vae is None:
        return images.clone()
    device, dtype = _device_dtype(c.vae)
    out = [
        (c.vae.encode(images[i : i + batch_size].to(device, dtype)).latent_dist.mean - c.shift_factor)
        * c.scaling_factor
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
    """UNet latents ``[N, C, h, w]`` -> images ``[N, 3, h*f, w*f]`` in [0, 1] (clamped). Batched by ``batch_size``."""
    if c.vae is None:
        return (latents / 2 + 0.5).clamp(0, 1)
    device, dtype = _device_dtype(c.vae)
    out = [
        c.vae.decode(latents[i : i + batch_size].to(device, dtype) / c.scaling_factor + c.shift_factor).sample
        for i in range(0, latents.shape[0], batch_size)
    ]
    if not out:
        f = c.vae_scale_factor
        return torch.zeros(0, 3, latents.shape[2] * f, latents.shape[3] * f, device=device, dtype=dtype)
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1)


# --------------------------------------------------------------------------------------------------
# Copies and LoRA
# --------------------------------------------------------------------------------------------------


def frozen_copy(unet: Any) -> Any:
    """A deep copy in ``eval()`` mode with every parameter ``requires_grad=False`` (the opponent/reference)."""
    return copy.deepcopy(unet).eval().requires_grad_(False)


def _tuner_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def add_lora(
    unet: Any, *, rank: int, alpha: float, target_modules: list[str] | tuple[str, ...], seed: int = 0
) -> None:
    """Attach a fresh LoRA adapter (peft, via ``unet.add_adapter``); only its parameters train afterwards.

    The adapter starts as the identity (LoRA B = 0), so the UNet's outputs are unchanged. LoRA A is drawn from
    ``seed`` (not the global RNG), so the same run gives the same adapter on any number of processes.
    """
    from peft import LoraConfig

    if rank <= 0:
        raise SpinDiffusionError(f"LoRA rank must be > 0, got {rank}")
    if _tuner_layers(unet):
        raise SpinDiffusionError("the UNet already has a LoRA adapter; merge_lora() it before adding a new one")
    targets = list(target_modules)
    names = [n for n, _ in unet.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not targets or missing:
        raise SpinDiffusionError(
            f"LoRA target_modules {missing or targets} match no UNet module (typical: to_q, to_k, to_v, to_out.0)"
        )
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet.add_adapter(config)
    except ValueError as e:
        _remove_peft_state(unet)
        raise SpinDiffusionError(f"cannot add LoRA with target_modules={targets}: {_first_line(e)}") from e
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)


def _remove_peft_state(unet: Any) -> None:
    """Drop peft layers and diffusers' adapter bookkeeping (after a failed add_adapter)."""
    if _tuner_layers(unet):
        unet.unload_lora()
    if "peft_config" in unet.__dict__:
        del unet.peft_config
    unet._hf_peft_config_loaded = False


@contextmanager
def adapters_disabled(unet: Any) -> Iterator[Any]:
    """Inside the block the UNet runs without its LoRA adapters (= the reference/opponent θ_k).

    A no-op for a UNet without adapters. The previous state is restored on exit, also on exceptions.
    """
    layers = _tuner_layers(unet)
    if not layers or layers[0].disable_adapters:
        yield unet
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def merge_lora(unet: Any) -> Any:
    """Fuse the LoRA adapters into the base weights and remove every peft layer; returns the same UNet.

    Outputs are unchanged up to float rounding. Parameters keep their ``requires_grad`` flags (the
    base weights are frozen since :func:`add_lora`). A UNet without adapters is returned as is.
    Verified numerically in tests: outputs after merging match the adapter outputs (allclose).
    """
    if not _tuner_layers(unet):
        return unet
    unet.enable_adapters()
    unet.fuse_lora()
    unet.unload_lora()
    for attr in ("lora_scale", "_safe_fusing"):  # left behind by diffusers' fuse_lora
        if attr in unet.__dict__:
            delattr(unet, attr)
    return unet


def lora_state_dict(unet: Any) -> dict[str, Tensor]:
    """The LoRA adapter weights (peft ``get_peft_model_state_dict``) for saving; empty without adapters."""
    from peft.utils import get_peft_model_state_dict

    if not _tuner_layers(unet):
        return {}
    return get_peft_model_state_dict(unet)


KOHYA_LORA_FILE = "lora_kohya.safetensors"


def _kohya_state_dict(state: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """A UNet's peft LoRA weights in the kohya layout that AUTOMATIC1111 / ComfyUI / SD.Next load (``lora_unet_*``
    keys, ``lora_down`` / ``lora_up``), through diffusers' ``convert_state_dict_to_kohya``; every ``.alpha`` is the
    adapter's real alpha (the converter writes the rank, which is only right when alpha == rank)."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    return {k: (torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}


def save_lora(unet: Any, out_dir: str | Path, c: Components | None = None) -> Path:
    """Write the denoiser's LoRA adapter as ``out_dir/pytorch_lora_weights.safetensors`` (diffusers LoRA format),
    and for UNet families also as ``out_dir/lora_kohya.safetensors`` (the kohya layout of AUTOMATIC1111 / ComfyUI).

    Loadable with ``load_lora_weights(out_dir)`` of the family's pipeline (``c``; SD-1.x when None); the kohya file
    with ``load_lora_weights(out_dir, weight_name="lora_kohya.safetensors")`` too. Atomic like :func:`save_pipeline`.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    state = lora_state_dict(unet)
    if not state:
        raise SpinDiffusionError("the UNet has no LoRA adapter to save (call add_lora first)")
    out_dir = Path(out_dir)
    tmp = _fresh_tmp(out_dir)
    # The adapter metadata (rank, alpha, targets) is stored in the safetensors header: without it a loader
    # would assume lora_alpha == rank and scale the adapter wrongly.
    configs = unet.peft_config
    metadata = (configs.get("default") or next(iter(configs.values()))).to_dict()
    layers = convert_state_dict_to_diffusers(state)
    # the family's pipeline class writes the key prefix its load_lora_weights expects (unet. / transformer.)
    cls = type(pipeline(c)) if c is not None else None
    if c is not None and c.family.name == "sd3":
        cls.save_lora_weights(
            tmp, transformer_lora_layers=layers, safe_serialization=True, transformer_lora_adapter_metadata=metadata
        )
    else:
        from diffusers import StableDiffusionPipeline

        (cls or StableDiffusionPipeline).save_lora_weights(
            tmp, unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=metadata
        )
        alpha = metadata.get("lora_alpha") or metadata.get("r")
        save_file(_kohya_state_dict(state, alpha), tmp / KOHYA_LORA_FILE, metadata={"ss_network_alpha": str(alpha)})
    return _move_into_place(tmp, out_dir)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def save_pipeline(c: Components, out_dir: str | Path, *, unet: Any = None, card: CardInfo | None = None) -> Path:
    """Write a full diffusers pipeline folder (safetensors) for ``c``, with ``unet`` replacing ``c.unet`` if given,
    and, with ``card``, its model card as README.md (``card.render_card``; metadata, training, evaluation, usage).

    With a VAE it is the family's pipeline (:func:`pipeline`: ``StableDiffusionPipeline`` without safety checker,
    ``StableDiffusionXLPipeline`` or ``StableDiffusion3Pipeline``) that loads offline with plain
    ``DiffusionPipeline.from_pretrained(out_dir)``. A UNet carrying LoRA adapters is saved merged
    (a merged copy; the argument is not modified).

    Without a VAE (pixel space) no diffusers text-to-image class fits cleanly, so the folder is a
    ``StableDiffusionPipeline`` with ``"vae": [null, null]``: :func:`load_components` reads it, while
    diffusers needs ``DiffusionPipeline.from_pretrained(out_dir, vae=None)`` and ``output_type="latent"``.

    Written to ``<out_dir>.tmp`` (a stale one is removed first) and moved into place with
    ``os.replace``; an existing ``out_dir`` is replaced. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    unet = c.unet if unet is None else unet
    if _tuner_layers(unet):
        unet = merge_lora(copy.deepcopy(unet))
    tmp = _fresh_tmp(out_dir)
    pipeline(c, unet=unet).save_pretrained(tmp, safe_serialization=True)
    if card is not None:
        info = dataclasses.replace(card, pixel_space=c.vae is None, family=c.family.name)
        (tmp / "README.md").write_text(render_card(info))
    return _move_into_place(tmp, out_dir)


def pipeline(c: Components, *, unet: Any = None) -> Any:
    """The plain diffusers pipeline of ``c``'s family (StableDiffusion, StableDiffusionXL or StableDiffusion3),
    sharing its modules; ``unet`` replaces the denoiser if given."""
    import diffusers

    unet = c.unet if unet is None else unet
    if c.family.name == "sd":
        return diffusers.StableDiffusionPipeline(
            vae=c.vae,
            text_encoder=c.text_encoder,
            tokenizer=c.tokenizer,
            unet=unet,
            scheduler=c.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if c.family.name == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=c.vae,
            text_encoder=c.text_encoder,
            text_encoder_2=c.text_encoder_2,
            tokenizer=c.tokenizer,
            tokenizer_2=c.tokenizer_2,
            unet=unet,
            scheduler=c.scheduler,
            force_zeros_for_empty_prompt=c.pipeline_config.get("force_zeros_for_empty_prompt", True),
        )
    return diffusers.StableDiffusion3Pipeline(
        transformer=unet,
        scheduler=c.scheduler,
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        text_encoder_2=c.text_encoder_2,
        tokenizer_2=c.tokenizer_2,
        text_encoder_3=c.text_encoder_3,
        tokenizer_3=c.tokenizer_3,
    )


def _fresh_tmp(out_dir: Path) -> Path:
    """``<out_dir>.tmp``, with stale ``.tmp``/``.old`` leftovers of a killed run removed."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    for stale in (tmp, out_dir.with_name(out_dir.name + ".old")):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def _move_into_place(tmp: Path, out_dir: Path) -> Path:
    """Move ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first (os.replace cannot overwrite it)."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.replace(tmp, out_dir)
    return out_dir
