"""ImageReward (Xu et al. 2023) on transformers' BLIP classes.

The model: BLIP ViT-L/16 image encoder (``BlipVisionModel``) -> BERT text encoder with cross-attention to every
image token (``BlipTextModel``, bidirectional, the [CLS] prompt token attends to the image) -> [CLS] hidden state
-> MLP 768-1024-128-64-16-1 -> ``(r - 0.16717362830052426) / 1.0333394966054072``. Prompts are tokenised with
bert-base-uncased (+ BLIP's ``[DEC]``/``[ENC]`` tokens), padded/truncated to 35 tokens; images are resized
(shorter side 224, bicubic), centre-cropped to 224 and normalised with the CLIP mean/std, as in
``ImageReward.py``.

Path: one folder with

- ``ImageReward.pt``: the official checkpoint (HF repo ``THUDM/ImageReward``; keys ``blip.visual_encoder.*``,
  ``blip.text_encoder.*``, ``mlp.layers.*``) -- or any single ``.pt``/``.pth``/``.safetensors`` file there;
  converted in memory by ``imagereward_to_transformers``;
- ``med_config.json`` (optional, same HF repo; BLIP's BERT config -- the defaults below are its values);
- a bert-base-uncased tokenizer (``vocab.txt`` [+ ``tokenizer_config.json``]) in ``<path>/tokenizer`` or ``<path>``;

or ``key=value`` pairs ``ckpt=/ImageReward.pt,tokenizer=/bert-base-uncased,med_config=/med_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.scorers._common import (
    BatchedScorer,
    RewardMLP,
    build_from_state_dict,
    component,
    has_files,
    isqrt_exact,
    load_state_dict_file,
    locate_checkpoint,
    resize_center_crop,
    single_file,
    to_normalized_tensor,
)

IMAGEREWARD_HINT = (
    "a local copy of ImageReward.pt (+ med_config.json) from THUDM/ImageReward and the bert-base-uncased tokenizer"
)
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35

# BLIP's configs/med_config.json (ImageReward ships the same file).
MED_CONFIG = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 512,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "vocab_size": 30524,
    "pad_token_id": 0,
}

# BLIP (timm-style ViT) block suffix -> transformers BlipEncoderLayer suffix.
_VIT_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VIS, _TXT = "blip.visual_encoder.", "blip.text_encoder."


class ImageRewardModel(nn.Module):
    """``vision_model`` (BlipVisionModel) + ``text_encoder`` (BlipTextModel, no pooler) + ``mlp`` (RewardMLP)."""

    def __init__(self, vision_config, text_config):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = RewardMLP(text_config.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """``[B,3,S,S]``, ``[B,L]``, ``[B,L]`` -> normalised rewards ``[B]``."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        ).last_hidden_state
        rewards = self.mlp(text[:, 0, :].float())
        return (rewards - REWARD_MEAN) / REWARD_STD


