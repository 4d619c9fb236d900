"""Scorer parity: every scorer against its official implementation, on the real architectures at reduced width.

The official packages (``hpsv2``, ``image-reward``, OpenAI's ``clip``) need torchvision, which cannot load next to
the project's CPU torch, and ``image-reward`` pins ``timm==0.6.13`` against open_clip's ``timm>=1.0.17`` (see
``../shared/ENV.md``). So this script builds two reference virtual environments outside the repository (default
``~/.cache/spin-diffusion/parity-envs``, flag ``--envs``) on the registry's default (CUDA) torch, which runs on the
CPU, and runs the official code there:

1. ``openclip`` env (stage ``hpsv2``): hpsv2 builds a random-weight model of its open_clip ViT-H-14 architecture at
   reduced width (``REDUCED_VIT_H_14``, registered under the name ``ViT-H-14`` that ``hpsv2.img_score`` hard-codes),
   saves it as ``{"state_dict": ...}`` (the ``HPS_v2_compressed.pt`` format) and scores with
   ``hpsv2.img_score.score(..., cp=<file>)``: hpsv2's own ``preprocess_val`` and tokenizer. The project's open_clip
   backend is run there too.
2. ``imagereward`` env: ImageReward's ``ImageReward`` (BLIP + reward head) with a reduced ``med_config.json`` is
   saved as ``ImageReward.pt``, loaded back with the official ``ImageReward.load(<file>, med_config=<file>)`` and
   scored with ``ImageReward.score`` -- with the shipped ViT-L/16 (stage ``imagereward``) and with BLIP's
   ``VisionTransformer`` reduced (stage ``imagereward_small``, the one the test suite rebuilds). Stage
   ``aesthetic``: LAION's ``simple_inference.py`` on OpenAI's ``clip.load`` of a reduced ViT-L/14.
3. The main env: the project's scorers (``spin_diffusion.scoring.build_scorer``) load the same files, with their
   own preprocessing and tokenisation, and the scores are compared (target: max abs difference <= 1e-4). PickScore
   and CLIP score are compared here with the PickScore model card's transformers code.

No weights are downloaded. Parameters are filled by ``fill_params`` from a seed, so the default test suite
(``tests/test_scorer_parity.py``) can rebuild the same checkpoints and compare with the reference scores this script
saves in ``tests/data/scorer_parity`` (``--write-test-data``). Results: docs/SCORER_PARITY.md.

Usage::

    python benchmarks/scorer_parity.py                      # set up envs if needed, run, print the table
    python benchmarks/scorer_parity.py --write-test-data    # ... and refresh tests/data/scorer_parity
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ENVS = Path("~/.cache/spin-diffusion/parity-envs").expanduser()
DEFAULT_WORK = Path("~/.cache/spin-diffusion/parity-work").expanduser()
TEST_DATA = ROOT / "tests" / "data" / "scorer_parity"
TOLERANCE = 1e-4

# One prompt per image. They exercise what differs between tokenisers: case, accents, an HTML entity (open_clip
# unescapes it), curly quotes (ftfy straightens them), runs of whitespace and truncation (> 77 CLIP tokens).
PROMPTS = [
    "a red circle on a blue square",
    "Crème brûlée &amp; an ÉCLAIR, photographed at dusk!",
    "a dog\u2019s \u201cbest\u201d   friend, oil painting",
    "a very " * 40 + "long prompt",
]

# open_clip's ViT-H-14 config (embed 1024, 32 x 1280 vision, 24 x 1024 text) at reduced width and depth; the
# things the scorers depend on are kept: 224 px input, 14 px patches, 77-token context, the 49408-token vocab.
REDUCED_VIT_H_14 = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 96, "heads": 3, "layers": 2},
}
# ImageReward's med_config.json with 2 instead of 12 BERT layers and a smaller MLP; hidden size stays 768 because
# ImageReward hard-codes its reward head as MLP(768).
REDUCED_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 512,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}
# BLIP's ViT-L/16 (1024 wide, 24 blocks, 16 heads: 64 per head) reduced; 64 per head is kept.
REDUCED_BLIP_VIT = {"img_size": 224, "patch_size": 16, "embed_dim": 128, "depth": 2, "num_heads": 2}
# OpenAI's CLIP ViT-L/14 (the aesthetic predictor's backbone: 24 x 1024 vision, 12 x 768 text, 768-d embeddings)
# reduced; the 768-d embedding stays because the LAION head is MLP(768). OpenAI's build_model() infers this from
# the state dict (heads = width / 64).
REDUCED_OPENAI_VIT_L_14 = {
    "embed_dim": 768,
    "image_resolution": 224,
    "vision_layers": 2,
    "vision_width": 128,
    "vision_patch_size": 14,
    "context_length": 77,
    "vocab_size": 49408,
    "transformer_width": 128,
    "transformer_heads": 2,
    "transformer_layers": 2,
}
# preprocessor_config.json of openai/clip-vit-large-patch14 and of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (the
# PickScore processor): the two are identical.
CLIP_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}
SEEDS = {"hpsv2": 1234, "imagereward": 4321, "aesthetic": 2468}

# Pinned reference environments. ``no_deps`` packages are installed with --no-deps because their metadata pins
# things we must not take (hpsv2: pytest==7.2.0, protobuf<4); what they import is listed in ``requirements``.
ENVS = {
    "openclip": {
        "requirements": [
            "torch==2.14.1",
            "torchvision==0.29.1",
            "open_clip_torch==3.3.0",
            "timm==1.0.31",
            "ftfy==6.3.1",
            "regex==2026.11.19",
            "requests==2.34.2",
            "clint==0.5.1",
            "huggingface_hub==2.4.0",
            "numpy==2.4.6",
            "pillow==13.0.0",
        ],
        "no_deps": ["hpsv2==1.2.0"],
        "then": [],
    },
    "imagereward": {
        "requirements": [
            "torch==2.14.1",
            "torchvision==0.29.1",
            "timm==0.6.13",
            "fairscale==0.4.13",
            "transformers==4.36.2",  # ImageReward's med.py imports helpers later transformers moved
            "tokenizers==0.15.2",
            "huggingface_hub==0.36.2",
            "diffusers==0.31.0",  # ImageReward/__init__ imports ReFL -> diffusers; newer ones need transformers 4.4x
            "accelerate==1.15.0",
            "datasets==5.0.1",
            "image-reward==1.5",
            "openai-clip==1.0.1",  # OpenAI's clip package: ImageReward imports it; the aesthetic reference uses it
            "numpy==2.4.6",
            "pillow==13.0.0",
        ],
        "no_deps": [],
        # openai-clip does `from pkg_resources import packaging`, gone from setuptools >= 70; torch 2.14 declares
        # setuptools >= 77 but does not need it at run time, so this goes in as a separate step.
        "then": ["setuptools==69.5.1"],
    },
}


# ----------------------------------------------------------------------------------------------------------
# Inputs shared by every environment (pure numpy / torch, so all envs and the tests compute the same values)


def make_images() -> list[Image.Image]:
    """Four RGB images with integer-formula content: square and non-square, down- and up-scaled, and one already
    224 x 224 (no resize). 200 x 335 resizes to 224 x 375, whose 151 px overhang makes torchvision's centre crop
    (``round(75.5)`` = 76) and a floor-division crop (75) disagree. Exact on every platform, so the test suite
    regenerates them instead of storing files."""
    sizes = [(256, 256), (300, 180), (200, 335), (224, 224)]  # (width, height)
    out = []
    for i, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        r = (x * (3 + i) + y * 5) % 256
        g = (x * y // (7 + i)) % 256
        b = ((x - w // 2) ** 2 + (y - h // 2) ** 2) // (11 + i) % 256
        out.append(Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8)))
    return out


def fill_params(shapes: dict[str, list[int]], seed: int) -> dict:
    """Deterministic parameters for ``{name: shape}``: norm weights 1 + 0.1 N, biases 0.02 N, scalars ln(100)
    (a CLIP logit scale), everything else N / sqrt(fan-in). Drawn in sorted-name order from one generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = list(shapes[name])
        if not shape:
            out[name] = torch.tensor(math.log(100.0))
            continue
        x = torch.randn(shape, generator=g)
        if name.endswith("bias"):
            out[name] = 0.02 * x
        elif len(shape) == 1 and name.endswith("weight"):
            out[name] = 1.0 + 0.1 * x
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            out[name] = x / math.sqrt(fan_in)
    return out


