"""The demo pipeline end to end, shrunk (fewer images and steps) so that it runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spin_diffusion.cli import main
from spin_diffusion.config import SampleConfig
from spin_diffusion.demo import runner
from spin_diffusion.errors import SpinDiffusionError


@pytest.fixture
def small_demo(monkeypatch):
    monkeypatch.setattr(runner, "PRETRAIN_IMAGES", 64)
    monkeypatch.setattr(runner, "FINETUNE_PAIRS", 16)
    monkeypatch.setattr(runner, "EVAL_PROMPTS", 8)
    monkeypatch.setattr(runner, "PAIRS_PER_STEP", 4)
    monkeypatch.setattr(runner, "SAMPLE", SampleConfig(num_steps=3, guidance_scale=3.0, batch_size=16, shard_size=8))


def test_demo_end_to_end_and_rerun_continues(tmp_path, small_demo, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as with the default "demo_run"
    out = Path("demo_run")
    assert main(["demo", "--out", str(out), "--scale", "0.02"]) == 0, capsys.readouterr().err
    report = out / "report.html"
    assert report.exists()
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base", "sft", "spin iter 1", "spin iter 2"]
    for model in results["models"]:
        assert 0.0 <= model["metrics"]["shapes_judge"] <= 1.0
        assert 0.0 <= model["metrics"]["win_rate_vs_base"] <= 1.0
        assert model["metrics"]["fd"] >= 0.0
    assert results["models"][0]["metrics"]["win_rate_vs_base"] == 0.5  # the base against itself: all ties
    html = report.read_text()
    assert "SFT vs SPIN-Diffusion" in html and "data:image/png;base64," in html
    # every image of the report resolves: 2 plots + one sample grid per model, none missing
    assert "not found" not in html
    assert html.count('<img class="grid"') == 4 and html.count('<img class="plot"') == 2
    for model in results["models"]:
        assert (out / model["grid"]).is_file() and not Path(model["grid"]).is_absolute()
    xs = {m["name"]: m["step"] for m in results["models"]}
    assert xs["base"] == 0 < xs["spin iter 1"] < xs["spin iter 2"] == xs["sft"]  # optimizer steps, not iterations
    assert results["x_label"].startswith("optimizer steps")

    base_model = out / "base" / "iter_01" / "model" / "model_index.json"
    stamp = base_model.stat().st_mtime_ns
    runner.run_demo(out, scale=0.02, progress=False)  # a rerun continues: nothing is retrained
    assert "continuing the demo" in capsys.readouterr().out
    assert base_model.stat().st_mtime_ns == stamp

    with pytest.raises(SpinDiffusionError, match="seed"):
        runner.run_demo(out, seed=1, scale=0.02, progress=False)


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SpinDiffusionError, match="holds no demo"):
        runner.run_demo(tmp_path, scale=0.02, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
