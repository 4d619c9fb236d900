"""rundir.py (layout, the one eval.json schema), atomic.py and images.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from spin_diffusion import atomic, rundir
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.images import pil_to_tensor, save_grid, tensor_to_pil


def test_iter_dir_and_iterations_are_inverse(tmp_path):
    for k in (0, 2, 10):
        rundir.iter_dir(tmp_path, k).mkdir()
    (tmp_path / "iter_x").mkdir()
    (tmp_path / "iter_03").write_text("a file, not an iteration")
    assert rundir.iterations(tmp_path) == [(k, rundir.iter_dir(tmp_path, k)) for k in (0, 2, 10)]
    assert rundir.iter_dir(tmp_path, 2).name == "iter_02"


def test_eval_json_round_trip(tmp_path):
    models = [
        rundir.ModelEval("a", {"judge": 0.5, "fd": math.nan}, {"judge": [0.0, 1.0]}, grid="a.png", grid_size=2),
        rundir.ModelEval("b", {"judge": 1.0, "judge_win_rate": 0.75}),
    ]
    ev = rundir.EvalFile(prompts=["p", "q"], models=models, sampler={"seed": 1, "num_steps": 4}, baseline="a")
    path = rundir.write_eval(tmp_path / "sub" / "eval.json", ev)
    raw = json.loads(path.read_text())
    assert list(raw) == ["prompts", "sampler", "baseline", "models"] and raw["models"][0]["metrics"]["fd"] is None
    back = rundir.read_eval(path)
    assert back.model("b") == models[1] and back.model("a").metrics == {"judge": 0.5, "fd": None}
    assert back.prompts == ["p", "q"] and back.baseline == "a" and back.sampler == {"seed": 1, "num_steps": 4}
    assert not list(tmp_path.glob("sub/*.tmp"))
    with pytest.raises(SpinDiffusionError, match="no model 'c'"):
        back.model("c")
    with pytest.raises(SpinDiffusionError, match="no model None"):
        back.model()  # two models: the name is needed
    with pytest.raises(SpinDiffusionError, match="does not exist"):
        rundir.read_eval(tmp_path / "nope.json")
    path.write_text("{")
    with pytest.raises(SpinDiffusionError, match="not valid JSON"):
        rundir.read_eval(path)


def test_atomic_write_leaves_the_old_file_on_error(tmp_path):
    target = atomic.write_json(tmp_path / "a" / "state.json", {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    with pytest.raises(RuntimeError), atomic.path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"x": 1} and sorted(p.name for p in target.parent.iterdir()) == [
        "state.json"
    ]
    with atomic.path(target, per_process=True) as tmp:
        assert ".tmp" in tmp.name and str(__import__("os").getpid()) in tmp.name
        tmp.write_text("{}")
    assert target.read_text() == "{}"


def test_pil_tensor_round_trip_and_grid(tmp_path):
    images = [Image.new("RGB", (4, 2), (255, 0, 0)), Image.new("RGB", (4, 2), (0, 128, 255))]
    x = pil_to_tensor(images)
    assert x.shape == (2, 3, 2, 4) and x.dtype == torch.float32
    assert torch.equal(x[0, :, 1, 3], torch.tensor([1.0, 0.0, 0.0]))
    assert [list(im.getdata()) for im in tensor_to_pil(x)] == [list(im.getdata()) for im in images]
    assert pil_to_tensor(images, size=(8, 8)).shape == (2, 3, 8, 8)
    with pytest.raises(SpinDiffusionError, match="differ in size"):
        pil_to_tensor([images[0], Image.new("RGB", (2, 2))])
    assert save_grid(images * 20, tmp_path / "g.png") == 32
    assert Image.open(tmp_path / "g.png").size == (8 * 4 * 16 + 9 * 2, 4 * 2 * 16 + 5 * 2)