def fingerprint(state: dict) -> float:
    """Sum of |x| over all tensors in float64: a cheap check that two environments generated the same weights."""
    return float(sum(v.double().abs().sum().item() for v in state.values()))


def bert_vocab() -> list[str]:
    """A bert-base-uncased-shaped vocab (30522 entries, [PAD]=0, [UNK]=100 .. [MASK]=103) that covers PROMPTS
    with whole words and word pieces, so [DEC]/[ENC] get ids 30522/30523 as with the real vocab. The real vocab
    cannot be downloaded here; the tokeniser code paths (lower-casing, accent stripping, punctuation split,
    WordPiece, truncation to 35) are the same."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = (
        "a red circle on blue square creme brulee & amp ; an eclair , photographed at dusk ! dog ' s \" best "
        "friend oil painting very long prompt"
    ).split()
    pieces = list("abcdefghijklmnopqrstuvwxyz0123456789") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    for tok in [*words, *pieces, "’", "“", "”"]:
        if tok not in vocab:
            vocab.append(tok)
    vocab += [f"[unused{i}]" for i in range(99, 99 + 30522 - len(vocab))]
    assert len(vocab) == 30522
    return vocab


def write_bert_tokenizer(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def write_clip_tokenizer(folder: Path, vocab: dict[str, int], merges: list[str]) -> Path:
    """A transformers CLIP tokenizer folder (vocab.json + merges.txt), as in laion/CLIP-ViT-H-14-laion2B-s32B-b79K."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------------------------------------
