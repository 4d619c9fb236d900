"""The model card (README.md) of an exported pipeline folder: Hugging Face metadata, training, evaluation, usage.

``render_card`` is pure (a ``CardInfo`` in, markdown out; template ``templates/model_card.md.j2``);
``export.save_pipeline(..., card=info)`` writes it into the folder it exports.

    info = card.card_info(cfg, iteration=k + 1, steps=result.steps, data_size=len(captions))
    export.save_pipeline(c, out_dir, denoiser=policy, card=info)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import yaml

from spin_diffusion import hub, objectives
from spin_diffusion.config import RunConfig, at_iteration

# What each objective is, in one line (the card's "Training" section).
OBJECTIVES = {
    "sft": "supervised fine-tuning: the plain denoising loss on the real images",
    "dpo": "Diffusion-DPO on (winner, loser) image pairs against a frozen reference",
    "spin_approx": "SPIN-Diffusion (approximate objective: logistic loss per timestep, then averaged) against the "
    "previous iteration's model as opponent",
    "spin_exact": "SPIN-Diffusion (exact objective: timestep-averaged margin inside the logistic, on the opponent's "
    "own sampling trajectories) against the previous iteration's model as opponent",
    "ddo": "Direct Discriminative Optimization: the likelihood ratio to the previous iteration's model as a GAN "
    "discriminator, real images against that model's own samples (two separate terms), in rounds",
    "caption_contrast": "caption contrast: each real image preferred under its own caption over a mismatched caption, "
    "relative to the previous iteration's model, in rounds",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class CardInfo:
    """What a model card says about one exported model."""

    base_model: str  # what training started from (θ_0), as the card shows it: a Hub id, a folder's name or a preset
    objective: str  # sft | dpo | spin_approx | spin_exact
    iteration: int  # this model is θ_iteration (1 = one round of training)
    steps: int  # optimizer steps of the training that produced it
    data_size: int  # training images (or preference pairs for dpo)
    beta: float | None = None  # β of the dpo / spin objectives; None for sft
    sft_weight: float = 0.0  # λ of the SFT term added to the dpo / spin loss (loss.sft_weight); 0 = none
    learning_rate: float | None = None
    batch_size: int | None = None
    resolution: int | None = None
    lora_rank: int = 0  # 0: full fine-tuning; else LoRA of this rank, merged into the saved denoiser
    ema_decay: float | None = None  # the saved weights are this EMA of the trained ones (train.ema_decay)
    license: str | None = None  # the base model's license, if known
    evaluation: dict[str, float | None] = field(default_factory=dict)  # flat eval.json metrics of this model
    eval_prompts: int = 0  # how many prompts the evaluation used
    pixel_space: bool = False  # no VAE: diffusers needs vae=None and output_type="latent"
    family: str = "sd"  # sd | sdxl | sd3 | flux | zimage | flux2 (families.py): the usage snippet and tags follow it
    denoiser: str = "UNet"  # what was trained: the UNet or the transformer (export.save_pipeline sets it and the next)
    text_encoders: int = 1  # how many text encoders (and tokenizers) the model has
    # keyword arguments (as Python source) of the pipeline call that generates as the model was trained
    # (sampling.pipeline_kwargs: SD3/FLUX's T5 length, FLUX's guidance, skip-layer guidance)
    call_kwargs: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)  # extra tags beyond the default ones
    base_model_id: str | None = None  # the Hub id of the base (or of its own base), for the `base_model:` metadata

    @property
    def hub_base_model(self) -> str | None:
        """The Hub id the ``base_model:`` metadata names: ``base_model_id``, else ``base_model`` when it is one."""
        if self.base_model_id:
            return self.base_model_id
        return self.base_model if _HUB_ID.fullmatch(self.base_model) and not Path(self.base_model).exists() else None


_FAMILY_TAGS = {
    "sd": "stable-diffusion",
    "sdxl": "stable-diffusion-xl",
    "sd3": "sd3",
    "flux": "flux",
    "zimage": "z-image",
    "flux2": "flux2-klein",
}


def _base_model(cfg: RunConfig) -> tuple[str, str | None, Path | None]:
    """(what the card calls the base model, its Hub id or None, a local folder that may hold its README.md).

    Never an absolute path: a card is published, and a path on the training machine means nothing to readers.
    A folder inside the Hugging Face cache is its Hub id; another local folder is named by its last part, and its
    own card's ``base_model`` (an exported model fine-tuned further) is carried over as the Hub id."""
    path = cfg.model.path
    if path is None:
        return f"spin-diffusion preset '{cfg.model.preset}'", None, None
    revision = f" (revision {cfg.model.revision})" if cfg.model.revision else ""
    if hub.is_hub_id(path):
        from huggingface_hub import try_to_load_from_cache

        readme = try_to_load_from_cache(path, "README.md", revision=cfg.model.revision)
        return f"{path}{revision}", path, Path(readme).parent if isinstance(readme, str) else None
    folder = Path(path).expanduser()
    cached = hub.hub_id_of(folder)
    if cached:
        return cached, cached, folder
    parent = read_metadata(folder / "README.md").get("base_model")
    parent = parent if isinstance(parent, str) and _HUB_ID.fullmatch(parent) else None
    name = folder.resolve().name
    shown = f"a local model ({name}), fine-tuned from {parent}" if parent else f"a local model ({name})"
    return shown, parent, folder


