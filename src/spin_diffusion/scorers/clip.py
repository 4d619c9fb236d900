"""CLIP-family scorers on transformers' ``CLIPModel``: PickScore, CLIP score and the LAION aesthetic predictor.

On disk (``path`` is one folder, or ``key=value`` pairs; see ``spin_diffusion.scoring``):

- ``pickscore``: ``model`` = a transformers CLIP folder of ``yuvalkirstain/PickScore_v1`` (``<path>/model`` or
  ``<path>``); ``processor`` = a CLIP processor folder (``preprocessor_config.json`` + tokenizer files) of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (``<path>/processor``, else ``<path>`` when it has them).
- ``clip``: the same layout for any transformers CLIP model, e.g. ``openai/clip-vit-large-patch14`` (the
  torchmetrics ``CLIPScore`` default), whose folder usually holds the processor files too.
- ``aesthetic``: ``clip`` = a transformers CLIP ViT-L/14 folder with its image processor
  (``openai/clip-vit-large-patch14``; ``<path>/clip`` or ``<path>``), ``mlp`` = the improved-aesthetic-predictor
  head ``sac+logos+ava1-l14-linearMSE.pth`` (``<path>/mlp`` or the single ``.pth``/``.pt`` file in ``<path>``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.scorers._common import (
    BatchedScorer,
    component,
    has_files,
    has_weight_file,
    load_reward_mlp,
    load_state_dict_file,
    parse_path_spec,
    resize_center_crop,
    single_file,
    to_normalized_tensor,
)

PICKSCORE_HINT = (
    "a local copy of yuvalkirstain/PickScore_v1 (model) and laion/CLIP-ViT-H-14-laion2B-s32B-b79K (processor)"
)
CLIP_HINT = "a local copy of a transformers CLIP model with its processor, e.g. openai/clip-vit-large-patch14"
AESTHETIC_HINT = (
    "a local copy of openai/clip-vit-large-patch14 (clip) and LAION's improved-aesthetic-predictor head "
    "sac+logos+ava1-l14-linearMSE.pth (mlp)"
)

_MODEL_FILES = ("config.json", "model.safetensors|pytorch_model.bin|model.safetensors.index.json")
_PROCESSOR_FILES = ("preprocessor_config.json|processor_config.json",)
_TOKENIZER_FILES = ("tokenizer.json|vocab.json",)


def _pooled(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose ``pooler_output`` is projected (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEmbedder:
    """A transformers ``CLIPModel`` plus its image processor (and tokenizer when ``text=True``).

    ``image_embeds(images) -> [B, D]`` and ``text_embeds(prompts) -> [B, D]`` are L2-normalised float32.
    Prompts are truncated to the model's ``max_position_embeddings`` (77 for CLIP) tokens.
    """

    def __init__(self, model_dir: Path, processor_dir: Path, *, device="cpu", dtype=torch.float32, text=True):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
            self.image_processor = AutoImageProcessor.from_pretrained(str(processor_dir), local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(processor_dir), local_files_only=True) if text else None
        except (OSError, ValueError) as e:
            raise SpinDiffusionError(
                f"cannot load CLIP from {model_dir} / {processor_dir}: {e}".replace("\n", " ")
            ) from e
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().float().exp()

    def image_embeds(self, images: list[Image.Image]) -> torch.Tensor:
        """Preprocessed by the transformers image processor (the PickScore / torchmetrics CLIPScore path)."""
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return self.embed_pixels(pixels)

    def image_embeds_openai(self, images: list[Image.Image]) -> torch.Tensor:
        """Preprocessed as OpenAI's ``clip.load`` does (torchvision ``Resize(n, BICUBIC)``, ``CenterCrop(n)``,
        ``ToTensor``, ``Normalize``). Its centre crop rounds the offset (``round(75.5) = 76``) where the transformers
        processor floors it, a one-pixel shift for some sizes (docs/SCORER_PARITY.md)."""
        size = int(self.model.config.vision_config.image_size)
        mean = getattr(self.image_processor, "image_mean", None)
        std = getattr(self.image_processor, "image_std", None)
        crops = [resize_center_crop(im, size) for im in images]
        pixels = to_normalized_tensor(crops, mean, std) if mean and std else to_normalized_tensor(crops)
        return self.embed_pixels(pixels)

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        feats = _pooled(
            self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
            )
        )
        return torch.nn.functional.normalize(feats.float(), dim=-1)


def _load_clip(name: str, path, hint: str, *, device, dtype, text=True) -> ClipEmbedder:
    root, parts = parse_path_spec(name, path, ("model", "processor"), hint=hint)
    model_dir = component(name, root, parts, "model", found=has_files(*_MODEL_FILES), what="transformers CLIP folder")
    need = (*_PROCESSOR_FILES, *_TOKENIZER_FILES) if text else _PROCESSOR_FILES
    proc_dir = component(
        name,
        root,
        parts,
        "processor",
        found=has_files(*need),
        what="CLIP processor folder (image processor + tokenizer)",
    )
    return ClipEmbedder(model_dir, proc_dir, device=device, dtype=dtype, text=text)


class PickScoreScorer(BatchedScorer):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(image_emb, text_emb)`` as in the PickScore
    repo; about 18-23 for SD-1.5-class images (a temperature-scaled cosine, higher is better)."""

    name = "pickscore"

    def __init__(self, path, *, device="cpu", dtype=torch.float32, batch_size=16):
        self.clip = _load_clip(self.name, path, PICKSCORE_HINT, device=device, dtype=dtype)
        self.batch_size = batch_size

    def _score_batch(self, images, prompts):
        cos = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)
        return self.clip.logit_scale * cos