# Stage 1 (openclip env): the official hpsv2 scoring path


def stage_hpsv2(work: Path) -> None:
    import regex
    import torch
    from hpsv2 import img_score
    from hpsv2.src.open_clip import factory
    from hpsv2.src.open_clip import tokenizer as oc_tok

    out = work / "hpsv2"
    out.mkdir(parents=True, exist_ok=True)
    # hpsv2.img_score.initialize_model() hard-codes create_model_and_transforms("ViT-H-14", "laion2B-s32B-b79K",
    # ...), which downloads laion weights that score() then overwrites from cp. We register the reduced config
    # under that name and fill img_score.model_dict with the same call minus the download (pretrained=None).
    factory._MODEL_CONFIGS["ViT-H-14"] = json.loads(json.dumps(REDUCED_VIT_H_14))
    model, _, preprocess_val = factory.create_model_and_transforms(
        "ViT-H-14",
        None,
        precision="amp",
        device="cpu",
        jit=False,
        force_quick_gelu=False,
        force_custom_text=False,
        force_patch_dropout=False,
        force_image_size=None,
        pretrained_image=False,
        image_mean=None,
        image_std=None,
        light_augmentation=True,
        aug_cfg={},
        output_dict=True,
        with_score_predictor=False,
        with_region_predictor=False,
    )
    shapes = {k: list(p.shape) for k, p in model.named_parameters()}
    filled = fill_params(shapes, SEEDS["hpsv2"])
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(filled[k])
    ckpt = out / "HPS_v2_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    (out / "open_clip_config.json").write_text(json.dumps(REDUCED_VIT_H_14, indent=1))
    img_score.model_dict.update(model=model, preprocess_val=preprocess_val)

    images = make_images()
    scores = [
        float(img_score.score(im, p, cp=str(ckpt), hps_version="v2.0")[0])
        for im, p in zip(images, PROMPTS, strict=True)
    ]

    # The tokenizer hpsv2 uses, as a transformers CLIP tokenizer folder (same BPE file, same ids), and the subset of
    # it that PROMPTS need (kept in the test data: merges a prompt uses, in rank order, give the same BPE).
    tok = oc_tok.SimpleTokenizer()
    vocab = {
        {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}.get(k, k): v
        for k, v in tok.encoder.items()
    }
    ranked = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    write_clip_tokenizer(out / "tokenizer", vocab, [f"{a} {b}" for a, b in ranked])
    used = set()
    # open_clip-cleaned text (HPSv2) and raw text (PickScore / CLIP score tokenise without open_clip's cleaning)
    texts = [oc_tok.whitespace_clean(oc_tok.basic_clean(t)).lower() for t in PROMPTS]
    texts += [oc_tok.whitespace_clean(t).lower() for t in PROMPTS]
    for text in texts:
        for piece in regex.findall(tok.pat, text):
            word = [tok.byte_encoder[b] for b in piece.encode("utf-8")]
            word[-1] += "</w>"
            while len(word) > 1:
                best = min(zip(word, word[1:], strict=False), key=lambda pair: tok.bpe_ranks.get(pair, math.inf))
                if best not in tok.bpe_ranks:
                    break
                used.add(best)
                merged, i = [], 0
                while i < len(word):
                    if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                        merged.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = merged
    base = set(tok.byte_encoder.values()) | {c + "</w>" for c in tok.byte_encoder.values()}
    keep = base | {a + b for a, b in used} | {"<|startoftext|>", "<|endoftext|>"}
    sub_vocab = {k: v for k, v in vocab.items() if k in keep}
    sub_merges = [f"{a} {b}" for a, b in ranked if (a, b) in used]
    write_clip_tokenizer(out / "tokenizer_subset", sub_vocab, sub_merges)

    # What the official path feeds the model, for diagnosing a difference.
    pixels = torch.stack([preprocess_val(im) for im in images])
    torch.save({"pixels": pixels, "tokens": img_score.get_tokenizer("ViT-H-14")(PROMPTS)}, out / "official_inputs.pt")

    # The project's open_clip backend (open_clip_torch) on the same checkpoint, in this env.
    import open_clip

    open_clip.factory._MODEL_CONFIGS["ViT-H-14-parity"] = json.loads(json.dumps(REDUCED_VIT_H_14))
    sys.path.insert(0, str(ROOT / "src"))
    from spin_diffusion.scorers.hpsv2 import HPSv2Scorer

    scorer = HPSv2Scorer(f"ckpt={ckpt},backend=open_clip,arch=ViT-H-14-parity")
    project_open_clip = [float(s) for s in scorer(images, PROMPTS)]
    result = {
        "scores": scores,
        "project_open_clip": project_open_clip,
        "param_shapes": shapes,
        "seed": SEEDS["hpsv2"],
        "fingerprint": fingerprint(filled),
        "versions": _versions(["torch", "torchvision", "hpsv2", "open_clip_torch", "timm", "ftfy"]),
    }
    (out / "reference.json").write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------------------------------------
