"""Dirty data at scale: unreadable or tiny images and empty captions are skipped (data.on_bad_example=skip), listed
with their reasons and counted, never silently; too many of them, or the error policy, stop the run with a line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from spin_diffusion import data as data_lib
from spin_diffusion import world
from spin_diffusion.config import DataConfig, load_config
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.self_play import run

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _dirty_folder(root: Path, n: int = 20) -> Path:
    """n rows: row 3 a corrupt file, row 7 a 4x4 image, row 11 an empty caption, row 13 a missing file."""
    root.mkdir(parents=True)
    rows = []
    for i, (img, caption) in enumerate(world.make_examples(n, seed=0)):
        name = f"{i}.png"
        if i == 3:
            (root / name).write_bytes(b"not a png")
        elif i == 7:
            Image.new("RGB", (4, 4), (255, 0, 0)).save(root / name)
        elif i != 13:
            img.save(root / name)
        rows.append({"file_name": name, "text": "" if i == 11 else caption})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _cfg(tmp_path: Path, *overrides: str):
    root = tmp_path / "data" if (tmp_path / "data").exists() else _dirty_folder(tmp_path / "data")
    return load_config(
        TINY,
        [
            f"run_dir={tmp_path / 'run'}",
            "data.builtin=null",
            f"data.path={root}",
            "num_iterations=1",
            "eval.enabled=false",
            "data.min_image_side=8",
            *overrides,
        ],
    )


def test_skip_trains_past_bad_examples_and_lists_them(tmp_path: Path):
    summary = run(
        _cfg(
            tmp_path,
            "data.on_bad_example=skip",
            "data.max_bad_fraction=0.25",
            "eval.enabled=true",
            "eval.num_prompts=4",
        ),
        progress=False,
    )
    run_dir = summary.run_dir
    skipped = [json.loads(line) for line in (run_dir / "skipped.jsonl").open()]
    assert len(skipped) == 4
    reasons = " | ".join(row["reason"] for row in skipped)
    assert "empty caption" in reasons and "cannot read image" in reasons and "4x4 px" in reasons
    assert "not found" in reasons
    state = json.loads((run_dir / "state.json").read_text())
    assert state["info"]["data"] == {"examples": 20, "used": 16, "skipped": 4}
    meta = json.loads((run_dir / "iter_00" / "generated" / "meta.json").read_text())
    assert meta["spec"]["num_prompts"] == 16  # θ_0 generated for the usable rows only
    assert (run_dir / "iter_01" / "model" / "model_index.json").exists()
    from spin_diffusion import report

    assert "Trained on 16 of 20 examples; 4 skipped as unusable" in report.collect_run(run_dir).summary


def test_error_policy_stops_at_the_first_bad_example(tmp_path: Path):
    with pytest.raises(SpinDiffusionError, match="not found|cannot read image|empty caption"):
        run(_cfg(tmp_path, "data.on_bad_example=error"), progress=False)


def test_too_many_bad_examples_are_refused(tmp_path: Path):
    with pytest.raises(SpinDiffusionError, match=r"unusable \(more than data.max_bad_fraction=0.1\)"):
        run(_cfg(tmp_path, "data.on_bad_example=skip", "data.max_bad_fraction=0.1"), progress=False)


def test_auto_policy_is_error_for_small_sets_and_skip_at_scale():
    assert data_lib.bad_example_policy(DataConfig(), 100) == "error"
    assert data_lib.bad_example_policy(DataConfig(), data_lib.AUTO_SKIP_ROWS) == "skip"
    assert data_lib.bad_example_policy(DataConfig(on_bad_example="error"), 10**6) == "error"