class ClipScoreScorer(BatchedScorer):
    """CLIP score, torchmetrics convention: ``100 * max(cos(image_emb, text_emb), 0)`` (so 33 here = 0.33 in
    papers that report the raw cosine)."""

    name = "clip"

    def __init__(self, path, *, device="cpu", dtype=torch.float32, batch_size=16):
        self.clip = _load_clip(self.name, path, CLIP_HINT, device=device, dtype=dtype)
        self.batch_size = batch_size

    def _score_batch(self, images, prompts):
        cos = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)
        return 100.0 * cos.clamp(min=0)


class AestheticScorer(BatchedScorer):
    """LAION improved aesthetic predictor: the MLP head on the L2-normalised CLIP ViT-L/14 image embedding
    (about 1-10; ignores the prompt). Images are preprocessed as LAION's ``simple_inference.py`` does through
    OpenAI's ``clip.load`` (``ClipEmbedder.image_embeds_openai``), not by the transformers processor."""

    name = "aesthetic"

    def __init__(self, path, *, device="cpu", dtype=torch.float32, batch_size=16):
        root, parts = parse_path_spec(self.name, path, ("clip", "mlp"), hint=AESTHETIC_HINT)
        clip_dir = component(
            self.name,
            root,
            parts,
            "clip",
            found=has_files(*_MODEL_FILES, *_PROCESSOR_FILES),
            what="transformers CLIP ViT-L/14 folder with preprocessor_config.json",
        )
        mlp_loc = component(
            self.name,
            root,
            parts,
            "mlp",
            what="aesthetic MLP weights (.pth/.pt/.safetensors)",
            found=has_weight_file(".pth", ".pt"),
        )
        mlp_file = single_file(
            mlp_loc,
            (".pth", ".pt", ".safetensors"),
            name=self.name,
            what="aesthetic MLP file",
            exclude=("model.safetensors", "pytorch_model.bin"),
        )
        self.clip = ClipEmbedder(clip_dir, clip_dir, device=device, dtype=dtype, text=False)
        self.mlp = load_reward_mlp(load_state_dict_file(mlp_file, name=self.name), name=self.name, source=mlp_file)
        dim = int(self.clip.model.config.projection_dim)
        if self.mlp.input_size != dim:
            raise SpinDiffusionError(
                f"aesthetic: the MLP in {mlp_file} expects {self.mlp.input_size}-d CLIP embeddings but the CLIP in "
                f"{clip_dir} gives {dim}-d; use the ViT-L/14 CLIP (openai/clip-vit-large-patch14) for the L14 head"
            )
        self.mlp.to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    def _score_batch(self, images, prompts):
        return self.mlp(self.clip.image_embeds_openai(images).to(self.device))
