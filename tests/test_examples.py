"""examples/ run as scripts (`python examples/X.py ...`, here in this process to share its imports), at their tiniest
sizes, and what they print is checked."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest

import spin_diffusion as sd
from spin_diffusion import rundir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(capsys, monkeypatch, script: str, *args: str) -> list[str]:
    """Run examples/<script> as ``__main__`` with these arguments; -> its stdout lines."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return capsys.readouterr().out.splitlines()


def _json_lines(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_spin_loss_in_a_plain_diffusers_accelerate_loop(capsys, monkeypatch):
    args = ["--images", "12", "--sft-steps", "3", "--iterations", "2", "--steps", "6", "--batch-size", "8"]
    args += ["--sample-steps", "2", "--loser-guard", "0.9"]
    lines = _run(capsys, monkeypatch, "spin_loss_in_your_loop.py", *args)
    records = _json_lines(lines)
    assert records[-1] == {"done": {"iterations": 2, "steps": 6}}
    steps = records[:-1]
    assert [(r["iteration"], r["step"]) for r in steps] == [(k, i) for k in (1, 2) for i in range(1, 7)]
    for k in (1, 2):
        first, *rest = [r for r in steps if r["iteration"] == k]
        # each iteration starts from the frozen opponent itself: policy = reference, so the loss is log 2
        assert first["loss"] == pytest.approx(math.log(2.0), abs=1e-3)
        # and then learns to prefer the real images over the opponent's own samples
        assert sum(r["loss"] for r in rest) / len(rest) < math.log(2.0)
        assert sum(r["margin"] for r in rest) > 0
    assert all(0.0 < r["loser_guard_lambda"] <= 1.0 for r in steps)


def test_the_demo_spin_arm_from_python_resumes_and_its_exports_are_evaluated(capsys, monkeypatch, tmp_path):
    out = tmp_path / "demo_py"
    arm = ["--out", str(out), "--scale", "0.05", "--iterations", "1", "--set", "sample.num_steps=2"]
    lines = _run(capsys, monkeypatch, "demo_spin_arm.py", *arm)
    assert lines[0].startswith("SPIN from ") and "1 iterations of 2 steps" in lines[0]
    (ran,) = _json_lines(lines)
    run_dir = out / "seed_0" / "spin"
    assert ran == {"run_dir": str(run_dir), "exports": {"1": str(run_dir / "iter_01" / "model")}}
    export = Path(ran["exports"]["1"])
    assert (export / "model_index.json").is_file()
    log = rundir.iter_dir(run_dir, 1) / rundir.TRAIN_LOG
    trained = log.read_text()
    assert len(trained.splitlines()) >= 1

    # again on the same folder: the finished run is continued (nothing retrained), with the same exports
    again = _run(capsys, monkeypatch, "demo_spin_arm.py", *arm)
    assert _json_lines(again) == [ran] and log.read_text() == trained

    # the shipped base against the SPIN export, on the demo's held-out prompts, with its exact judge
    base = sd.load_config(run_dir / "config.yaml").model.path  # the run's saved config names the base it started from
    evaluated = _run(
        capsys, monkeypatch, "evaluate_two_exports.py", base, str(export),
        "--out", str(tmp_path / "eval"), "--num-prompts", "3", "--steps", "2",
    )  # fmt: skip
    (result,) = _json_lines(evaluated)
    assert result["baseline"] == "demo_base" and list(result["metrics"]) == ["demo_base", "model"]
    assert 0.0 <= result["metrics"]["model"]["shapes_judge"] <= 1.0
    assert 0.0 <= result["metrics"]["model"]["shapes_judge_win_rate"] <= 1.0
    assert "shapes_judge_win_rate" not in result["metrics"]["demo_base"]  # the baseline is not compared with itself
    assert evaluated[0].startswith("| model | scorer |") and "| demo_base | shapes_judge |" in evaluated[2]
    saved = rundir.read_eval(tmp_path / "eval" / "eval.json")
    assert len(saved.prompts) == 3 and [m.name for m in saved.models] == ["demo_base", "model"]


def test_bad_input_to_an_example_is_one_line_and_status_2(capsys, monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as stop:
        _run(capsys, monkeypatch, "demo_spin_arm.py", "--out", str(tmp_path / "demo"), "--scale", "0")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: scale must be > 0, got 0.0\n" and not any(tmp_path.iterdir())
    with pytest.raises(SystemExit) as stop:
        _run(capsys, monkeypatch, "spin_loss_in_your_loop.py", "--batch-size", "0")
    assert stop.value.code == 2 and "--batch-size" in capsys.readouterr().err.splitlines()[-1]
