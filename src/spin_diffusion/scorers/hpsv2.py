"""HPSv2 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences; score = cos(image, text).

The checkpoint ``HPS_v2_compressed.pt`` (or ``HPS_v2.1_compressed.pt``) from the HF repo ``xswu/HPSv2`` holds
the *whole* open_clip model, so no other CLIP weights are needed. Two backends give the same numbers:

- ``open_clip`` (used when ``import open_clip`` works; the optional extra ``hpsv2 = ["open_clip_torch"]``, which
  needs a working torchvision): ``open_clip.create_model("ViT-H-14")`` + the checkpoint + open_clip's tokenizer.
- ``transformers`` (no open_clip): the open_clip state dict is converted to a transformers ``CLIPModel`` with
  ``open_clip_to_transformers`` (exact key mapping, see below); the tokenizer comes from a CLIP tokenizer folder
  such as ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (only its tokenizer files are read).

Path: one folder holding the checkpoint (the single ``.pt``/``.pth``/``.safetensors`` file in it) and, for the
transformers backend, the tokenizer (``<path>/tokenizer`` or ``<path>`` itself); or ``key=value`` pairs
``ckpt=/f.pt,tokenizer=/dir,backend=auto|open_clip|transformers,arch=ViT-H-14,config=/open_clip_cfg.json``.
``config`` (an open_clip model-config JSON, read from ``<path>/open_clip_config.json`` when present) is only
needed for architectures other than ViT-H-14 with the transformers backend; ``arch`` only for open_clip.

Preprocessing is HPSv2's ``preprocess_val`` as its code runs it: to a float tensor, longer side -> 224 (bicubic,
antialiased, on the tensor), zero-pad to a square, CLIP mean/std. The transformers backend first cleans prompts
as open_clip's tokenizer does (``open_clip_clean``). Both backends match the ``hpsv2`` package to < 1e-7
(docs/SCORER_PARITY.md). Scores are the raw cosine (about 0.25-0.30 for SD-1.5 images), as ``hpsv2.score``
returns; papers that quote "HPSv2 x 100" multiply by 100.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import torch

from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.scorers._common import (
    BatchedScorer,
    build_from_state_dict,
    component,
    is_clip_tokenizer_dir,
    isqrt_exact,
    load_state_dict_file,
    locate_checkpoint,
    normalize_tensor,
    resize_max_pad_tensor,
    single_file,
)

HPSV2_HINT = "a local copy of HPS_v2_compressed.pt from xswu/HPSv2"

# open_clip's model_configs/ViT-H-14.json (the architecture HPSv2 fine-tunes)
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}

# Buffers some open_clip versions save that have no transformers counterpart (the causal mask).
_IGNORED = ("attn_mask", "text.attn_mask", "visual.attn_mask")

# Per residual block: open_clip suffix -> transformers suffix (weights/biases copied as they are).
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _count_blocks(state: dict, prefix: str) -> int:
    n = 0
    while f"{prefix}{n}.ln_1.weight" in state:
        n += 1
    return n


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an open_clip CLIP state dict (standard ViT tower + text transformer, as in ViT-H-14) to transformers
    ``CLIPModel`` names. Exact, no numerics involved:

    - ``conv1`` -> ``vision_model.embeddings.patch_embedding``; ``class_embedding`` / ``positional_embedding`` ->
      ``embeddings.class_embedding`` / ``position_embedding.weight``; ``ln_pre`` -> ``pre_layrnorm``;
      ``ln_post`` -> ``post_layernorm``; ``proj`` [W, E] -> ``visual_projection.weight`` = proj.T.
    - ``token_embedding`` / ``positional_embedding`` -> ``text_model.embeddings.*``; ``ln_final`` ->
      ``text_model.final_layer_norm``; ``text_projection`` [W, E] -> ``text_projection.weight`` = T.
    - blocks ``transformer.resblocks.i``: ``attn.in_proj_{weight,bias}`` split in three along dim 0 into
      ``q_proj, k_proj, v_proj``; ``ln_1/ln_2/attn.out_proj/mlp.c_fc/mlp.c_proj`` -> ``layer_norm1/layer_norm2/
      self_attn.out_proj/mlp.fc1/mlp.fc2``. ``logit_scale`` is copied.

    Raises SpinDiffusionError on keys it does not know (e.g. attention pooling or a non-ViT tower).
    """
    src = {k: v for k, v in state.items() if k not in _IGNORED}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise SpinDiffusionError(f"hpsv2: the checkpoint has no {key!r}; it is not an open_clip ViT CLIP")
        used.add(key)
        return src[key]

    def blocks(oc_prefix: str, hf_prefix: str) -> None:
        for i in range(_count_blocks(src, oc_prefix)):
            o, h = f"{oc_prefix}{i}.", f"{hf_prefix}{i}."
            for a, b in _BLOCK.items():
                for p in ("weight", "bias"):
                    out[f"{h}{b}.{p}"] = take(f"{o}{a}.{p}")
            w, bias = take(f"{o}attn.in_proj_weight"), take(f"{o}attn.in_proj_bias")
            for name, wi, bi in zip(("q", "k", "v"), w.chunk(3, dim=0), bias.chunk(3, dim=0), strict=True):
                out[f"{h}self_attn.{name}_proj.weight"] = wi
                out[f"{h}self_attn.{name}_proj.bias"] = bi

    v = "vision_model."
    out[f"{v}embeddings.patch_embedding.weight"] = take("visual.conv1.weight")
    out[f"{v}embeddings.class_embedding"] = take("visual.class_embedding")
    out[f"{v}embeddings.position_embedding.weight"] = take("visual.positional_embedding")
    for p in ("weight", "bias"):
        out[f"{v}pre_layrnorm.{p}"] = take(f"visual.ln_pre.{p}")
        out[f"{v}post_layernorm.{p}"] = take(f"visual.ln_post.{p}")
        out[f"text_model.final_layer_norm.{p}"] = take(f"ln_final.{p}")
    out["visual_projection.weight"] = take("visual.proj").t()
    blocks("visual.transformer.resblocks.", f"{v}encoder.layers.")
    out["text_model.embeddings.token_embedding.weight"] = take("token_embedding.weight")
    out["text_model.embeddings.position_embedding.weight"] = take("positional_embedding")
    out["text_projection.weight"] = take("text_projection").t()
    out["logit_scale"] = take("logit_scale")
    blocks("transformer.resblocks.", "text_model.encoder.layers.")
    leftover = sorted(set(src) - used)
    if leftover:
        raise SpinDiffusionError(
            f"hpsv2: unexpected open_clip keys {leftover[:3]} ({len(leftover)} in all); only plain ViT CLIPs convert"
        )
    return {k: t.contiguous() for k, t in out.items()}