def imagereward_configs(state: dict[str, torch.Tensor], med_config: dict | None = None):
    """(BlipVisionConfig, BlipTextConfig) for an ImageReward/BLIP state dict (original key names). Sizes come
    from the tensors; vision heads = width / 64 (BLIP base 12, large 16); text heads and eps from
    ``med_config``; the ViT uses LayerNorm eps 1e-6 as BLIP's timm ViT does."""
    from transformers import BlipTextConfig, BlipVisionConfig

    med = {**MED_CONFIG, **(med_config or {})}
    width = int(state[f"{_VIS}cls_token"].shape[-1])
    patch = int(state[f"{_VIS}patch_embed.proj.weight"].shape[-1])
    grid = isqrt_exact(int(state[f"{_VIS}pos_embed"].shape[1]) - 1, what="imagereward")
    depth = 0
    while f"{_VIS}blocks.{depth}.norm1.weight" in state:
        depth += 1
    layers = 0
    while f"{_TXT}encoder.layer.{layers}.attention.self.query.weight" in state:
        layers += 1
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(state[f"{_VIS}blocks.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=depth,
        num_attention_heads=max(width // 64, 1),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
    )
    word = state[f"{_TXT}embeddings.word_embeddings.weight"]
    text = BlipTextConfig(
        vocab_size=int(word.shape[0]),
        hidden_size=int(word.shape[1]),
        encoder_hidden_size=width,
        intermediate_size=int(state[f"{_TXT}encoder.layer.0.intermediate.dense.weight"].shape[0]),
        num_hidden_layers=layers,
        num_attention_heads=int(med["num_attention_heads"]),
        max_position_embeddings=int(state[f"{_TXT}embeddings.position_embeddings.weight"].shape[0]),
        hidden_act=med["hidden_act"],
        layer_norm_eps=float(med["layer_norm_eps"]),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_decoder=True,  # builds the cross-attention layers; forward() still runs bidirectionally
        use_cache=False,
        pad_token_id=int(med.get("pad_token_id", 0)),
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
    )
    return vision, text


def imagereward_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ImageReward checkpoint to ``ImageRewardModel`` keys. Exact:

    - ``blip.visual_encoder.cls_token`` / ``pos_embed`` / ``patch_embed.proj`` -> ``vision_model.embeddings.
      class_embedding`` / ``position_embedding`` / ``patch_embedding``; ``blocks.i.{norm1,norm2,attn.qkv,
      attn.proj,mlp.fc1,mlp.fc2}`` -> ``encoder.layers.i.{layer_norm1,layer_norm2,self_attn.qkv,
      self_attn.projection,mlp.fc1,mlp.fc2}`` (same fused qkv layout); ``norm`` -> ``post_layernorm``.
    - ``blip.text_encoder.*`` -> ``text_encoder.*`` unchanged (transformers' BLIP text model keeps BLIP's med.py
      names); ``mlp.layers.*`` unchanged.
    - dropped: ``blip.vision_proj``, ``blip.text_proj``, the text pooler and ``position_ids`` buffers (unused).
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key.endswith("position_ids") or key.startswith(("blip.vision_proj.", "blip.text_proj.", f"{_TXT}pooler.")):
            continue
        if key.startswith("mlp."):
            out[key] = value
        elif key.startswith(_TXT):
            out["text_encoder." + key[len(_TXT) :]] = value
        elif key.startswith(_VIS):
            rest = key[len(_VIS) :]
            v = "vision_model."
            if rest == "cls_token":
                out[f"{v}embeddings.class_embedding"] = value
            elif rest == "pos_embed":
                out[f"{v}embeddings.position_embedding"] = value
            elif rest.startswith("patch_embed.proj."):
                out[f"{v}embeddings.patch_embedding.{rest.rsplit('.', 1)[1]}"] = value
            elif rest.startswith("norm."):
                out[f"{v}post_layernorm.{rest.rsplit('.', 1)[1]}"] = value
            elif rest.startswith("blocks."):
                _, i, sub = rest.split(".", 2)
                mod, param = sub.rsplit(".", 1)
                if mod not in _VIT_BLOCK:
                    unknown.append(key)
                    continue
                out[f"{v}encoder.layers.{i}.{_VIT_BLOCK[mod]}.{param}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise SpinDiffusionError(
            f"imagereward: unexpected checkpoint keys {unknown[:3]} ({len(unknown)} in all); expected an "
            "ImageReward.pt with blip.visual_encoder.*, blip.text_encoder.* and mlp.layers.*"
        )
    return out


def load_blip_tokenizer(folder: Path):
    """bert-base-uncased + BLIP's ``[DEC]`` (bos) and ``[ENC]`` special tokens, as BLIP's ``init_tokenizer``."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SpinDiffusionError(
            f"imagereward: cannot load the BERT tokenizer in {folder} ({e})".replace("\n", " ")
        ) from e
    vocab = tok.get_vocab()
    new = [t for t in ("[DEC]", "[ENC]") if t not in vocab]
    if new:
        tok.add_tokens(new, special_tokens=True)
    return tok


class ImageRewardScorer(BatchedScorer):
    """ImageReward-v1.0 (see the module docstring for the layout); about -2..2, higher is better."""

    name = "imagereward"

    def __init__(self, path, *, device="cpu", dtype=torch.float32, batch_size=16):
        root, parts, ckpt_loc = locate_checkpoint(
            self.name,
            path,
            ("ckpt", "tokenizer", "med_config"),
            hint=IMAGEREWARD_HINT,
            what="ImageReward checkpoint (ImageReward.pt)",
        )
        if ckpt_loc.is_dir() and (ckpt_loc / "ImageReward.pt").is_file():
            ckpt = ckpt_loc / "ImageReward.pt"
        else:
            ckpt = single_file(
                ckpt_loc, (".pt", ".pth", ".safetensors"), name=self.name, what="ImageReward checkpoint"
            )
        tok_dir = component(
            self.name,
            root,
            parts,
            "tokenizer",
            found=has_files("vocab.txt|tokenizer.json"),
            what="bert-base-uncased tokenizer folder (vocab.txt)",
        )
        med = None
        med_path = Path(parts["med_config"]) if "med_config" in parts else (root / "med_config.json" if root else None)
        if med_path is not None and med_path.is_file():
            try:
                med = json.loads(med_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise SpinDiffusionError(f"imagereward: cannot read {med_path} ({e})") from e
        elif "med_config" in parts:
            raise SpinDiffusionError(f"imagereward: med_config={med_path} does not exist")

        raw = load_state_dict_file(ckpt, name=self.name)
        for key in (f"{_VIS}cls_token", f"{_TXT}embeddings.word_embeddings.weight", "mlp.layers.0.weight"):
            if key not in raw:
                raise SpinDiffusionError(f"imagereward: {ckpt} has no {key}; it is not an ImageReward checkpoint")
        vision_config, text_config = imagereward_configs(raw, med)
        state = imagereward_to_transformers(raw)
        model = build_from_state_dict(
            lambda: ImageRewardModel(vision_config, text_config), state, name=self.name, source=ckpt
        )
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.model.mlp.float()
        self.tokenizer = load_blip_tokenizer(tok_dir)
        if len(self.tokenizer) > text_config.vocab_size:
            raise SpinDiffusionError(
                f"imagereward: the tokenizer in {tok_dir} has {len(self.tokenizer)} tokens but the checkpoint's text "
                f"encoder only {text_config.vocab_size}; use the bert-base-uncased tokenizer"
            )
        self.image_size = int(vision_config.image_size)
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size

    def _score_batch(self, images, prompts):
        pixels = to_normalized_tensor([resize_center_crop(im, self.image_size) for im in images])
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        )
        return self.model(
            pixels.to(self.device, self.dtype), tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        )
