"""config.py: the knobs of issue 8 (loss.sft_weight, β / learning-rate schedules, eval sampling), how they parse
from YAML and --set, and the one-line errors for bad values."""

from __future__ import annotations

import dataclasses

import pytest

from spin_diffusion.config import (
    LossConfig,
    at_iteration,
    for_iteration,
    load_config,
    replace,
    save_config,
    to_dict,
)
from spin_diffusion.errors import SpinDiffusionError


def test_sft_weight_defaults_to_off_and_parses():
    assert load_config(None).loss.sft_weight == 0.0
    assert load_config(None, ["loss.sft_weight=1250"]).loss.sft_weight == 1250.0
    assert LossConfig(objective="dpo", sft_weight=0.5).sft_weight == 0.5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.sft_weight=-1"], "loss.sft_weight must be >= 0, got -1.0"),
        (["loss.sft_weight=.nan"], "loss.sft_weight must be >= 0, got nan"),
        (["loss.sft_weight=abc"], "loss.sft_weight must be a number; got 'abc'"),
        (["loss.objective=sft", "loss.sft_weight=1"], "objective sft has none (set loss.sft_weight=0)"),
        (["loss.loser_guard=1.5"], "loss.loser_guard must be in [0, 1] (or null = off), got 1.5"),
        (["loss.loser_guard=-0.1"], "loss.loser_guard must be in [0, 1] (or null = off), got -0.1"),
        (["loss.loser_guard=.nan"], "loss.loser_guard must be in [0, 1] (or null = off), got nan"),
        (["loss.dpop_lambda=-1"], "loss.dpop_lambda must be >= 0, got -1.0"),
        (["loss.objective=sft", "loss.dpop_lambda=5"], "objective sft has none (set loss.dpop_lambda=0)"),
        (["loss.objective=sft", "loss.loser_guard=0.5"], "objective sft has none (set loss.loser_guard=null)"),
        (["train.total_batch_size=0"], "train.total_batch_size must be >= 1 or null, got 0"),
        (["train.total_batch_size=20", "train.batch_size=8"], "train.total_batch_size=20 is not a multiple of"),
        (
            ["train.total_batch_size=32", "train.gradient_accumulation_steps=2"],
            "set train.total_batch_size or train.gradient_accumulation_steps, not both",
        ),
        (["sample.eta=-1"], "sample.eta must be >= 0 (or null = automatic), got -1.0"),
    ],
)
def test_bad_sft_weight_is_a_one_line_error(overrides, message):
    with pytest.raises(SpinDiffusionError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_guard_and_hinge_default_off_and_parse():
    cfg = load_config(None)
    assert cfg.loss.loser_guard is None and cfg.loss.dpop_lambda == 0.0 and cfg.sample.eta is None
    cfg = load_config(None, ["loss.loser_guard=0.9", "loss.dpop_lambda=50", "loss.objective=dpo"])
    assert cfg.loss.loser_guard == 0.9 and cfg.loss.dpop_lambda == 50.0


def test_for_world_derives_accumulation_and_scales_lr():
    from spin_diffusion.config import for_world

    train = load_config(None, ["train.batch_size=4", "train.total_batch_size=32", "train.learning_rate=1e-8"]).train
    one, two = for_world(train, 1), for_world(train, 2)
    assert (one.gradient_accumulation_steps, two.gradient_accumulation_steps) == (8, 4)
    assert one.learning_rate == two.learning_rate == 1e-8  # scale_lr off: the rate as given
    assert for_world(one, 1) == one  # resolved: applying it again changes nothing
    scaled = for_world(dataclasses.replace(train, scale_lr=True, learning_rate=(1e-8, 5e-9)), 2)
    assert scaled.learning_rate == pytest.approx((32e-8, 16e-8)) and not scaled.scale_lr
    # Diffusion-DPO's rule without a total: batch × accumulation × processes (8 GPUs × 8 × 32 = 2048 -> 2.048e-5)
    paper = load_config(None, ["train.batch_size=8", "train.gradient_accumulation_steps=32", "train.scale_lr=true",
                               "train.learning_rate=1e-8"]).train  # fmt: skip
    assert for_world(paper, 8).learning_rate == pytest.approx(2.048e-5)
    with pytest.raises(SpinDiffusionError, match=r"total_batch_size=32 is not a multiple of .* = 4 × 3"):
        for_world(train, 3)


# ------------------------------------------------------------------ β and learning-rate schedules


def test_beta_and_learning_rate_take_a_number_or_a_list_per_iteration():
    cfg = load_config(None)
    assert cfg.loss.beta == 5000.0 and cfg.train.learning_rate == 2e-5  # the defaults stay plain numbers
    cfg = load_config(None, ["loss.beta=[5000,2500]", "train.learning_rate=[1e-5, 5e-6, 2.5e-6]"])
    assert cfg.loss.beta == (5000.0, 2500.0)  # YAML ints become floats
    assert cfg.train.learning_rate == (1e-5, 5e-6, 2.5e-6)  # YAML 1.1 reads "1e-5" as a string: still a number
    assert load_config(None, ["loss.beta=4000,2000"]).loss.beta == (4000.0, 2000.0)  # like every list key
    assert load_config(None, ["loss.beta=1e3"]).loss.beta == 1000.0
    assert LossConfig(beta=[3000, 1500]).beta == (3000, 1500)  # a Python list is kept as a tuple (frozen, hashable)


def test_schedules_from_a_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_iterations: 3\nloss:\n  beta: [5000, 2500]\ntrain:\n  learning_rate: 1.0e-5\n")
    cfg = load_config(path)
    assert cfg.loss.beta == (5000.0, 2500.0) and cfg.train.learning_rate == 1e-5


def test_for_iteration_resolves_each_schedule_and_repeats_the_last_value():
    cfg = load_config(None, ["num_iterations=3", "loss.beta=[5000,2500]", "train.learning_rate=3e-5"])
    resolved = [for_iteration(cfg, i) for i in range(3)]
    assert [r.loss.beta for r in resolved] == [5000.0, 2500.0, 2500.0]
    assert [r.train.learning_rate for r in resolved] == [3e-5, 3e-5, 3e-5]
    assert resolved[1].loss.objective == cfg.loss.objective and resolved[1].train == replace(
        cfg.train, learning_rate=3e-5
    )
    assert at_iteration(7.0, 5) == 7.0 and at_iteration((1.0, 2.0), 0) == 1.0


def test_saved_schedule_round_trips(tmp_path):
    """config.yaml holds the list; reading it back gives the same config (what --resume compares)."""
    cfg = load_config(None, ["loss.beta=[5000,2500]", "train.learning_rate=[1e-5,5e-6]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert "- 2500.0" in (tmp_path / "config.yaml").read_text()
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.beta=0"], "loss.beta must be > 0, got 0.0"),
        (["loss.beta=[5000,-1]"], "loss.beta must be > 0, got -1.0 (value 2 of the list)"),
        (["train.learning_rate=[1e-5,0]"], "train.learning_rate must be > 0, got 0.0 (value 2 of the list)"),
        (["train.learning_rate=[.nan]"], "train.learning_rate must be > 0, got nan (value 1 of the list)"),
        (["loss.beta=[5000,abc]"], "loss.beta must be a number; got 'abc'"),
        (["loss.beta=[]"], "loss.beta must be a number or a non-empty list of numbers (one per iteration)"),
        (["loss.beta={a: 1}"], "loss.beta must be a number or a list; got {'a': 1}"),
        (
            ["num_iterations=2", "loss.beta=[3,2,1]"],
            "loss.beta lists 3 values for num_iterations=2; give at most one per iteration (the last one repeats)",
        ),
        (
            ["loss.objective=dpo", "train.learning_rate=[1e-5,5e-6]"],
            "train.learning_rate lists 2 values, but dpo trains once; give one number",
        ),
    ],
)
def test_bad_schedule_is_a_one_line_error(overrides, message):
    with pytest.raises(SpinDiffusionError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


def test_sft_ignores_a_beta_schedule_but_not_a_learning_rate_schedule():
    assert load_config(None, ["loss.objective=sft", "loss.beta=[2,1]"]).loss.beta == (2.0, 1.0)  # β is unused
    with pytest.raises(SpinDiffusionError, match="sft trains once"):
        load_config(None, ["loss.objective=sft", "train.learning_rate=[2e-5,1e-5]"])


# ------------------------------------------------------------------ evaluation's own sampler


def test_eval_sampler_defaults_to_none_and_parses():
    cfg = load_config(None)
    assert cfg.eval.num_steps is None and cfg.eval.guidance_scale is None  # None = the opponent's sample.*
    cfg = load_config(None, ["eval.num_steps=50", "eval.guidance_scale=7.5", "sample.num_steps=10"])
    assert (cfg.eval.num_steps, cfg.eval.guidance_scale, cfg.sample.num_steps) == (50, 7.5, 10)
    assert load_config(None, ["eval.num_steps=50", "eval.num_steps=null"]).eval.num_steps is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.num_steps=0"], "eval.num_steps must be >= 1 or null, got 0"),
        (["eval.num_steps=2.5"], "eval.num_steps must be an integer; got 2.5"),
        (["eval.guidance_scale=high"], "eval.guidance_scale must be a number; got 'high'"),
    ],
)
def test_bad_eval_sampler_is_a_one_line_error(overrides, message):
    with pytest.raises(SpinDiffusionError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "recipe",
    [
        "sd15_pickapic",
        "sdxl_pickapic",
        "sd3_pickapic",
        "flux_pickapic",
        "zimage_pickapic",
        "qwenimage_pickapic",
        "flux2_pickapic",
    ],
)
def test_shipped_recipes_run_the_papers_2048_pairs_on_8_gpus(recipe):
    from pathlib import Path

    from spin_diffusion.config import for_world

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{recipe}.yaml")
    train = for_world(cfg.train, 8)
    assert train.batch_size * train.gradient_accumulation_steps * 8 == 2048
    if recipe == "sd15_pickapic":  # Diffusion-DPO's rule gives SPIN-Diffusion's published 2e-5
        assert train.learning_rate == pytest.approx(2.048e-5) and cfg.sample.eta is None


def test_every_key_is_explained_by_its_comment():
    from spin_diffusion.config import RunConfig, explain_keys, to_dict

    sections = ("model", "data", "sample", "loss", "train", "eval")
    tree = to_dict(RunConfig())
    leaves = {f"{s}.{k}" for s in sections for k in tree[s]} | {k for k in tree if k not in sections}
    docs = explain_keys(load_config(None, ["loss.beta=10"]))
    assert {d.key for d in docs} == leaves
    assert [d.key for d in docs if not d.meaning] == []  # a key added without a comment fails here
    by_key = {d.key: d for d in docs}
    assert "beta_dpo" in by_key["loss.beta"].meaning and (by_key["loss.beta"].value, by_key["loss.beta"].default) == (
        10.0,
        5000.0,
    )
    assert by_key["data.random_crop"].meaning.startswith("a random instead of a centered square crop")
    assert "\n" not in "".join(d.meaning for d in docs)