def card_info(
    cfg: RunConfig,
    *,
    iteration: int,
    steps: int,
    data_size: int,
    resolution: int | None = None,
    evaluation: dict[str, float | None] | None = None,
    eval_prompts: int = 0,
) -> CardInfo:
    """A CardInfo from a run's config and what the run knows at export time (steps done, data size); β and the
    learning rate are the values that trained this iteration (config.at_iteration). The base
    model's license is read from the metadata of its own README.md (a local folder's, or a Hub id's cached one)."""
    base, base_id, base_dir = _base_model(cfg)
    return CardInfo(
        base_model=base,
        base_model_id=base_id,
        objective=cfg.loss.objective,
        iteration=iteration,
        steps=steps,
        data_size=data_size,
        beta=at_iteration(cfg.loss.beta, iteration - 1) if objectives.get(cfg.loss.objective).needs_ref else None,
        sft_weight=cfg.loss.sft_weight,
        learning_rate=at_iteration(cfg.train.learning_rate, iteration - 1),
        batch_size=cfg.train.batch_size,
        resolution=resolution,
        lora_rank=cfg.model.lora_rank,
        ema_decay=cfg.train.ema_decay,
        license=base_license(base_dir) if base_dir is not None else None,
        evaluation=dict(evaluation or {}),
        eval_prompts=eval_prompts,
    )


def base_license(model_dir: str | Path) -> str | None:
    """The ``license`` of a model folder's README.md metadata (YAML between ``---`` lines), or None."""
    meta = read_metadata(Path(model_dir) / "README.md")
    value = meta.get("license")
    return str(value) if value else None


def read_metadata(readme: Path) -> dict:
    """The YAML metadata block at the top of a model card file, or {} if there is none (or it does not parse)."""
    return read_metadata_text(readme.read_text(encoding="utf-8")) if readme.is_file() else {}


def read_metadata_text(text: str) -> dict:
    """The YAML metadata block at the top of a model card's text, or {}."""
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def render_card(info: CardInfo) -> str:
    """The README.md of an exported model: YAML metadata, then training, evaluation and usage sections."""
    metadata: dict = {}
    if info.hub_base_model:
        metadata["base_model"] = info.hub_base_model
    if info.license:
        metadata["license"] = info.license
    metadata["library_name"] = "diffusers"
    metadata["pipeline_tag"] = "text-to-image"
    family_tag = _FAMILY_TAGS.get(info.family)
    tags = ["diffusers", "text-to-image", "spin-diffusion", info.objective.replace("_", "-"), family_tag, *info.tags]
    metadata["tags"] = [t for t in dict.fromkeys(tags) if t]
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("spin_diffusion", "templates"),
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("model_card.md.j2").render(
        metadata=yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip(),
        info=info,
        objective=OBJECTIVES.get(info.objective, info.objective),
        evaluation=[(k, "–" if v is None else f"{v:.4g}") for k, v in info.evaluation.items()],
    )