# Stage 2 (imagereward env): the official ImageReward loader and score()


def stage_imagereward(work: Path, *, reduced_vit: bool) -> None:
    """``reduced_vit=False``: ImageReward exactly as shipped (BLIP ViT-L/16, 24 x 1024) with the reduced
    ``med_config.json``; ``True``: BLIP's ``VisionTransformer`` at ``REDUCED_BLIP_VIT`` (small enough for the
    default test suite to rebuild)."""
    import torch
    import transformers

    out = work / ("imagereward_small" if reduced_vit else "imagereward")
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = write_bert_tokenizer(out / "tokenizer")
    # BLIP's init_tokenizer() calls BertTokenizer.from_pretrained("bert-base-uncased") (a hub download); point that
    # one name at the local vocab. Everything else of the tokeniser is ImageReward's own code.
    original = transformers.BertTokenizer.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        return original(cls, str(tok_dir) if name == "bert-base-uncased" else name, *args, **kwargs)

    transformers.BertTokenizer.from_pretrained = classmethod(from_pretrained)
    import ImageReward as RM
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    # ImageReward hard-codes BLIP_Pretrain(vit="large"); the reduced ViT is BLIP's own VisionTransformer class.
    def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        cfg = dict(REDUCED_BLIP_VIT, img_size=image_size)
        return VisionTransformer(**cfg, drop_path_rate=0.1), cfg["embed_dim"]

    if reduced_vit:
        blip_pretrain.create_vit = create_vit
    med = out / "med_config.json"
    med.write_text(json.dumps(REDUCED_MED_CONFIG, indent=1))
    model = RM.ImageReward(med_config=str(med), device="cpu")
    shapes = {k: list(p.shape) for k, p in model.named_parameters()}
    seed = SEEDS["imagereward"] + int(reduced_vit)
    filled = fill_params(shapes, seed)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(filled[k])
    ckpt = out / "ImageReward.pt"
    torch.save(model.state_dict(), ckpt)

    loaded = RM.load(
        str(ckpt), device="cpu", med_config=str(med)
    )  # the official loader (load_state_dict strict=False)
    saved = model.state_dict()
    assert set(loaded.state_dict()) == set(saved), "official loader built a different architecture"
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items()), "official loader lost weights"
    images = make_images()
    with torch.no_grad():
        scores = [float(loaded.score(p, im)) for im, p in zip(images, PROMPTS, strict=True)]
        tokens = loaded.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35)["input_ids"]
        pixels = torch.stack([loaded.preprocess(im) for im in images])
    torch.save({"pixels": pixels, "tokens": torch.tensor(tokens)}, out / "official_inputs.pt")
    result = {
        "scores": scores,
        "param_shapes": shapes,
        "seed": seed,
        "fingerprint": fingerprint(filled),
        "vision": REDUCED_BLIP_VIT if reduced_vit else "BLIP ViT-L/16 as shipped (create_vit('large', 224))",
        "versions": _versions(["torch", "torchvision", "image-reward", "timm", "transformers", "fairscale"]),
    }
    (out / "reference.json").write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------------------------------------
