"""The bad-input table: every entry point (spin, sft, dpo, evaluate, demo, config) over the inputs users get wrong.
Each case must give exactly one line, `error: <message>` matching the expected message in full, exit status 2,
no traceback, and leave a finished run dir exactly as it was (and create no run dir on a fresh start)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from PIL import Image

from spin_diffusion import export, presets, world
from spin_diffusion.cli import main
from spin_diffusion.config import load_config
from spin_diffusion.self_play import run

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
FAST = ["--set", "num_iterations=1", "--set", "eval.enabled=false"]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> dict[str, Path]:
    """Inputs on disk: good and broken datasets, prompt files, and a finished run with its exported model."""
    root = tmp_path_factory.mktemp("bad_inputs")

    def folder(name: str, rows: list[dict], images: dict[str, bytes | Image.Image]) -> Path:
        d = root / name
        d.mkdir()
        for file, content in images.items():
            content.save(d / file) if isinstance(content, Image.Image) else (d / file).write_bytes(content)
        (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d

    examples = world.make_examples(4, seed=0)
    good_rows = [{"file_name": f"{i}.png", "text": cap} for i, (_, cap) in enumerate(examples)]
    good_images = {f"{i}.png": img for i, (img, _) in enumerate(examples)}
    paths = {
        "empty": folder("empty", [], {}),
        "corrupt": folder("corrupt", good_rows, {**good_images, "2.png": b"not a png"}),
        "no_caption_column": folder(
            "no_caption_column", [{"file_name": r["file_name"], "label": 1} for r in good_rows], good_images
        ),
        "empty_caption": folder("empty_caption", [*good_rows[:3], {"file_name": "3.png", "text": " "}], good_images),
        "tiny_image": folder("tiny_image", good_rows, {**good_images, "1.png": Image.new("RGB", (2, 2))}),
        "no_pairs": folder("no_pairs", good_rows, good_images),
        "one_caption": folder("one_caption", [{**r, "text": good_rows[0]["text"]} for r in good_rows], good_images),
    }
    paths["bad_prompts"] = root / "bad_prompts.txt"
    paths["bad_prompts"].write_text("a red circle on the left\na green triangle in the center\n")
    paths["prompts"] = root / "prompts.txt"
    paths["prompts"].write_text("a red circle on the left\n")
    paths["finished"] = root / "finished"
    run(load_config(TINY, [f"run_dir={paths['finished']}", "num_iterations=1", "eval.enabled=false"]), progress=False)
    paths["model"] = paths["finished"] / "iter_01" / "model"
    paths["file"] = root / "a_file"
    paths["file"].write_text("x")
    # a FLUX.2 [dev] folder: FLUX.2 parts under Flux2Pipeline's name (only klein is a family)
    paths["flux2_dev"] = export.save_pipeline(presets.build_preset("tiny-flux2"), root / "flux2_dev")
    index = json.loads((paths["flux2_dev"] / "model_index.json").read_text())
    (paths["flux2_dev"] / "model_index.json").write_text(json.dumps({**index, "_class_name": "Flux2Pipeline"}))
    # a step-distilled FLUX.2 klein (model_index.json's is_distilled, as FLUX.2-klein-4B): no classifier-free guidance
    distilled = dataclasses.replace(presets.build_preset("tiny-flux2"), pipeline_config={"is_distilled": True})
    paths["flux2_distilled"] = export.save_pipeline(distilled, root / "flux2_distilled")
    return paths


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


P = "[^ ]+"  # any path in a message
# (id, argv with {placeholders}, the whole expected message as a regex, the run dir a fresh start must not create)
CASES = [
    # spin / sft / dpo: the config
    ("spin-missing-config", ["spin", "--config", "/no/such.yaml"], "config file not found: /no/such.yaml"),
    (
        "spin-unknown-key",
        ["spin", "--config", "{tiny}", "--set", "train.bogus=1"],
        "unknown config key 'train.bogus'; valid keys here: .*",
    ),
    (
        "spin-wrong-type",
        ["spin", "--config", "{tiny}", "--set", "train.max_steps=abc"],
        "train.max_steps must be an integer; got 'abc'",
    ),
    (
        "spin-wrong-objective",
        ["spin", "--config", "{tiny}", "--set", "loss.objective=sft"],
        r"`spin` runs the objectives trained in rounds against θ_k \(spin_approx, spin_exact, ddo, "
        r"caption_contrast\), not sft; use `spin-diffusion sft`",
    ),
    # the model
    (
        "spin-missing-model",
        ["spin", "--config", "{tiny}", "--set", "model.path=/no/such/model"],
        r"model folder not found: /no/such/model \(give a local diffusers pipeline folder or a Hub id such as "
        r"stable-diffusion-v1-5/stable-diffusion-v1-5\)",
    ),
    (
        "spin-uncached-hub-id",
        ["spin", "--config", "{tiny}", "--set", "model.path=org/not-cached"],
        r"model org/not-cached is not in the Hugging Face cache \(.*\) and the Hub is offline \(HF_HUB_OFFLINE=1\); "
        r"download it first with `hf download org/not-cached` \(no local folder org/not-cached exists either\)",
    ),
    (
        "spin-variant-without-a-model",
        ["spin", "--config", "{tiny}", "--set", "model.variant=fp16"],
        "model.revision and model.variant select files of model.path; set model.path",
    ),
    (
        "sft-missing-model",
        ["sft", "--config", "{tiny}", "--set", "model.path=/no/such/model"],
        "model folder not found: /no/such/model .*",
    ),
    # the data
    (
        "spin-empty-folder",
        ["spin", "--config", "{tiny}", "--set", "data.builtin=null", "--set", "data.path={empty}"],
        f"the dataset {P} is empty \\(0 rows\\); add examples or fix data.path",
    ),
    (
        "spin-corrupt-image",
        ["spin", "--config", "{tiny}", "--set", "data.builtin=null", "--set", "data.path={corrupt}"],
        f"cannot read image {P}2.png \\(line 3 of {P}\\): .*; replace the file or remove its row",
    ),
    (
        "spin-no-caption-column",
        ["spin", "--config", "{tiny}", "--set", "data.builtin=null", "--set", "data.path={no_caption_column}"],
        "no caption column in .*",
    ),
    (
        "spin-empty-caption",
        ["spin", "--config", "{tiny}", "--set", "data.builtin=null", "--set", "data.path={empty_caption}"],
        f"line 4 of {P} has an empty caption \\('text'\\); write one or remove the row",
    ),
    (
        "spin-tiny-image",
        [
            "spin",
            "--config",
            "{tiny}",
            "--set",
            "data.builtin=null",
            "--set",
            "data.path={tiny_image}",
            "--set",
            "data.min_image_side=8",
        ],
        f"line 2 of {P}: the image is 2x2 px, smaller than data.min_image_side=8; replace it, remove the row, or set "
        "data.on_bad_example=skip",
    ),
    (
        "sft-corrupt-image",
        ["sft", "--config", "{tiny}", "--set", "data.builtin=null", "--set", "data.path={corrupt}"],
        f"cannot read image {P}2.png .*",
    ),
    (
        "dpo-no-pairs",
        ["dpo", "--config", "{tiny}", "--set", "data.builtin=null", "--set", "data.path={no_pairs}"],
        "no preference columns in .*",
    ),
    (
        "dpo-builtin-data",
        ["dpo", "--config", "{tiny}"],
        r"preference pairs need data.path \(the built-in shapes world has no pairs\)",
    ),
    # the run dir
    (
        "spin-run-dir-is-a-file",
        ["spin", "--config", "{tiny}", "--run-dir", "{file}/run"],
        f"run_dir {P}: {P} is a file, not a folder; choose another path",
    ),
    (
        "spin-eval-prompts-unscorable",
        ["spin", "--config", "{tiny}", "--set", "eval.enabled=true", "--set", "eval.prompts={bad_prompts}"],
        "prompt 2 cannot be scored by shapes_judge: not a demo-world caption: 'a green triangle in the center'; .*",
    ),
    # evaluate
    (
        "evaluate-unscorable-prompt",
        ["evaluate", "-m", "{model}", "--prompts", "{bad_prompts}", "--scorer", "shapes_judge"],
        "prompt 2 cannot be scored by shapes_judge: not a demo-world caption: 'a green triangle in the center'; .*",
    ),
    (
        "evaluate-missing-model",
        ["evaluate", "-m", "{model}", "-m", "/no/such/model", "--prompts", "{prompts}"],
        r"model folder not found: /no/such/model \(give a local diffusers pipeline folder or a Hub id .*\)",
    ),
    (
        "evaluate-uncached-hub-id",
        ["evaluate", "-m", "{model}", "-m", "org/not-cached", "--prompts", "{prompts}"],
        "model org/not-cached is not in the Hugging Face cache .*`hf download org/not-cached`.*",
    ),
    (
        "evaluate-missing-prompts",
        ["evaluate", "-m", "{model}", "--prompts", "/no/prompts.txt"],
        "prompt file not found: /no/prompts.txt",
    ),
    (
        "evaluate-unknown-scorer",
        ["evaluate", "-m", "{model}", "--prompts", "{prompts}", "--scorer", "nope"],
        "unknown scorer .*",
    ),
    (
        "evaluate-missing-weights",
        ["evaluate", "-m", "{model}", "--prompts", "{prompts}", "--scorer", "pickscore"],
        ".*pickscore.*",
    ),
    (
        "evaluate-bad-baseline",
        ["evaluate", "-m", "{model}", "--prompts", "{prompts}", "--baseline", "3"],
        "--baseline 3 is not an index into the 1 --model folders",
    ),
    # the self-play remedies and the batch regime (issue 15): one line before any work
    (
        "spin-guard-outside-unit-interval",
        ["spin", "--config", "{tiny}", "--set", "loss.loser_guard=2"],
        r"loss.loser_guard must be in \[0, 1\] \(or null = off\), got 2.0",
    ),
    ("spin-negative-hinge", ["spin", "--config", "{tiny}", "--set", "loss.dpop_lambda=-5"], ".*>= 0, got -5.0"),
    (
        "spin-total-batch-does-not-divide",
        ["spin", "--config", "{tiny}", "--set", "train.total_batch_size=6"],
        "train.total_batch_size=6 is not a multiple of train.batch_size=4",
    ),
    (
        "spin-eta-on-a-flow-model",
        ["spin", "--config", "{tiny}", "--set", "model.preset=tiny-sd3", "--set", "sample.eta=0.5"],
        r"sample.eta=0.5: the sd3 family samples with deterministic Euler steps \(no η\); .*",
    ),
    # FLUX.1 / SD3.5 (issue 21): what the family cannot do, one line before any work
    (
        "spin-eta-on-flux",
        ["spin", "--config", "{tiny}", "--set", "model.preset=tiny-flux", "--set", "sample.eta=0.3"],
        r"sample.eta=0.3: the flux family samples with deterministic Euler steps \(no η\); .*",
    ),
    (
        "spin-dpmsolver-on-flux",
        ["spin", "--config", "{tiny}", "--set", "model.preset=tiny-flux", "--set", "sample.scheduler=dpmsolver++"],
        r"sample.scheduler=dpmsolver\+\+ is for DDPM models; .*",
    ),
    (
        "spin-true-cfg-on-sd",
        ["spin", "--config", "{tiny}", "--set", "sample.true_cfg_scale=4"],
        "sample.true_cfg_scale=4.0 is for FLUX.1 models; a sd model does classifier-free guidance with .*",
    ),
    (
        "spin-eta-on-zimage",
        ["spin", "--config", "{tiny}", "--set", "model.preset=tiny-zimage", "--set", "sample.eta=1"],
        r"sample.eta=1.0: the zimage family samples with deterministic Euler steps \(no η\); .*",
    ),
    (
        "spin-dpmsolver-on-qwenimage",
        [
            "spin",
            "--config",
            "{tiny}",
            "--set",
            "model.preset=tiny-qwenimage",
            "--set",
            "sample.scheduler=dpmsolver++",
        ],
        r"sample.scheduler=dpmsolver\+\+ is for DDPM models; .*",
    ),
    (
        "spin-true-cfg-on-zimage",
        ["spin", "--config", "{tiny}", "--set", "model.preset=tiny-zimage", "--set", "sample.true_cfg_scale=4"],
        "sample.true_cfg_scale=4.0 is for FLUX.1 models; a zimage model does classifier-free guidance with .*",
    ),
    # FLUX.2 klein: what its pipeline cannot do
    (
        "spin-negative-prompt-on-flux2",
        ["spin", "--config", "{tiny}", "--set", "model.preset=tiny-flux2", "--set", "sample.negative_prompt=blurry"],
        "sample.negative_prompt='blurry': Flux2KleinPipeline always guides with the empty prompt; leave "
        "sample.negative_prompt empty for a FLUX.2 klein model",
    ),
    (
        "spin-eta-on-flux2",
        ["spin", "--config", "{tiny}", "--set", "model.preset=tiny-flux2", "--set", "sample.eta=0.5"],
        r"sample.eta=0.5: the flux2 family samples with deterministic Euler steps \(no η\); .*",
    ),
    (
        "spin-true-cfg-on-flux2",
        ["spin", "--config", "{tiny}", "--set", "model.preset=tiny-flux2", "--set", "sample.true_cfg_scale=4"],
        "sample.true_cfg_scale=4.0 is for FLUX.1 models; a flux2 model does classifier-free guidance with .*",
    ),
    (
        "spin-cfg-on-distilled-flux2",
        ["spin", "--config", "{tiny}", "--set", "model.path={flux2_distilled}"],
        r"sample.guidance_scale=2.0: a step-distilled FLUX.2 klein model \(is_distilled\) samples without "
        "classifier-free guidance; set sample.guidance_scale=1",
    ),
    (
        "spin-flux2-dev",
        ["spin", "--config", "{tiny}", "--set", "model.path={flux2_dev}"],
        r"a Flux2Pipeline \(FLUX.2 \[dev\]\) is not supported: of FLUX.2 only the klein models \(Flux2KleinPipeline\) "
        "are",
    ),
    (
        "spin-skip-layers-on-flux",
        ["spin", "--config", "{tiny}", "--set", "model.preset=tiny-flux", "--set", "sample.skip_guidance_layers=[0]"],
        "sample.skip_guidance_layers is for SD3/SD3.5 transformers; a flux model cannot skip layers",
    ),
    (
        "spin-skip-layer-out-of-range",
        ["spin", "--config", "{tiny}", "--set", "model.preset=tiny-sd35", "--set", "sample.skip_guidance_layers=[7]"],
        r"sample.skip_guidance_layers \[7\] out of range: the transformer has blocks 0..1",
    ),
    (
        "spin-t5-length-on-sd",
        ["spin", "--config", "{tiny}", "--set", "model.max_sequence_length=64"],
        "model.max_sequence_length is the text length of SD3, FLUX and Z-Image models; a sd model's is fixed",
    ),
    (
        "spin-unknown-per-caption",
        ["spin", "--config", "{tiny}", "--set", "sample.per_caption=some"],
        "sample.per_caption must be one of 'every_row', 'one'; got 'some'",
    ),
    # issue 28: the caption contrast, DDO, the opponent pool
    (
        "spin-negative-caption-contrast",
        ["spin", "--config", "{tiny}", "--set", "loss.caption_contrast_weight=-1"],
        "loss.caption_contrast_weight must be >= 0, got -1.0",
    ),
    (
        "sft-with-caption-contrast",
        ["sft", "--config", "{tiny}", "--set", "loss.caption_contrast_weight=1"],
        "loss.caption_contrast_weight adds the caption contrast to a self-play loss .*not to sft; use "
        "loss.objective=caption_contrast for the term alone",
    ),
    (
        "spin-caption-contrast-one-caption",
        [
            "spin",
            "--config",
            "{tiny}",
            "--set",
            "data.builtin=null",
            "--set",
            "data.path={one_caption}",
            "--set",
            "loss.objective=caption_contrast",
        ],
        r"the caption contrast draws a mismatched caption c′ from the data, but it has 1 distinct caption\(s\); it "
        "needs at least 2 .*",
    ),  # fmt: skip
    (
        "spin-unknown-objective",
        ["spin", "--config", "{tiny}", "--set", "loss.objective=gan"],
        "loss.objective must be one of .*'ddo', 'caption_contrast'; got 'gan'",
    ),
    (
        "spin-ddo-negative-fake-weight",
        ["spin", "--config", "{tiny}", "--set", "loss.objective=ddo", "--set", "loss.ddo_fake_weight=-0.5"],
        "loss.ddo_fake_weight must be >= 0, got -0.5",
    ),
    (
        "spin-ddo-with-guard",
        ["spin", "--config", "{tiny}", "--set", "loss.objective=ddo", "--set", "loss.loser_guard=0.9"],
        r"loss.loser_guard is derived for one logit per pair \(SPIN, DPO\); ddo's real and generated .*",
    ),
    (
        "spin-pool-zero",
        ["spin", "--config", "{tiny}", "--set", "sample.opponent_pool=0"],
        "sample.opponent_pool must be latest, all or an integer K >= 1; got 0",
    ),
    (
        "spin-pool-unknown",
        ["spin", "--config", "{tiny}", "--set", "sample.opponent_pool=every"],
        "sample.opponent_pool must be 'latest', 'all' or an integer; got 'every'",
    ),
    (
        "spin-pool-with-exact",
        ["spin", "--config", "{tiny}", "--set", "loss.objective=spin_exact", "--set", "sample.opponent_pool=all"],
        r"sample.opponent_pool=all draws losers from earlier iterations' final samples \(spin_approx or ddo\), not "
        "for spin_exact; set sample.opponent_pool=latest",
    ),
    # demo and config
    ("demo-bad-scale", ["demo", "--scale", "0"], "--scale must be > 0, got 0.0"),
    ("config-unknown-key", ["config", "--set", "sample.bogus=1"], "unknown config key 'sample.bogus'; .*"),
    ("config-missing-file", ["config", "--config", "/no/such.yaml"], "config file not found: /no/such.yaml"),
]


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_status_2(world_dir, tmp_path, capsys, argv, message):
    values = {**{k: str(v) for k, v in world_dir.items()}, "tiny": str(TINY)}
    args = [a.format(**values) for a in argv]
    run_dir = tmp_path / "run"
    if args[0] in ("spin", "sft", "dpo"):  # the case's own --set options come after FAST, so they win
        args = [args[0], *FAST, *args[1:]] + ([] if "--run-dir" in args else ["--run-dir", str(run_dir)])
    if args[0] == "evaluate":
        args += ["--out", str(tmp_path / "eval"), "--steps", "2"]
    before = _snapshot(world_dir["finished"])
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert re.fullmatch(message, lines[0][len("error: ") :]), lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not run_dir.exists()  # a failed start leaves nothing behind
    assert not (tmp_path / "eval").exists() or not any((tmp_path / "eval").iterdir())
    assert _snapshot(world_dir["finished"]) == before


@pytest.mark.parametrize("command", ["spin", "sft"])
def test_resume_with_another_config_leaves_the_finished_run_untouched(world_dir, capsys, command):
    finished = world_dir["finished"]
    before = _snapshot(finished)
    args = [
        command,
        "--config",
        str(TINY),
        "--run-dir",
        str(finished),
        "--resume",
        *FAST,
        "--set",
        "train.learning_rate=0.5",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume with a config that differs from the saved one (") and "\n" not in err
    assert _snapshot(finished) == before


def test_a_run_that_does_not_fit_on_disk(world_dir, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 0))
    assert main(["spin", "--config", str(TINY), "--run-dir", str(tmp_path / "run"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: \S+ needs about \d+\.\d\d GB \(cache .*\) but its disk has 0\.00 GB free; .*", err)
    assert not (tmp_path / "run").exists()
