"""Model components: the pieces of a text-to-image diffusion model (`Components`) and loading them from a diffusers
pipeline folder or a Hub id.

A Hub id is resolved to its cached snapshot by spin_diffusion.hub (as diffusers does); the folder is then read
with ``local_files_only=True``. Presets built from configs are in `presets`, text/image encoding in `encoding`,
LoRA in `lora`, writing pipelines in `export`.

Only the denoiser ever trains. The text encoders and the VAE come back frozen (``eval()``,
``requires_grad_(False)``). The denoiser comes back in ``eval()`` mode with ``requires_grad`` on; the
trainer calls ``.train()`` itself.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spin_diffusion import families, hub
from spin_diffusion.errors import SpinDiffusionError, first_line


@dataclass
class Components:
    """The pieces of a text-to-image latent diffusion model that spin_diffusion uses.

    ``scheduler`` is the inference scheduler as saved in the folder (used for sampling and written
    back by :func:`save_pipeline`); :meth:`noise_scheduler` gives the training forward process.
    """

    # the trained network: UNet2DConditionModel (SD, SDXL), SD3Transformer2DModel (SD3), FluxTransformer2DModel
    # (FLUX.1), ZImageTransformer2DModel (Z-Image) or Flux2Transformer2DModel (FLUX.2 klein)
    denoiser: Any
    text_encoder: torch.nn.Module  # CLIPTextModel (or any encoder whose output has last_hidden_state)
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    scheduler: Any  # diffusers SchedulerMixin
    vae: Any | None  # diffusers.AutoencoderKL; None = pixel-space model (latents are images in [-1, 1])
    pipeline_class: str = "StableDiffusionPipeline"  # `_class_name` of model_index.json
    source: Path | None = None  # folder it was loaded from; None for presets
    # SDXL: CLIP-G (with projection); SD3: CLIP-G and T5 (text_encoder_3); FLUX: T5. None for SD-1.x/2.x.
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: Any = None
    pipeline_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra model_index.json entries
    max_sequence_length: int | None = None  # T5 tokens per prompt (SD3, FLUX); None: the family's default

    @functools.cached_property
    def family(self) -> families.Family:
        """How this model is conditioned, noised and called (``families``): sd, sdxl, sd3, flux, zimage or flux2."""
        name = families.family_name(self.pipeline_class, self.denoiser)
        return families.make(
            name,
            self.scheduler.config,
            self.denoiser.config,
            max_sequence_length=self.max_sequence_length,
            pipeline_config=self.pipeline_config,
        )

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: ``"epsilon"``, ``"v_prediction"`` or ``"flow"`` (velocity ε - x₀)."""
        return self.family.process.prediction_type

    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders this model has (one for SD and Z-Image, two for SDXL and FLUX, three for SD3)."""
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]

    @property
    def shift_factor(self) -> float:
        """Subtracted from the VAE posterior mean before scaling (SD3's VAE: ``shift_factor``); 0 elsewhere."""
        value = getattr(self.vae.config, "shift_factor", None) if self.vae is not None else None
        return 0.0 if value is None else float(value)

    @property
    def latent_channels(self) -> int:
        """Channels of the denoiser's input latents (the VAE's latent channels, 4x for FLUX.2's 2x2 patchify; image
        channels without a VAE)."""
        if self.vae is not None:
            return self.family.vae_latent_channels(self.vae)
        return self.family.latent_channels(self.denoiser.config)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (``2 ** (len(vae.block_out_channels) - 1)`` for an AutoencoderKL); 1
        without a VAE."""
        if self.vae is None:
            return 1
        return self.family.vae_scale_factor(self.vae)

    @property
    def scaling_factor(self) -> float:
        """Multiplier from VAE posterior mean to latents (``vae.config.scaling_factor``); 1.0 without a VAE."""
        if self.vae is None:
            return 1.0
        value = getattr(self.vae.config, "scaling_factor", None)
        return 1.0 if value is None else float(value)

    @property
    def sample_size(self) -> int:
        """Native latent side length (``denoiser.config.sample_size``; FLUX: the pipeline's default, 128)."""
        return self.family.sample_size(self.denoiser.config)

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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SpinDiffusionError(f"cannot read {path}: {first_line(e)}") from e
    if not isinstance(data, dict):
        raise SpinDiffusionError(f"cannot read {path}: expected a JSON object")
    return data


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def check_compatible(c: Components) -> None:
    """Raise SpinDiffusionError when the components cannot form a plain text-to-image model of their family."""
    where = f" in {c.source}" if c.source is not None else ""
    cfg = c.denoiser.config
    family = c.family.name  # raises for unsupported prediction types
    takes = c.family.latent_channels(cfg)
    if takes != c.latent_channels:
        raise SpinDiffusionError(
            f"the denoiser{where} takes {takes} latent channels but latents have {c.latent_channels} "
            "(inpainting/depth/control models are not supported; use a text-to-image model)"
        )
    if not c.family.outputs_what_it_takes(cfg):
        raise SpinDiffusionError(
            f"the denoiser{where} outputs {cfg.out_channels} channels for {cfg.in_channels} input channels "
            "(learned-variance models are not supported; use an epsilon/v-prediction or flow-matching model)"
        )
    needs = c.family.num_text_encoders
    have = [c.text_encoder, c.text_encoder_2, c.text_encoder_3][:needs]
    if any(e is None for e in have):
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


def _check_pipeline_folder(root: Path, named: str | Path) -> None:
    if not (root / "model_index.json").is_file() or not ((root / "unet").is_dir() or (root / "transformer").is_dir()):
        raise SpinDiffusionError(
            f"{named} is not a diffusers pipeline (it needs model_index.json and unet/ or transformer/; "
            "save one with DiffusionPipeline.save_pretrained)"
        )


def _entry_class(index: dict[str, Any], name: str) -> str | None:
    """The class name model_index.json gives component ``name`` (``"unet": ["diffusers", "UNet2DConditionModel"]``)."""
    value = index.get(name)
    if isinstance(value, list | tuple) and len(value) == 2 and value[1]:
        return str(value[1])
    return None


def load_denoiser(
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    index: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """The denoiser of the diffusers pipeline in ``folder``: ``unet/`` or ``transformer/``, of the class that
    ``model_index.json`` names for it (as ``DiffusionPipeline.from_pretrained`` picks it), in ``eval()`` mode with
    ``requires_grad`` on. The one way spin_diffusion loads a denoiser (a base model, a resumed run's θ_k, an
    evaluated export). ``index``: the already-read model_index.json. Raises SpinDiffusionError (one line)."""
    import diffusers

    root = Path(folder)
    if index is None:
        _check_pipeline_folder(root, folder)
        index = _read_json(root / "model_index.json")
    name = "transformer" if (root / "transformer").is_dir() and not (root / "unet").is_dir() else "unet"
    class_name = _entry_class(index, name)
    cls = getattr(diffusers, class_name or "", None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        if name == "transformer":  # diffusers names every transformer's class; there is nothing to fall back on
            raise SpinDiffusionError(
                f"cannot load transformer from {root / name}: model_index.json names the class {class_name!r}, "
                f"which diffusers {diffusers.__version__} does not have"
            )
        cls = diffusers.UNet2DConditionModel  # a folder written without the class name: a text-to-image UNet
    try:
        denoiser = cls.from_pretrained(root / name, local_files_only=True, torch_dtype=dtype, variant=variant)
    except Exception as e:  # any loader failure becomes one user-facing line
        raise SpinDiffusionError(f"cannot load {name} from {root / name}: {first_line(e)}") from e
    return _own_memory(denoiser).eval()


def _own_memory(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and buffer moved into its own fresh allocation. Weights read from a safetensors file start at
    the file's header offset (e.g. 24 bytes past a 64-byte boundary), and CPU kernels round differently on such
    memory: a FLUX transformer read back from iter_k/model sampled ~1 ulp away from the same weights trained in
    memory, so a resumed run drifted from the uninterrupted one. Fresh tensors are aligned like those of a model
    built or trained in memory."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    return module


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

    root = hub.resolve_pipeline(path, revision=revision, variant=variant)
    _check_pipeline_folder(root, path)
    index = _read_json(root / "model_index.json")
    pipeline_class = str(index.get("_class_name") or "StableDiffusionPipeline")
    families.check_supported(pipeline_class)

    def entry_class(name: str) -> str | None:
        return _entry_class(index, name)

    def load(name: str, fn):
        folder = root / name
        if not folder.is_dir():
            raise SpinDiffusionError(f"cannot load {name}: folder {folder} is missing")
        try:
            return fn(folder)
        except SpinDiffusionError:
            raise
        except Exception as e:  # any loader failure becomes one user-facing line
            raise SpinDiffusionError(f"cannot load {name} from {folder}: {first_line(e)}") from e

    denoiser = load_denoiser(root, dtype=dtype, variant=variant, index=index)

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

    text_encoder = freeze(load("text_encoder", load_text_encoder("text_encoder")))
    tokenizer = load("tokenizer", load_tokenizer("tokenizer"))
    scheduler = load("scheduler", load_scheduler)
    extra = {}
    for n in ("2", "3"):
        encoder = optional(f"text_encoder_{n}", load_text_encoder(f"text_encoder_{n}"))
        extra[f"text_encoder_{n}"] = freeze(encoder) if encoder is not None else None
        extra[f"tokenizer_{n}"] = optional(f"tokenizer_{n}", load_tokenizer(f"tokenizer_{n}"))
    vae = None
    if (root / "vae").is_dir() and index.get("vae", ["", ""]) != [None, None]:
        # An fp16 VAE that asks for it (force_upcast, SDXL's default) runs in fp32, as the diffusers pipelines decode
        # and its training scripts encode ("to avoid NaN"); the fp16-fix VAE sets force_upcast=False.
        vae_dtype = dtype
        if dtype == torch.float16 and _read_json(root / "vae" / "config.json").get("force_upcast", True):
            vae_dtype = torch.float32
        vae_class = getattr(diffusers, entry_class("vae") or "", None) or diffusers.AutoencoderKL  # Qwen-Image's own
        vae = freeze(
            load(
                "vae",
                lambda f: vae_class.from_pretrained(f, local_files_only=True, torch_dtype=vae_dtype, variant=variant),
            )
        )
    denoiser.eval()
    settings = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list | tuple)}
    c = Components(
        denoiser,
        text_encoder,
        tokenizer,
        scheduler,
        vae,
        pipeline_class=pipeline_class,
        source=root,
        pipeline_config=settings,
        **extra,
    )
    check_compatible(c)
    return c


def frozen_copy(denoiser: Any, dtype: torch.dtype | None = None) -> Any:
    """A deep copy in ``eval()`` mode with every parameter ``requires_grad=False`` (the opponent/reference).

    With `dtype`, its floating parameters and buffers are in that dtype, and each parameter is cast straight from the
    original: no full-precision copy of the whole model exists on the way (FLUX.1-dev: 44 GiB in fp32)."""
    if dtype is None:
        return copy.deepcopy(denoiser).eval().requires_grad_(False)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype) if t.is_floating_point() else t.detach().clone()

    memo: dict[int, Any] = {id(p): torch.nn.Parameter(cast(p), requires_grad=False) for p in denoiser.parameters()}
    memo.update({id(b): cast(b) for b in denoiser.buffers()})
    return copy.deepcopy(denoiser, memo).eval()