# Stage 2b (imagereward env, which has OpenAI's ``clip``): LAION's improved-aesthetic-predictor


def stage_aesthetic(work: Path) -> None:
    """LAION's ``simple_inference.py``: ``clip.load`` (OpenAI's loader and preprocessing) -> ``encode_image`` ->
    numpy L2 normalisation -> the MLP head, with the ``.pth`` head file loaded as LAION does."""
    import clip
    import torch
    from ImageReward.models.AestheticScore import MLP  # LAION's MLP class, as ImageReward ships it

    out = work / "aesthetic"
    out.mkdir(parents=True, exist_ok=True)
    model = clip.model.CLIP(**REDUCED_OPENAI_VIT_L_14)
    shapes = {k: list(p.shape) for k, p in model.named_parameters()}
    # OpenAI's checkpoints are fp16 and clip.load() rounds whatever it loads to fp16 (build_model ->
    # convert_weights) before .float() on CPU, so the weights are made fp16-exact.
    filled = openai_clip_params(shapes, SEEDS["aesthetic"])
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(filled[k])
    # OpenAI ships TorchScript archives and clip.load() reads them with torch.jit.load (its fallback to a plain
    # state dict re-reads an already consumed file handle and fails), so the model is traced and saved that way.
    ckpt = out / "ViT-L-14.pt"
    example = (torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long))
    torch.jit.save(torch.jit.trace(model.eval(), example, check_trace=False), str(ckpt))
    mlp = MLP(768)
    mlp_shapes = {k: list(p.shape) for k, p in mlp.named_parameters()}
    head = fill_params(mlp_shapes, SEEDS["aesthetic"] + 1)
    torch.save(head, out / "sac+logos+ava1-l14-linearMSE.pth")

    # simple_inference.py, on the CPU
    model2, preprocess = clip.load(str(ckpt), device="cpu", jit=False)
    model = MLP(768)
    model.load_state_dict(torch.load(out / "sac+logos+ava1-l14-linearMSE.pth"))
    model.eval()

    def normalized(a, axis=-1, order=2):
        l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
        l2[l2 == 0] = 1
        return a / np.expand_dims(l2, axis)

    scores = []
    for pil_image in make_images():
        image = preprocess(pil_image).unsqueeze(0)
        with torch.no_grad():
            image_features = model2.encode_image(image)
        im_emb_arr = normalized(image_features.cpu().detach().numpy())
        with torch.no_grad():
            prediction = model(torch.from_numpy(im_emb_arr).type(torch.FloatTensor))
        scores.append(float(prediction.item()))
    pixels = torch.stack([preprocess(im) for im in make_images()])
    torch.save({"pixels": pixels}, out / "official_inputs.pt")
    result = {
        "scores": scores,
        "param_shapes": shapes,
        "mlp_shapes": mlp_shapes,
        "seed": SEEDS["aesthetic"],
        "fingerprint": fingerprint(filled) + fingerprint(head),
        "versions": _versions(["torch", "torchvision", "openai-clip", "image-reward"]),
    }
    (out / "reference.json").write_text(json.dumps(result, indent=1))


