"""Every scorer against its official implementation, through the reference outputs of benchmarks/scorer_parity.py.

That script ran the official code in its own environments (``hpsv2.img_score.score``, ``ImageReward.load`` +
``score``, LAION's aesthetic ``simple_inference.py`` on OpenAI's ``clip.load``) on random-weight models of the real
architectures at reduced width, with weights drawn by ``fill_params`` from a seed. ``tests/data/scorer_parity/
reference.json`` keeps the configs, parameter shapes, seeds, weight fingerprints and the official scores; here the
same checkpoints are rebuilt and the project's scorers, preprocessing and tokenisation included, must give those
scores within 1e-4 (docs/SCORER_PARITY.md). PickScore and CLIP score run their reference code (the PickScore model
card's transformers path) right here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("transformers")

from spin_diffusion import scoring as ev  # noqa: E402
from spin_diffusion.scorers import _common, hpsv2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "scorer_parity"
REF = json.loads((DATA / "reference.json").read_text(encoding="utf-8"))
TOL = REF["tolerance"]


def _parity_module():
    spec = importlib.util.spec_from_file_location("scorer_parity", ROOT / "benchmarks" / "scorer_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sp = _parity_module()


def _close_to_official(scores: torch.Tensor, official: list[float]) -> None:
    torch.testing.assert_close(scores, torch.tensor(official, dtype=torch.float32), rtol=0, atol=TOL)


def _rebuild(entry: dict, *, fp16: bool = False, seed_offset: int = 0, shapes_key: str = "param_shapes") -> dict:
    fill = sp.openai_clip_params if fp16 else sp.fill_params
    return fill(entry[shapes_key], entry["seed"] + seed_offset)


@pytest.fixture(scope="module")
def images():
    return sp.make_images()


@pytest.fixture(scope="module")
def hps_state() -> dict:
    state = _rebuild(REF["hpsv2"])
    # the same weights the official run scored (torch's CPU generator is stable across versions; this says so)
    assert sp.fingerprint(state) == pytest.approx(REF["hpsv2"]["fingerprint"], rel=1e-9)
    return state


def test_inputs_are_the_recorded_ones():
    assert sp.PROMPTS == REF["prompts"]
    assert sp.REDUCED_VIT_H_14 == REF["hpsv2"]["open_clip_config"]
    assert sp.REDUCED_MED_CONFIG == REF["imagereward"]["med_config"]


def test_hpsv2_matches_hpsv2_package(hps_state, images, tmp_path, monkeypatch):
    """hpsv2 1.2.0 ``img_score.score`` (its preprocess_val and open_clip tokenizer) vs the transformers backend."""
    monkeypatch.setitem(sys.modules, "open_clip", None)
    torch.save({"state_dict": hps_state}, tmp_path / "HPS_v2_compressed.pt")
    (tmp_path / "open_clip_config.json").write_text(json.dumps(REF["hpsv2"]["open_clip_config"]))
    shutil.copytree(DATA / "clip_tokenizer", tmp_path / "tokenizer")
    scorer = ev.build_scorer("hpsv2", str(tmp_path), batch_size=3)
    assert scorer.backend == "transformers"
    _close_to_official(scorer(images, REF["prompts"]), REF["hpsv2"]["scores"])


def test_hpsv2_open_clip_backend_was_checked_against_hpsv2():
    """The open_clip backend needs open_clip_torch (and so torchvision), absent here; the parity script ran it in
    its open_clip environment on the same checkpoint and recorded the scores."""
    ref = REF["hpsv2"]
    assert ref["versions"]["open_clip_torch"]
    _close_to_official(torch.tensor(ref["project_open_clip"]), ref["scores"])


def test_hpsv2_prompt_cleaning_is_open_clips():
    # what open_clip's basic_clean + whitespace_clean do to prompts (ftfy's quote straightening, HTML unescaping
    # twice, whitespace runs); the transformers tokenizer would otherwise see "&amp;" and curly quotes
    assert hpsv2.open_clip_clean("  a dog\u2019s \u201cbest\u201d &amp;amp;\n friend ") == 'a dog\'s "best" & friend'


def test_hpsv2_preprocessing_resizes_the_float_tensor():
    # 300 x 180 -> 224 x 134 (bicubic, antialiased, on the float tensor) -> zero rows 45 above, 45 below
    image = sp.make_images()[1]
    x = _common.resize_max_pad_tensor(image, 224)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert (x[:, :45] == 0).all() and (x[:, 45 + 134 :] == 0).all() and (x[:, 45:179] != 0).any()
    # bicubic overshoot is kept (torchvision does not clamp float tensors); a PIL resize would clip it to [0, 1]
    assert x.min() < 0 or x.max() > 1
    # already 224 on the long side: no resize, no padding
    square = sp.make_images()[3]
    torch.testing.assert_close(_common.resize_max_pad_tensor(square, 224), _common.pil_to_tensor([square])[0])


def test_imagereward_matches_imagereward_package(images, tmp_path):
    """ImageReward 1.5 ``load`` + ``score`` (BLIP ViT reduced, reduced med_config) vs the project's BLIP port."""
    ref = REF["imagereward"]
    state = _rebuild(ref)
    assert sp.fingerprint(state) == pytest.approx(ref["fingerprint"], rel=1e-9)
    torch.save(state, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(ref["med_config"]))
    sp.write_bert_tokenizer(tmp_path / "tokenizer")
    scorer = ev.build_scorer("imagereward", str(tmp_path), batch_size=3)
    _close_to_official(scorer(images, REF["prompts"]), ref["scores"])


def test_aesthetic_matches_laion_inference(images, tmp_path):
    """LAION's simple_inference.py (OpenAI ``clip.load`` + its preprocess, numpy L2 norm, MLP) vs the project."""
    ref = REF["aesthetic"]
    state = _rebuild(ref, fp16=True)
    head = _rebuild(ref, seed_offset=1, shapes_key="mlp_shapes")
    assert sp.fingerprint(state) + sp.fingerprint(head) == pytest.approx(ref["fingerprint"], rel=1e-9)
    sp.write_hf_clip(state, tmp_path / "clip", sp.OPENAI_CFG)
    (tmp_path / "mlp").mkdir()
    torch.save(head, tmp_path / "mlp" / "sac+logos+ava1-l14-linearMSE.pth")
    scorer = ev.build_scorer("aesthetic", str(tmp_path))
    _close_to_official(scorer(images, REF["prompts"]), ref["scores"])


def test_pickscore_and_clip_score_match_the_model_card(hps_state, images, tmp_path):
    """The PickScore model card's code (AutoProcessor, normalised embeddings, ``logit_scale.exp()``) on a reduced
    ViT-H-14 with the laion processor; CLIP score is ``100 * max(cos, 0)`` of the same embeddings."""
    folder = sp.write_pickscore_folder(hps_state, sp.REDUCED_VIT_H_14, tmp_path / "pick", DATA / "clip_tokenizer")
    reference, cosines = sp.pickscore_model_card(folder, folder, images, REF["prompts"])
    _close_to_official(torch.tensor(reference), REF["pickscore"]["scores"])  # the reference itself is stable
    pick = ev.build_scorer("pickscore", str(folder), batch_size=3)(images, REF["prompts"])
    _close_to_official(pick, reference)
    clip = ev.build_scorer("clip", str(folder), batch_size=3)(images, REF["prompts"])
    _close_to_official(clip, [100.0 * max(c, 0.0) for c in cosines])
    _close_to_official(clip, REF["clip"]["scores"])
