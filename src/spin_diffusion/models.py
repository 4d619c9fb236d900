"""Model components: load a local diffusers folder, build tiny presets, LoRA helpers, export.

Everything here works offline: folders are read with ``local_files_only=True`` and the presets are
built from configs with the tokenizer shipped in ``spin_diffusion/assets/tokenizer``.

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
    "encode_prompts",
    "frozen_copy",
    "load_components",
    "lora_state_dict",
    "merge_lora",
    "save_lora",
    "save_pipeline",
]

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"  # vocab.json + merges.txt (make_tokenizer.py)
PRESETS = ("tiny", "demo")


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

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: ``"epsilon"`` or ``"v_prediction"`` (from the scheduler config)."""
        pred = getattr(self.scheduler.config, "prediction_type", "epsilon")
        if pred not in ("epsilon", "v_prediction"):
            raise SpinDiffusionError(
                f"scheduler prediction_type {pred!r} is not supported; "
                "use a model trained for 'epsilon' or 'v_prediction'"
            )
        return pred

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
        """A fresh ``DDPMScheduler`` with this model's betas and prediction type: the training forward process."""
        from diffusers import DDPMScheduler

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
    """Raise SpinDiffusionError when the components cannot form a plain text-to-image model."""
    where = f" in {c.source}" if c.source is not None else ""
    cfg = c.unet.config
    if cfg.in_channels != c.latent_channels:
        raise SpinDiffusionError(
            f"the UNet{where} takes {cfg.in_channels} input channels but latents have {c.latent_channels} "
            "(inpainting/depth UNets are not supported; use a text-to-image model)"
        )
    if cfg.out_channels != cfg.in_channels:
        raise SpinDiffusionError(
            f"the UNet{where} outputs {cfg.out_channels} channels for {cfg.in_channels} input channels "
            "(learned-variance models are not supported; use an epsilon/v-prediction text-to-image model)"
        )
    hidden = getattr(getattr(c.text_encoder, "config", None), "hidden_size", None)
    if isinstance(cfg.cross_attention_dim, int) and hidden is not None and hidden != cfg.cross_attention_dim:
        raise SpinDiffusionError(
            f"the text encoder{where} gives {hidden}-dim embeddings but the UNet expects "
            f"cross_attention_dim={cfg.cross_attention_dim}"
        )
    c.prediction_type  # noqa: B018  (raises for unsupported prediction types)