def openai_clip_params(shapes: dict[str, list[int]], seed: int) -> dict:
    """``fill_params`` rounded to fp16 (OpenAI CLIP checkpoints are fp16; see ``stage_aesthetic``)."""
    import torch

    return {k: v.to(torch.float16).to(torch.float32) for k, v in fill_params(shapes, seed).items()}


OPENAI_CFG = {"quick_gelu": True, "vision_cfg": {"head_width": 64}, "text_cfg": {"heads": 2}}  # build_model(): /64


def write_hf_clip(state: dict, folder: Path, cfg: dict) -> Path:
    """An OpenAI- or open_clip-format CLIP state dict -> a transformers ``CLIPModel`` folder with the
    ``CLIP_PREPROCESSOR`` image-processor config (main env). OpenAI and open_clip share key names, so the project's
    exact converter is used, as HF's own conversion script maps them; ``cfg`` gives heads and activation."""
    from transformers import CLIPModel

    from spin_diffusion.scorers.hpsv2 import clip_config_from_open_clip, open_clip_to_transformers

    state = {k: v for k, v in state.items() if k != "attn_mask"}
    model = CLIPModel(clip_config_from_open_clip(state, cfg))
    missing, unexpected = model.load_state_dict(open_clip_to_transformers(state), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=1))
    return folder


def _versions(names: list[str]) -> dict[str, str]:
    from importlib.metadata import version

    return {n: version(n) for n in names}


# ----------------------------------------------------------------------------------------------------------
# Stage 3 (main env): the project's scorers on the same files; PickScore and CLIP score against their reference
# code (transformers), which runs here


