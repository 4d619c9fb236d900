"""Test-only converters: a transformers-layout scorer model -> the official checkpoint layout (open_clip's HPSv2,
ImageReward.pt), to write checkpoints the scorers then load as users' files."""

from __future__ import annotations

import torch

from spin_diffusion.scorers.hpsv2 import _BLOCK
from spin_diffusion.scorers.imagereward import _TXT, _VIS, _VIT_BLOCK


def transformers_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``open_clip_to_transformers`` (q/k/v are concatenated back into ``in_proj``)."""
    hf = dict(state)
    hf.pop("text_model.embeddings.position_ids", None)
    hf.pop("vision_model.embeddings.position_ids", None)
    out: dict[str, torch.Tensor] = {}

    def blocks(hf_prefix: str, oc_prefix: str) -> None:
        i = 0
        while f"{hf_prefix}{i}.layer_norm1.weight" in hf:
            h, o = f"{hf_prefix}{i}.", f"{oc_prefix}{i}."
            for a, b in _BLOCK.items():
                for p in ("weight", "bias"):
                    out[f"{o}{a}.{p}"] = hf[f"{h}{b}.{p}"]
            for p in ("weight", "bias"):
                out[f"{o}attn.in_proj_{p}"] = torch.cat([hf[f"{h}self_attn.{n}_proj.{p}"] for n in "qkv"], dim=0)
            i += 1

    v = "vision_model."
    out["visual.conv1.weight"] = hf[f"{v}embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = hf[f"{v}embeddings.class_embedding"]
    out["visual.positional_embedding"] = hf[f"{v}embeddings.position_embedding.weight"]
    for p in ("weight", "bias"):
        out[f"visual.ln_pre.{p}"] = hf[f"{v}pre_layrnorm.{p}"]
        out[f"visual.ln_post.{p}"] = hf[f"{v}post_layernorm.{p}"]
        out[f"ln_final.{p}"] = hf[f"text_model.final_layer_norm.{p}"]
    out["visual.proj"] = hf["visual_projection.weight"].t()
    blocks(f"{v}encoder.layers.", "visual.transformer.resblocks.")
    out["token_embedding.weight"] = hf["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = hf["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = hf["text_projection.weight"].t()
    out["logit_scale"] = hf["logit_scale"]
    blocks("text_model.encoder.layers.", "transformer.resblocks.")
    return {k: t.contiguous() for k, t in out.items()}


def transformers_to_imagereward(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``imagereward_to_transformers`` (``ImageRewardModel`` keys -> ImageReward.pt keys)."""
    inverse = {b: a for a, b in _VIT_BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    v = "vision_model."
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith("mlp."):
            out[key] = value
        elif key.startswith("text_encoder."):
            out[_TXT + key[len("text_encoder.") :]] = value
        elif key == f"{v}embeddings.class_embedding":
            out[f"{_VIS}cls_token"] = value
        elif key == f"{v}embeddings.position_embedding":
            out[f"{_VIS}pos_embed"] = value
        elif key.startswith(f"{v}embeddings.patch_embedding."):
            out[f"{_VIS}patch_embed.proj.{key.rsplit('.', 1)[1]}"] = value
        elif key.startswith(f"{v}post_layernorm."):
            out[f"{_VIS}norm.{key.rsplit('.', 1)[1]}"] = value
        elif key.startswith(f"{v}encoder.layers."):
            _, _, _, i, sub = key.split(".", 4)
            mod, param = sub.rsplit(".", 1)
            out[f"{_VIS}blocks.{i}.{inverse[mod]}.{param}"] = value
        else:
            raise KeyError(key)
    return out
