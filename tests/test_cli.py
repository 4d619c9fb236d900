"""The command line: help for every command, resolved config, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from spin_diffusion import export, presets, rundir
from spin_diffusion.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
COMMANDS = ["spin", "sft", "dpo", "evaluate", "demo", "config"]


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help_exits_zero(command, capsys):
    assert main([*command, "--help"]) == 0
    assert "Usage" in capsys.readouterr().out


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "--config", str(TINY), "--set", "train.learning_rate=3e-4", "--set", "loss.beta=10"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["learning_rate"] == pytest.approx(3e-4)
    assert resolved["loss"]["beta"] == 10.0
    assert resolved["model"]["preset"] == "tiny"  # from the file
    assert resolved["sample"]["eta"] is None  # a default (automatic: 1.0 for spin_exact on DDIM, else 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["config", "--set", "train.lr=1"], "unknown config key 'train.lr'"),
        (["config", "--set", "loss.objective=ppo"], "loss.objective must be one of"),
        (["config", "--set", "train.batch_size=two"], "train.batch_size must be an integer"),
        (["config", "--set", "train.batch_size=0"], "train.batch_size must be >= 1"),
        (["config", "--set", "nonsense"], "must look like key=value"),
        (["config", "--config", "/does/not/exist.yaml"], "config file not found"),
        (["spin", "--set", "loss.objective=sft"], "use `spin-diffusion sft`"),
    ],
)
def test_bad_config_is_one_line_error(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert "\n" not in err


def test_invalid_yaml_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {learning_rate: [1,\n")
    assert main(["config", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "spin_diffusion.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _imagefolder(root: Path, rows: list[dict], images: dict[str, bytes | None]) -> Path:
    root.mkdir(parents=True)
    for name, payload in images.items():
        if payload is None:
            Image.new("RGB", (16, 16), (200, 30, 30)).save(root / name)
        else:
            (root / name).write_bytes(payload)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _bad_data(tmp_path: Path, kind: str) -> Path:
    if kind == "empty":
        return _imagefolder(tmp_path / "d", [], {})
    if kind == "missing_caption":
        return _imagefolder(
            tmp_path / "d",
            [{"file_name": "a.png", "text": "a red circle"}, {"file_name": "b.png"}],
            {"a.png": None, "b.png": None},
        )
    if kind == "corrupt_image":
        return _imagefolder(
            tmp_path / "d", [{"file_name": "a.png", "text": "a red circle"}], {"a.png": b"this is not a png"}
        )
    raise ValueError(kind)


@pytest.mark.heavy
@pytest.mark.parametrize(
    ("kind", "message"),
    [("empty", "empty"), ("missing_caption", "line 2"), ("corrupt_image", "a.png")],
)
def test_bad_dataset_exits_2_with_one_line(tmp_path, kind, message):
    data = _bad_data(tmp_path, kind)
    out = _cli(
        "sft",
        "--config",
        str(TINY),
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f"data.path={data}",
        "--set",
        "data.builtin=null",
    )
    assert out.returncode == 2, out.stderr[-2000:]
    err = out.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-1]
    assert "Traceback" not in out.stderr


@pytest.mark.heavy
def test_missing_model_folder(tmp_path):
    out = _cli(
        "spin", "--config", str(TINY), "--run-dir", str(tmp_path / "run"), "--set", f"model.path={tmp_path / 'nope'}"
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "nope" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.heavy
def test_rerun_without_resume_refuses_and_keeps_work(tmp_path):
    run_dir = tmp_path / "run"
    first = _cli("sft", "--config", str(TINY), "--run-dir", str(run_dir), "--set", "eval.enabled=false")
    assert first.returncode == 0, first.stderr[-2000:]
    model = run_dir / "iter_01" / "model" / "model_index.json"
    stamp = model.stat().st_mtime_ns
    again = _cli("sft", "--config", str(TINY), "--run-dir", str(run_dir), "--set", "eval.enabled=false")
    assert again.returncode == 2 and "--resume" in again.stderr
    assert model.stat().st_mtime_ns == stamp
    resumed = _cli("sft", "--resume", "--run-dir", str(run_dir))  # the saved config alone
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert model.stat().st_mtime_ns == stamp


def test_evaluate_command_scores_models_against_a_baseline(tmp_path, capsys):

    for seed in (0, 1):
        export.save_pipeline(presets.build_preset("tiny", seed=seed), tmp_path / f"m{seed}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na blue square at the top\n\na green triangle on the right\n")
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "-m",
            str(tmp_path / "m0"),
            "-m",
            str(tmp_path / "m1"),
            "--prompts",
            str(prompts),
            "--scorer",
            "shapes_judge",
            "--scorer",
            "shapes_color",
            "--out",
            str(out),
            "--steps",
            "2",
            "--guidance-scale",
            "2.0",
        ]
    )
    assert code == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert "win rate vs m0" in table and "shapes_color" in table
    results = rundir.read_eval(out / "eval.json")
    assert len(results.prompts) == 3 and results.baseline == "m0"
    assert results.sampler == {"seed": 0, "num_steps": 2, "guidance_scale": 2.0}
    assert [m.name for m in results.models] == ["m0", "m1"]
    assert "shapes_judge_win_rate" not in results.model("m0").metrics
    assert 0.0 <= results.model("m1").metrics["shapes_judge_win_rate"] <= 1.0
    assert len(results.model("m1").scores["shapes_color"]) == 3 and results.model("m1").grid == "m1_grid.png"
    for name in ("report.html", "table.md", "m0_grid.png", "m1_grid.png"):
        assert (out / name).exists(), name
    assert "grid image not found" not in (out / "report.html").read_text()


def test_evaluate_needs_weights_for_learned_scorers(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    code = main(["evaluate", "-m", str(tmp_path), "--prompts", str(prompts), "--scorer", "pickscore"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pickscore" in err.lower()


def test_evaluate_adds_fid_against_reference_images(tmp_path, capsys):
    from spin_diffusion import world
    from test_scoring import _save_clip

    export.save_pipeline(presets.build_preset("tiny", seed=0), tmp_path / "m0")
    clip = tmp_path / "clip"
    _save_clip(clip)
    reference = tmp_path / "real"
    world.write_imagefolder(reference, 6, seed=0, size=16)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on the left\na blue square at the top\na green circle on the right\n")
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "-m",
        str(tmp_path / "m0"),
        "--prompts",
        str(prompts),
        "--scorer",
        "shapes_judge",
        "--out",
        str(out),
        "--steps",
        "2",
        "--fid-reference",
        str(reference),
    ]
    assert main(args) == 2  # FID needs both the reference images and the feature network
    assert "--fid-features" in capsys.readouterr().err
    assert main([*args, "--fid-features", str(clip)]) == 0, capsys.readouterr().err
    metrics = rundir.read_eval(out / "eval.json").model("m0").metrics
    assert metrics["fd"] >= 0.0 and "shapes_judge" in metrics
    assert "| fd |" in (out / "table.md").read_text().splitlines()[0]


def test_config_explain_lists_every_key_with_its_meaning(capsys):
    assert main(["config", "--config", str(TINY), "--explain", "--set", "train.learning_rate=3e-4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "train.learning_rate: 0.0003   (default: 2.0e-05)" in out
    i = out.index("data.random_flip: false")
    assert out[i + 1].startswith("    Augmentations of the real images")
    assert "run_dir: runs/tiny   (default: runs/spin)" in out


def test_a_run_names_the_config_it_starts_from(capsys, tmp_path):
    assert main(["sft", "-o", str(tmp_path / "run"), "--set", "data.builtin=null"]) == 2  # fails after the line
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].startswith("config: no --config: every key's default")
    assert captured.err.strip().startswith("error: no training data") and "\n" not in captured.err.strip()
    assert main(["sft", "--config", str(TINY), "--set", "data.builtin=null", "--set", "eval.enabled=false"]) == 2
    assert capsys.readouterr().out.splitlines()[0] == f"config: {TINY} + 2 --set"