def pickscore_model_card(model_dir: Path, processor_dir: Path, images, prompts) -> tuple[list[float], list[float]]:
    """The PickScore model card's inference code, one prompt with its image at a time (transformers >= 5 returns
    an output object from ``get_*_features``; its ``pooler_output`` is the projected embedding). Returns
    (PickScores, cosines)."""
    import torch
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(processor_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    out, cosines = [], []
    for image, prompt in zip(images, prompts, strict=True):
        image_inputs = processor(images=[image], padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            image_embs = _pooled(model.get_image_features(**image_inputs))
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = _pooled(model.get_text_features(**text_inputs))
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
        out.append(float(scores[0]))
        cosines.append(float((text_embs @ image_embs.T)[0, 0]))
    return out, cosines


def _pooled(out):
    return out if hasattr(out, "norm") else out.pooler_output


def write_pickscore_folder(state: dict, cfg: dict, folder: Path, tokenizer_dir: Path) -> Path:
    """A PickScore-layout folder (transformers CLIP + laion ViT-H-14 processor) from an open_clip state dict."""
    write_hf_clip(state, folder, cfg)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, folder / f)
    return folder


def stage_compare(work: Path) -> dict:
    import torch

    from spin_diffusion.scoring import build_scorer

    images = make_images()
    report = {}
    specs = {
        "hpsv2": "ckpt={d}/HPS_v2_compressed.pt,tokenizer={d}/tokenizer,config={d}/open_clip_config.json",
        "imagereward": "{d}",
        "imagereward_small": "{d}",
        "aesthetic": "clip={d}/hf,mlp={d}/sac+logos+ava1-l14-linearMSE.pth",
    }
    for name, spec in specs.items():
        folder = work / name
        ref = json.loads((folder / "reference.json").read_text())
        if name == "aesthetic":
            shutil.rmtree(folder / "hf", ignore_errors=True)
            state = openai_clip_params(ref["param_shapes"], ref["seed"])
            write_hf_clip(state, folder / "hf", OPENAI_CFG)
        t0 = time.perf_counter()
        scorer = build_scorer(name.removesuffix("_small"), spec.format(d=folder))
        ours = [float(s) for s in scorer(images, PROMPTS)]
        entry = _entry(ref["scores"], ours, ref["versions"])
        entry["project_s"] = round(time.perf_counter() - t0, 1)
        if "project_open_clip" in ref:
            entry["project_open_clip_backend"] = ref["project_open_clip"]
            entry["max_abs_diff_open_clip_backend"] = _max_diff(ref["project_open_clip"], ref["scores"])
        official = torch.load(folder / "official_inputs.pt", weights_only=True)
        if "tokens" in official:
            entry["tokens_match"] = _tokens_match(name, scorer, official["tokens"])
        report[name] = entry

    # PickScore and CLIP score: the HPSv2 model (a reduced ViT-H-14) as a transformers CLIP folder with the laion
    # processor, scored by the model card's code and by the project.
    hps = work / "hpsv2"
    state = torch.load(hps / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    folder = work / "pickscore"
    shutil.rmtree(folder, ignore_errors=True)
    write_pickscore_folder(state, REDUCED_VIT_H_14, folder, hps / "tokenizer")
    reference, cosines = pickscore_model_card(folder, folder, images, PROMPTS)
    ours = [float(s) for s in build_scorer("pickscore", str(folder))(images, PROMPTS)]
    report["pickscore"] = _entry(reference, ours, _versions(["transformers", "tokenizers"]))
    clip_ref = [100.0 * max(c, 0.0) for c in cosines]  # torchmetrics' CLIPScore convention
    ours = [float(s) for s in build_scorer("clip", str(folder))(images, PROMPTS)]
    report["clip"] = _entry(clip_ref, ours, _versions(["transformers", "tokenizers"]))
    return report


def _max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def _entry(official, ours, versions) -> dict:
    return {"official": official, "project": ours, "max_abs_diff": _max_diff(official, ours), "versions": versions}


def _tokens_match(name, scorer, official_tokens) -> list[bool]:
    """Whether the project's token ids equal the official ones (open_clip pads with 0, the laion transformers
    tokenizer with <|endoftext|>; the padding is masked / after the pooled token either way)."""
    if name == "hpsv2":
        from spin_diffusion.scorers.hpsv2 import open_clip_clean

        texts = [open_clip_clean(p) for p in PROMPTS]
        ours = scorer.tokenizer(texts, padding="max_length", truncation=True, max_length=77)["input_ids"]
        ours = [[t if i <= a.index(49407) else 0 for i, t in enumerate(a)] for a in ours]
    else:
        ours = scorer.tokenizer(list(PROMPTS), padding="max_length", truncation=True, max_length=35)["input_ids"]
    return [list(a) == [int(t) for t in b] for a, b in zip(ours, official_tokens.tolist(), strict=True)]


# ----------------------------------------------------------------------------------------------------------
# Environments


def ensure_env(envs: Path, name: str) -> Path:
    """Create ``envs/name`` with ``python3 -m venv`` and install the pinned requirements (skipped when the marker
    file says they are already installed)."""
    spec = ENVS[name]
    env = envs / name
    python = env / "bin" / "python"
    marker = env / ".parity-requirements.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec and python.is_file():
        return python
    envs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3", "-m", "venv", str(env)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *spec["requirements"]], check=True)
    if spec["no_deps"]:
        subprocess.run([*pip, "--no-deps", *spec["no_deps"]], check=True)
    if spec["then"]:
        subprocess.run([*pip, *spec["then"]], check=True)
    if name == "openclip":  # the hpsv2 1.2.0 wheel lacks its BPE vocab file; it is open_clip's, byte for byte
        site = Path(
            subprocess.run(
                [str(python), "-c", "import open_clip, os; print(os.path.dirname(open_clip.__file__))"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
        target = site.parent / "hpsv2" / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"
        if not target.is_file():
            shutil.copy(site / "bpe_simple_vocab_16e6.txt.gz", target)
    marker.write_text(json.dumps(spec))
    return python


def write_test_data(work: Path, report: dict, dest: Path = TEST_DATA) -> None:
    """What tests/test_scorer_parity.py needs to rebuild the checkpoints and check the project against the official
    scores: configs, parameter shapes, seeds, fingerprints and scores (a few kB), plus the CLIP tokenizer subset."""
    data = {"prompts": PROMPTS, "tolerance": TOLERANCE}
    keys = ("scores", "param_shapes", "seed", "fingerprint", "versions")
    hps = json.loads((work / "hpsv2" / "reference.json").read_text())
    data["hpsv2"] = {"open_clip_config": REDUCED_VIT_H_14, **{k: hps[k] for k in (*keys, "project_open_clip")}}
    ir = json.loads((work / "imagereward_small" / "reference.json").read_text())
    data["imagereward"] = {"med_config": REDUCED_MED_CONFIG, **{k: ir[k] for k in keys}}
    ae = json.loads((work / "aesthetic" / "reference.json").read_text())
    data["aesthetic"] = {"mlp_shapes": ae["mlp_shapes"], **{k: ae[k] for k in keys}}
    for name in ("pickscore", "clip"):
        data[name] = {"scores": report[name]["official"], "versions": report[name]["versions"]}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "reference.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (dest / "clip_tokenizer").mkdir(exist_ok=True)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(work / "hpsv2" / "tokenizer_subset" / f, dest / "clip_tokenizer" / f)


# stage -> (environment, function run there)
STAGES = {
    "hpsv2": ("openclip", stage_hpsv2),
    "imagereward": ("imagereward", lambda work: stage_imagereward(work, reduced_vit=False)),
    "imagereward_small": ("imagereward", lambda work: stage_imagereward(work, reduced_vit=True)),
    "aesthetic": ("imagereward", stage_aesthetic),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", type=Path, default=DEFAULT_ENVS, help="where the reference venvs live")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="checkpoints and reference outputs")
    parser.add_argument("--write-test-data", action="store_true", help=f"refresh {TEST_DATA.relative_to(ROOT)}")
    parser.add_argument("--stage", choices=tuple(STAGES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        STAGES[args.stage][1](args.work)
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    timings = {}
    for stage, (env, _) in STAGES.items():
        t0 = time.perf_counter()
        python = ensure_env(args.envs, env)
        timings[f"setup_{env}_s"] = timings.get(f"setup_{env}_s", 0) + round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        subprocess.run([str(python), __file__, "--stage", stage, "--work", str(args.work)], check=True)
        timings[f"reference_{stage}_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    report = stage_compare(args.work)
    timings["project_scorers_s"] = round(time.perf_counter() - t0, 1)
    report["timings"] = timings
    report["main_env"] = _versions(["torch", "transformers", "tokenizers", "pillow"])
    report["python"] = platform.python_version()
    (args.work / "parity_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    if args.write_test_data:
        write_test_data(args.work, report)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    worst = {k: v["max_abs_diff"] for k, v in report.items() if isinstance(v, dict) and "max_abs_diff" in v}
    print("max abs diff per scorer:", worst)
    return 0 if all(d <= TOLERANCE for d in worst.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