def clip_config_from_open_clip(state: dict[str, torch.Tensor], cfg: dict | None = None, *, tokenizer=None):
    """A transformers ``CLIPConfig`` for an open_clip state dict. Sizes come from the tensors; the numbers of
    heads (not visible in shapes) and the activation come from the open_clip model config ``cfg`` (default
    ViT-H-14: vision ``width / head_width`` = 16 heads, text 16 heads, GELU; ``"quick_gelu": true`` for
    OpenAI-trained towers). ``tokenizer`` supplies bos/eos/pad ids (default CLIP's 49406/49407/0)."""
    from transformers import CLIPConfig

    cfg = cfg or VIT_H_14
    vcfg, tcfg = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    conv = state["visual.conv1.weight"]
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = isqrt_exact(int(state["visual.positional_embedding"].shape[0]) - 1, what="hpsv2")
    t_width = int(state["token_embedding.weight"].shape[1])
    heads_v = width // int(vcfg.get("head_width", 64))
    heads_t = int(tcfg.get("heads", max(t_width // 64, 1)))
    bos, eos, pad = 49406, 49407, 0
    if tokenizer is not None:
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    text_config = {
        "vocab_size": int(state["token_embedding.weight"].shape[0]),
        "hidden_size": t_width,
        "intermediate_size": int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "num_hidden_layers": _count_blocks(state, "transformer.resblocks."),
        "num_attention_heads": heads_t,
        "max_position_embeddings": int(state["positional_embedding"].shape[0]),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": int(state["text_projection"].shape[1]),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    vision_config = {
        "hidden_size": width,
        "intermediate_size": int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "num_hidden_layers": _count_blocks(state, "visual.transformer.resblocks."),
        "num_attention_heads": heads_v,
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": int(state["visual.proj"].shape[1]),
    }
    return CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=int(state["visual.proj"].shape[1])
    )


class HPSv2Scorer(BatchedScorer):
    """HPSv2: cos(image, text) of the preference-tuned ViT-H-14 (see the module docstring for the layout)."""

    name = "hpsv2"

    def __init__(self, path, *, device="cpu", dtype=torch.float32, batch_size=16):
        keys = ("ckpt", "tokenizer", "backend", "arch", "config")
        root, parts, ckpt_loc = locate_checkpoint(
            self.name, path, keys, hint=HPSV2_HINT, what="HPSv2 checkpoint (HPS_v2_compressed.pt)"
        )
        ckpt = single_file(ckpt_loc, (".pt", ".pth", ".safetensors"), name=self.name, what="HPSv2 checkpoint")
        backend = parts.get("backend", "auto")
        if backend not in ("auto", "open_clip", "transformers"):
            raise SpinDiffusionError(f"hpsv2: backend={backend!r}; use auto, open_clip or transformers")
        if backend == "auto":
            backend = "open_clip" if _open_clip_importable() else "transformers"
        self.backend = backend
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        state = load_state_dict_file(ckpt, name=self.name)
        if backend == "open_clip":
            self._init_open_clip(state, ckpt, parts.get("arch", "ViT-H-14"))
        else:
            cfg = None
            cfg_path = parts.get("config") or (root / "open_clip_config.json" if root is not None else None)
            if cfg_path is not None and ("config" in parts or Path(cfg_path).is_file()):
                try:
                    cfg = json.loads(Path(cfg_path).read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError) as e:
                    raise SpinDiffusionError(f"hpsv2: cannot read open_clip config {cfg_path} ({e})") from e
                cfg = cfg.get("model_cfg", cfg)
            if root is None and "tokenizer" not in parts:
                raise SpinDiffusionError(_no_tokenizer_message(ckpt.parent))
            try:
                tok_dir = component(
                    self.name,
                    root,
                    parts,
                    "tokenizer",
                    found=is_clip_tokenizer_dir,
                    what="CLIP tokenizer folder (vocab.json+merges.txt or tokenizer.json)",
                )
            except SpinDiffusionError as e:
                if "tokenizer" in parts:
                    raise
                raise SpinDiffusionError(_no_tokenizer_message(root)) from e
            self._init_transformers(state, ckpt, tok_dir, cfg)

    # -- backends ------------------------------------------------------------------------------------------

    def _init_open_clip(self, state, ckpt, arch):
        import open_clip

        model = open_clip.create_model(arch, pretrained=None)
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own or k not in _IGNORED}
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in _IGNORED]
        if missing or result.unexpected_keys:
            raise SpinDiffusionError(
                f"hpsv2: {ckpt} does not fit open_clip {arch} (missing {missing[:3]}, unexpected "
                f"{list(result.unexpected_keys)[:3]}); pass arch=<open_clip model name>"
            )
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

        def encode(pixels, prompts):
            img = self.model.encode_image(pixels, normalize=True)
            txt = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
            return img.float(), txt.float()

        self._encode = encode

    def _init_transformers(self, state, ckpt, tok_dir, cfg):
        from transformers import AutoTokenizer, CLIPModel

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise SpinDiffusionError(
                f"hpsv2: cannot load the CLIP tokenizer in {tok_dir} ({e})".replace("\n", " ")
            ) from e
        config = clip_config_from_open_clip(state, cfg, tokenizer=self.tokenizer)
        hf_state = open_clip_to_transformers(state)
        model = build_from_state_dict(lambda: CLIPModel(config), hf_state, name=self.name, source=ckpt)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.image_size = int(config.vision_config.image_size)
        context = int(config.text_config.max_position_embeddings)

        def encode(pixels, prompts):
            tok = self.tokenizer(
                [open_clip_clean(p) for p in prompts],
                padding="max_length",
                truncation=True,
                max_length=context,
                return_tensors="pt",
            )
            img = self.model.get_image_features(pixel_values=pixels)
            txt = self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
            )
            img = img if isinstance(img, torch.Tensor) else img.pooler_output
            txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
            return (
                torch.nn.functional.normalize(img.float(), dim=-1),
                torch.nn.functional.normalize(txt.float(), dim=-1),
            )

        self._encode = encode

    def _score_batch(self, images, prompts):
        pixels = normalize_tensor(torch.stack([resize_max_pad_tensor(im, self.image_size) for im in images]))
        img, txt = self._encode(pixels.to(self.device, self.dtype), prompts)
        return (img * txt).sum(-1)


