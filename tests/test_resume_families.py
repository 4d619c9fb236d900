"""Every family resumes past iteration 1: kill -9 during iteration 2's generation and during its training, then
--resume, ends with exactly the weights of an uninterrupted run (SD, SDXL, SD3, SD3.5 with LoRA, FLUX, Z-Image,
Qwen-Image, FLUX.2 klein; FLUX on 2 processes). At k > 0 the opponent θ_k is read back from iter_k/model, so this
is the test of that loader.

Cheap by construction: one uninterrupted reference run per case, and the interrupted run starts from a copy of it
cut back to the moment train:1 was recorded (what a kill right after iteration 1 leaves: state.json lists
generate:0 and train:1, iter_01/model is exported, nothing of iteration 2 exists)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _launch import interrupt_when, set_args, spin_in_process, torchrun_args

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
# 8 rows, 2 iterations of 6 steps x batch 2: each iteration samples 8 prompts into 8 shards (16 steps each, so a kill
# lands mid-generation) and checkpoints every step
CONFIG = [
    "num_iterations=2",
    "data.num_builtin=8",
    "sample.num_steps=16",
    "sample.shard_size=1",
    "sample.batch_size=1",
    "train.batch_size=2",
    "train.max_steps=6",
    "train.checkpoint_every=1",
    "eval.enabled=false",
]
# case id -> (processes, overrides); the T5 of SD3/FLUX is cut to 16 tokens to keep them cheap
CASES = {
    "tiny": (1, ["model.preset=tiny"]),
    "tiny-sdxl": (1, ["model.preset=tiny-sdxl"]),
    "tiny-sd3": (1, ["model.preset=tiny-sd3", "model.max_sequence_length=16"]),
    "tiny-sd35-lora": (1, ["model.preset=tiny-sd35", "model.max_sequence_length=16", "model.lora_rank=2"]),
    "tiny-flux": (1, ["model.preset=tiny-flux", "model.max_sequence_length=16", "sample.guidance_scale=3.5"]),
    "tiny-flux-2proc": (2, ["model.preset=tiny-flux", "model.max_sequence_length=16", "sample.guidance_scale=3.5"]),
    "tiny-zimage": (1, ["model.preset=tiny-zimage"]),
    "tiny-qwenimage": (1, ["model.preset=tiny-qwenimage", "model.max_sequence_length=192"]),
    "tiny-flux2": (1, ["model.preset=tiny-flux2"]),
}


def _command(case: str, run_dir: Path, *extra: str) -> list[str]:
    nproc, overrides = CASES[case]
    args = ["--config", str(TINY), "--run-dir", str(run_dir), *set_args(CONFIG + overrides), *extra]
    if nproc == 1:
        return [sys.executable, "-m", "spin_diffusion.cli", "spin", *args]
    return torchrun_args(nproc, "spin", *args)


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _completed(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "state.json").read_text())["completed"]


def _denoiser(run_dir: Path, k: int) -> dict[str, torch.Tensor]:
    """θ_k's exported weights (unet/ or transformer/)."""
    model = run_dir / f"iter_{k:02d}" / "model"
    folder = model / "transformer" if (model / "transformer").is_dir() else model / "unet"
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


pytestmark = pytest.mark.heavy  # real processes: left out of `scripts/test.sh --quick`


@pytest.fixture(scope="module", params=list(CASES))
def reference(request, tmp_path_factory) -> tuple[str, Path]:
    """An uninterrupted run of the case (single-process cases in this process: they need no process of their own)."""
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    nproc, overrides = CASES[request.param]
    if nproc == 1:
        spin_in_process(TINY, CONFIG + overrides, run_dir)
    else:
        _run(_command(request.param, run_dir))
    assert _completed(run_dir) == ["generate:0", "reference:0", "train:1", "generate:1", "reference:1", "train:2"]
    return request.param, run_dir


def _cut_after_iteration_1(ref_dir: Path, run_dir: Path) -> None:
    """A copy of the finished run as a kill right after train:1 was recorded leaves it."""
    shutil.copytree(ref_dir, run_dir)
    config = run_dir / "config.yaml"  # the copy's own run_dir, as --run-dir sets it
    config.write_text(config.read_text().replace(f"run_dir: {ref_dir}\n", f"run_dir: {run_dir}\n"))
    assert f"run_dir: {run_dir}\n" in config.read_text()
    shutil.rmtree(run_dir / "iter_01" / "generated")
    shutil.rmtree(run_dir / "iter_02")
    state = json.loads((run_dir / "state.json").read_text())
    kept = ["generate:0", "reference:0", "train:1"]
    info = {k: v for k, v in state["info"].items() if k in kept or ":" not in k}
    (run_dir / "state.json").write_text(json.dumps({"completed": kept, "info": info}))


def test_kill9_during_iteration_2_then_resume_equals_uninterrupted(tmp_path: Path, reference):
    case, ref_dir = reference
    run_dir = tmp_path / "run"
    _cut_after_iteration_1(ref_dir, run_dir)
    gen = run_dir / "iter_01" / "generated"
    ckpts = run_dir / "iter_02" / "train" / "checkpoints"

    # kill -9 during generate:1 (θ_1, read back from iter_01/model, samples)
    interrupt_when(_command(case, run_dir, "--resume"), lambda: (gen / "shard_00001.safetensors").exists(), env=ENV)
    assert "generate:1" not in _completed(run_dir)
    assert not (gen / "shard_00007.safetensors").exists()
    # kill -9 during train:2, after its first checkpoint
    interrupt_when(
        _command(case, run_dir, "--resume"),
        lambda: ckpts.exists() and any(p.name.startswith("step_") for p in ckpts.iterdir()),
        env=ENV,
    )
    assert "generate:1" in _completed(run_dir) and "train:2" not in _completed(run_dir)
    _run(_command(case, run_dir, "--resume"))

    assert _completed(run_dir) == ["generate:0", "reference:0", "train:1", "generate:1", "reference:1", "train:2"]
    ref_gen = ref_dir / "iter_01" / "generated"
    for i in range(8):  # θ_1's samples are the uninterrupted run's
        name = f"shard_{i:05d}.safetensors"
        assert torch.equal(load_file(str(gen / name))["latents"], load_file(str(ref_gen / name))["latents"])
    w, ref = _denoiser(run_dir, 2), _denoiser(ref_dir, 2)
    assert w.keys() == ref.keys()
    for name in ref:
        assert torch.equal(w[name], ref[name]), f"{case}: weight {name} of θ_2 differs after the resumed run"
    assert any(not torch.equal(ref[name], _denoiser(ref_dir, 1)[name]) for name in ref)  # iteration 2 trained
