"""card.py: the model card of an exported folder (metadata, training, evaluation, usage); save_pipeline writes it."""

from __future__ import annotations

import dataclasses

import yaml

from spin_diffusion import card, export, presets
from spin_diffusion.config import load_config


def _info(**changes) -> card.CardInfo:
    info = card.CardInfo(
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        objective="spin_approx",
        iteration=2,
        steps=500,
        data_size=10000,
        beta=2000.0,
        learning_rate=2e-5,
        batch_size=8,
        resolution=512,
        license="creativeml-openrail-m",
        evaluation={"pickscore": 21.4567, "pickscore_win_rate": 0.61, "fd": None},
        eval_prompts=500,
    )
    return dataclasses.replace(info, **changes)


def test_render_card_metadata_training_evaluation_usage():
    text = card.render_card(_info())
    meta = card.read_metadata_text(text)
    assert meta == {
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "license": "creativeml-openrail-m",
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["diffusers", "text-to-image", "spin-diffusion", "spin-approx", "stable-diffusion"],
    }
    assert "| β | 2000.0 |" in text and "| iteration | 2 |" in text and "| optimizer steps | 500 |" in text
    assert "| training data | 10000 images with captions |" in text
    assert "| pickscore | 21.46 |" in text and "| pickscore_win_rate | 0.61 |" in text and "| fd | – |" in text
    assert "500 prompts" in text
    assert 'DiffusionPipeline.from_pretrained("path/to/this/folder")' in text


def test_render_card_without_hub_base_license_or_evaluation(tmp_path):
    text = card.render_card(
        _info(
            base_model=str(tmp_path),
            license=None,
            evaluation={},
            objective="sft",
            beta=None,
            lora_rank=4,
            pixel_space=True,
        )
    )
    meta = card.read_metadata_text(text)
    assert "base_model" not in meta and "license" not in meta  # a local path is not a Hub id
    assert meta["pipeline_tag"] == "text-to-image" and "sft" in meta["tags"]
    assert str(tmp_path) in text and "β" not in text and "Not evaluated" in text
    assert "LoRA rank 4, merged" in text and "vae=None" in text


def test_card_info_from_config_reads_the_base_license(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: openrail\ntags: [x]\n---\n# base\n")
    cfg = load_config(None, [f"model.path={base}", "loss.objective=spin_exact", "loss.beta=5000"])
    info = card.card_info(cfg, iteration=1, steps=40, data_size=256, resolution=32)
    assert info.license == "openrail" and info.base_model == "a local model (base)" and info.beta == 5000.0
    assert info.objective == "spin_exact" and info.steps == 40 and info.data_size == 256
    assert info.sft_weight == 0.0 and "SFT weight" not in card.render_card(info)
    assert card.base_license(tmp_path) is None  # no README.md


def test_card_shows_the_schedule_values_of_its_iteration():
    cfg = load_config(None, ["num_iterations=3", "loss.beta=[5000,2500]", "train.learning_rate=[3e-5,2e-5,1e-5]"])
    infos = [card.card_info(cfg, iteration=k, steps=10, data_size=16) for k in (1, 2, 3)]
    assert [i.beta for i in infos] == [5000.0, 2500.0, 2500.0]
    assert [i.learning_rate for i in infos] == [3e-5, 2e-5, 1e-5]


def test_card_names_a_nonzero_sft_weight():
    cfg = load_config(None, ["loss.sft_weight=1250"])
    text = card.render_card(card.card_info(cfg, iteration=1, steps=10, data_size=16))
    assert "| SFT weight λ (loss + λ · denoising error on the real images) | 1250.0 |" in text


def test_card_says_when_the_weights_are_an_ema():
    text = card.render_card(card.card_info(load_config(None, ["train.ema_decay=0.999"]), iteration=1, steps=10,
                                           data_size=16))  # fmt: skip
    assert "| weights saved | their exponential moving average, decay 0.999 (diffusers' EMAModel) |" in text
    assert "weights saved" not in card.render_card(card.card_info(load_config(None, []), iteration=1, steps=10,
                                                                  data_size=16))  # fmt: skip


def test_save_pipeline_writes_the_card(tmp_path):
    c = presets.build_preset("tiny", seed=0)
    out = export.save_pipeline(c, tmp_path / "model", card=_info())
    text = (out / "README.md").read_text()
    assert yaml.safe_load(text.split("---")[1])["library_name"] == "diffusers"
    assert ("vae=None" in text) == (c.vae is None)  # how to load it depends on whether there is a VAE
    assert not (export.save_pipeline(c, tmp_path / "plain") / "README.md").exists()