# ftfy's uncurl_quotes: U+02BC and U+2018..U+201B -> ', U+201C..U+201F -> "
_CURLY = str.maketrans(
    {**dict.fromkeys("\u02bc\u2018\u2019\u201a\u201b", "'"), **dict.fromkeys("\u201c\u201d\u201e\u201f", '"')}
)


def open_clip_clean(text: str) -> str:
    """open_clip's ``whitespace_clean(basic_clean(text))``, which its tokenizer (and so HPSv2) applies before BPE:
    ``ftfy.fix_text``, HTML unescaping twice, whitespace runs -> one space, strip. A transformers CLIP tokenizer
    does none of it, so "&amp;" or "dog\u2019s" would tokenise differently (docs/SCORER_PARITY.md).

    Without ``ftfy`` installed only its quote straightening is reproduced (the ftfy fix prompts need most); mojibake
    repair, ligatures and full-width forms then stay as they are."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        text = text.translate(_CURLY)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _open_clip_importable() -> bool:
    try:
        import open_clip  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken torchvision raises RuntimeError, not ImportError
        return False
    return True


def _no_tokenizer_message(root) -> str:
    return (
        "hpsv2: open_clip is not importable (install the optional extra spin-diffusion[hpsv2], i.e. open_clip_torch "
        "with a torchvision that matches your torch), so the transformers backend is used and needs a CLIP tokenizer "
        f"folder: put the tokenizer files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K in {root}/tokenizer or pass "
        "tokenizer=/path"
    )