def load_components(path: str | Path, *, dtype: torch.dtype = torch.float32) -> Components:
    """Load a local diffusers pipeline folder (``model_index.json`` + ``unet/``, ``text_encoder/``, ...).

    Never downloads (``local_files_only=True``). ``vae/`` is optional: without it the model is pixel space.
    Raises SpinDiffusionError (one line) when the folder is missing, is not a diffusers pipeline
    folder, or a component cannot be read.
    """
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = Path(path).expanduser()
    if not root.is_dir():
        raise SpinDiffusionError(
            f"model folder not found: {root} (give a local diffusers pipeline folder, or leave model.path "
            "unset to use a built-in preset)"
        )
    if not (root / "model_index.json").is_file() or not (root / "unet").is_dir():
        raise SpinDiffusionError(
            f"{root} is not a diffusers pipeline folder (it needs model_index.json and unet/; "
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

    unet = load("unet", lambda f: UNet2DConditionModel.from_pretrained(f, local_files_only=True, torch_dtype=dtype))

    def load_text_encoder(folder: Path) -> torch.nn.Module:
        cls = getattr(transformers, entry_class("text_encoder") or "", None) or transformers.AutoModel
        model = cls.from_pretrained(folder, local_files_only=True)
        return model.to(dtype)

    def load_tokenizer(folder: Path) -> Any:
        cls = getattr(transformers, entry_class("tokenizer") or "", None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            cls = transformers.AutoTokenizer
        return cls.from_pretrained(folder, local_files_only=True)

    def load_scheduler(folder: Path) -> Any:
        config = _read_json(folder / "scheduler_config.json")
        name = config.get("_class_name") or entry_class("scheduler")
        cls = getattr(diffusers, str(name), None)
        if cls is None or not hasattr(cls, "from_config"):
            raise SpinDiffusionError(f"cannot load scheduler from {folder}: unknown scheduler class {name!r}")
        return cls.from_config(config)

    text_encoder = _freeze(load("text_encoder", load_text_encoder))
    tokenizer = load("tokenizer", load_tokenizer)
    scheduler = load("scheduler", load_scheduler)
    vae = None
    if (root / "vae").is_dir() and index.get("vae", ["", ""]) != [None, None]:
        vae = _freeze(
            load("vae", lambda f: AutoencoderKL.from_pretrained(f, local_files_only=True, torch_dtype=dtype))
        )
    unet.eval()
    c = Components(unet, text_encoder, tokenizer, scheduler, vae, pipeline_class=pipeline_class, source=root)
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


def build_preset(name: Literal["tiny", "demo"], *, seed: int = 0, pretrained_vae: bool = True) -> Components:
    """Build a randomly initialised built-in model from configs (no download, no files).

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


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def _device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode_prompts(c: Components, prompts: list[str], *, batch_size: int = 64) -> Tensor:
    """Text embeddings ``[N, L, D]`` (``last_hidden_state``), as StableDiffusionPipeline computes them.

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

    ``latents = vae.encode(x).latent_dist.mean * scaling_factor``: the posterior mean, so caching is
    deterministic. Without a VAE the images are returned unchanged (a copy). Batched by ``batch_size``;
    returned on the VAE's device and dtype.
    """
    if c.vae is None:
        return images.clone()
    device, dtype = _device_dtype(c.vae)
    out = [
        c.vae.encode(images[i : i + batch_size].to(device, dtype)).latent_dist.mean * c.scaling_factor
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
        c.vae.decode(latents[i : i + batch_size].to(device, dtype) / c.scaling_factor).sample
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


def save_lora(unet: Any, out_dir: str | Path) -> Path:
    """Write the UNet's LoRA adapter as ``out_dir/pytorch_lora_weights.safetensors`` (diffusers LoRA format).

    Loadable with ``StableDiffusionPipeline.load_lora_weights(out_dir)``. Atomic like :func:`save_pipeline`.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    state = lora_state_dict(unet)
    if not state:
        raise SpinDiffusionError("the UNet has no LoRA adapter to save (call add_lora first)")
    out_dir = Path(out_dir)
    tmp = _fresh_tmp(out_dir)
    # The adapter metadata (rank, alpha, targets) is stored in the safetensors header: without it a loader
    # would assume lora_alpha == rank and scale the adapter wrongly.
    configs = unet.peft_config
    metadata = (configs.get("default") or next(iter(configs.values()))).to_dict()
    StableDiffusionPipeline.save_lora_weights(
        tmp,
        unet_lora_layers=convert_state_dict_to_diffusers(state),
        safe_serialization=True,
        unet_lora_adapter_metadata=metadata,
    )
    return _move_into_place(tmp, out_dir)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def save_pipeline(c: Components, out_dir: str | Path, *, unet: Any = None, card: CardInfo | None = None) -> Path:
    """Write a full diffusers pipeline folder (safetensors) for ``c``, with ``unet`` replacing ``c.unet`` if given,
    and, with ``card``, its model card as README.md (``card.render_card``; metadata, training, evaluation, usage).

    With a VAE it is a ``StableDiffusionPipeline`` (no safety checker) that loads offline with plain
    ``DiffusionPipeline.from_pretrained(out_dir)``. A UNet carrying LoRA adapters is saved merged
    (a merged copy; the argument is not modified).

    Without a VAE (pixel space) no diffusers text-to-image class fits cleanly, so the folder is a
    ``StableDiffusionPipeline`` with ``"vae": [null, null]``: :func:`load_components` reads it, while
    diffusers needs ``DiffusionPipeline.from_pretrained(out_dir, vae=None)`` and ``output_type="latent"``.

    Written to ``<out_dir>.tmp`` (a stale one is removed first) and moved into place with
    ``os.replace``; an existing ``out_dir`` is replaced. Returns ``out_dir``.
    """
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    unet = c.unet if unet is None else unet
    if _tuner_layers(unet):
        unet = merge_lora(copy.deepcopy(unet))
    tmp = _fresh_tmp(out_dir)
    pipe = StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        unet=unet,
        scheduler=c.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    if card is not None:
        (tmp / "README.md").write_text(render_card(dataclasses.replace(card, pixel_space=c.vae is None)))
    return _move_into_place(tmp, out_dir)


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
