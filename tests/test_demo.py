"""The demo pipeline end to end, shrunk (fewer images, steps and evaluation prompts) so that it runs in seconds."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from spin_diffusion import relation_world, world
from spin_diffusion.cli import main
from spin_diffusion.config import SampleConfig
from spin_diffusion.demo import runner
from spin_diffusion.errors import SpinDiffusionError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_demo(monkeypatch):
    monkeypatch.setattr(runner, "PRETRAIN_IMAGES", 64)
    monkeypatch.setattr(runner, "FINETUNE_PAIRS", 16)
    monkeypatch.setattr(runner, "EVAL_PER_SCENE", 1)
    monkeypatch.setattr(runner, "EVAL_SAMPLE", dict(num_steps=3, guidance_scale=3.0))
    monkeypatch.setattr(runner, "PAIRS_PER_STEP", 4)
    monkeypatch.setattr(runner, "SAMPLE", SampleConfig(num_steps=3, guidance_scale=3.0, batch_size=16, shard_size=8))


@pytest.mark.heavy
def test_demo_end_to_end_two_seeds_and_rerun_continues(tmp_path, small_demo, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as with the default "demo_run"
    out = Path("demo_run")
    argv = ["demo", "--out", str(out), "--scale", "0.05", "--seeds", "2", "--sft-then-spin"]
    assert main(argv) == 0, capsys.readouterr().err
    report = out / "report.html"
    assert report.exists()
    results = json.loads((out / "results.json").read_text())
    names = ["base", "sft", "spin iter 1", "spin iter 2", "spin iter 3", "sft then spin"]
    assert [m["name"] for m in results["models"]] == names
    for model in results["models"]:
        for key in ("shapes_judge", "shapes_color", "win_rate_vs_base", "fd"):
            assert len(model["per_seed"][key]) == 2  # every metric: both seeds, their mean and their spread
            assert model["metrics"][key] == pytest.approx(sum(model["per_seed"][key]) / 2)
            assert model["spread"][key] >= 0.0
        assert 0.0 <= model["metrics"]["shapes_judge"] <= 1.0
    assert results["models"][0]["per_seed"]["win_rate_vs_base"] == [0.5, 0.5]  # the base against itself
    assert sorted(results["per_seed"]) == ["0", "1"]

    # starts from the shipped base; evaluates on held-out test scenes, never on a fine-tuning caption
    train = {s.caption for s in world.split_scenes("train")}
    finetune = {json.loads(line)["text"] for line in (out / "world" / "finetune" / "metadata.jsonl").open()}
    assert finetune <= train
    evaluated = json.loads((out / "seed_0" / "eval" / "sft.json").read_text())
    assert evaluated["model"].endswith("model") and len(evaluated["prompts"]) == 12
    assert set(evaluated["prompts"]) == {s.caption for s in world.split_scenes("test")}
    base_eval = json.loads((out / "seed_1" / "eval" / "base.json").read_text())
    assert Path(base_eval["model"]) == runner.SHIPPED_BASE
    assert not (out / "base").exists()  # nothing pretrained

    html = report.read_text()
    assert "SFT vs SPIN-Diffusion" in html and "data:image/png;base64," in html
    assert "±" in html and "standard deviation over 2 seeds" in html
    assert "not found" not in html
    assert html.count('<img class="grid"') == 6 and html.count('<img class="plot"') == 2
    assert "SFT vs sft then spin differ by" in html
    for model in results["models"]:
        assert (out / model["grid"]).is_file() and not Path(model["grid"]).is_absolute()
    xs = {m["name"]: m["step"] for m in results["models"]}
    assert xs["base"] == 0 < xs["spin iter 1"] < xs["spin iter 2"] < xs["spin iter 3"] == xs["sft"]
    assert xs["sft then spin"] == xs["sft"]
    # SFT, then SPIN: half of SFT's steps (6 -> 3), then 3 SPIN iterations of 1 step from that model
    then = out / "seed_0" / "sft_then_spin"
    assert json.loads((then / "sft" / "state.json").read_text())["info"]["train:1"]["steps"] == 3
    spin_cfg = (then / "spin" / "config.yaml").read_text()
    assert str((then / "sft" / "iter_01" / "model").resolve()) in str(
        Path(spin_cfg.split("path: ")[1].split()[0]).resolve()
    )

    spin_model = out / "seed_1" / "spin" / "iter_03" / "model" / "model_index.json"
    stamp = spin_model.stat().st_mtime_ns
    runner.run_demo(out, seeds=2, scale=0.05, progress=False, sft_then_spin=True)  # continues: nothing retrained
    assert "continuing the demo" in capsys.readouterr().out
    assert spin_model.stat().st_mtime_ns == stamp

    with pytest.raises(SpinDiffusionError, match="seed"):
        runner.run_demo(out, seeds=3, scale=0.05, progress=False)


@pytest.mark.heavy
def test_demo_pretrain_keeps_the_from_scratch_path(tmp_path, small_demo, monkeypatch):
    out = tmp_path / "demo"
    runner.run_demo(out, seeds=1, scale=0.02, pretrain=True, hyper=runner.Hyper(iterations=1), progress=False)
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base", "sft", "spin iter 1"]  # no third arm by default
    assert results["models"][0]["spread"] == {}  # one seed: no spread
    base_eval = json.loads((out / "seed_0" / "eval" / "base.json").read_text())
    assert Path(base_eval["model"]) == out / "base" / "iter_01" / "model"
    assert "One seed only" in results["summary"]


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SpinDiffusionError, match="holds no demo"):
        runner.run_demo(tmp_path, scale=0.02, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def study():
    """scripts/selfplay_study.py, the issue-28 study, as a module."""
    spec = importlib.util.spec_from_file_location("selfplay_study", ROOT / "scripts" / "selfplay_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_resumed_selfplay_study_keeps_its_world_base_and_scale(tmp_path, study):
    """scripts/selfplay_study.py: a rerun without flags resumes the study as it was, and a contradicting flag is one
    line (a rerun without --base once resolved the relation base anew and every arm refused to resume)."""

    def settle(**flags):
        args = argparse.Namespace(out=tmp_path, **({"world": None, "base": None, "scale": None} | flags))
        study._settle(args)
        return args.world, args.base, args.scale

    base = tmp_path / "my_base"
    assert settle(world="relations", base=base, scale=4) == ("relations", base.resolve(), 4.0)
    assert settle() == ("relations", base.resolve(), 4.0)
    assert settle(scale=4.0) == ("relations", base.resolve(), 4.0)
    for flags, said in (({"scale": 2.0}, "--scale 4.0"), ({"world": "shapes"}, "--world relations"),
                        ({"base": tmp_path / "other"}, f"--base {base.resolve()}")):  # fmt: skip
        with pytest.raises(SystemExit, match=f"ran with {said}"):
            settle(**flags)
    assert (tmp_path / "scale.txt").read_text() == "4.0\n"  # a refused flag writes nothing


def test_a_new_selfplay_study_takes_each_worlds_base(tmp_path, study):
    (tmp_path / "rel").mkdir(), (tmp_path / "shapes").mkdir()
    args = argparse.Namespace(out=tmp_path / "rel", world="relations", base=None, scale=None)
    study._settle(args)
    assert (args.base, args.scale) == (relation_world.SHIPPED_BASE, 1.0)
    args = argparse.Namespace(out=tmp_path / "shapes", world=None, base=None, scale=None)
    study._settle(args)
    assert (args.world, args.base) == ("shapes", None)  # the shapes world's base: runner.shipped_base()
    assert study._base(args.out) == runner.shipped_base()
