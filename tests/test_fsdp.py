"""FSDP (accelerate's FSDP2, `fully_shard`) with two real processes on CPU.

accelerate 1.15 runs an FSDP config as plain DDP on CPU (it keeps DistributedType.MULTI_CPU), so these tests
launch the shipped `configs/accelerate/fsdp.yaml` with `accelerate launch` through `tests/_fsdp_on_cpu.py`, which
flips only that decision; prepare, the sharded AdamW, save_state/load_state and the gather at the end of training
are the production code. Each test compares against the same run in one process at the effective batch of the two
ranks, which is what DDP trains (test_multiprocess.py checks 2 ranks × B against 1 process × 2B).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _families
from _launch import interrupt_when, set_args, spin_in_process, torchrun_args

pytestmark = pytest.mark.heavy  # real processes: left out of `scripts/test.sh --quick`

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ONE_ITER = ["num_iterations=1", "eval.enabled=false"]


def _fsdp_args(run_dir: Path, overrides: list[str], config: Path = FSDP_CONFIG) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        str(REPO / "tests" / "_fsdp_on_cpu.py"),
        "spin",
        "--config",
        str(TINY),
        "--run-dir",
        str(run_dir),
        *set_args(overrides),
    ]


def _ddp_args(run_dir: Path, overrides: list[str]) -> list[str]:
    return torchrun_args(2, "spin", "--config", str(TINY), "--run-dir", str(run_dir), *set_args(overrides))


def _one_process(run_dir: Path, overrides: list[str]) -> None:
    """The same run in this process at the effective batch of two ranks (tiny.yaml's 4 per rank: 8). Two DDP ranks
    × batch B train what one process × 2B trains up to float summation order (test_multiprocess.py checks it), so
    this stands for the DDP run without starting one (three processes, each paying its imports)."""
    spin_in_process(TINY, [*overrides, "train.batch_size=8"], run_dir)


def _run(args: list[str], *, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, env=env or ENV, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _unet(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "iter_01" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def _completed(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "state.json").read_text())["completed"]


def _assert_close_relative_to_update(fsdp: dict, one: dict) -> None:
    """FSDP reduce-scatters the ranks' gradients where one process sums its batch at once (and DDP all-reduces),
    so the sums run in a different order: the weights may differ by float rounding only. As in
    test_multiprocess.py the bound is relative to the update θ_1 - θ_0: 1e-3 of it is ~1000x the float32 rounding
    of these sums (measured against DDP: ~7e-5)
    and far below a real error (a missing gradient, a rank's shard not gathered, a wrong reference all change
    the update by O(1))."""
    from spin_diffusion.presets import build_preset

    base = build_preset("tiny", seed=0).denoiser.state_dict()
    assert fsdp.keys() == one.keys() and not any("lora" in n for n in fsdp)
    diff = torch.cat([(fsdp[n] - one[n]).flatten() for n in one]).norm()
    update = torch.cat([(one[n] - base[n]).flatten() for n in one]).norm()
    assert update > 0
    assert diff <= 1e-3 * update, f"|FSDP − one process| = {diff:.3g}, update = {update:.3g}"


@pytest.mark.parametrize("overrides", [[], ["model.lora_rank=4", "train.learning_rate=1e-2"]], ids=["full", "lora"])
def test_fsdp_two_processes_train_what_one_process_trains(tmp_path: Path, overrides: list[str]):
    """... and render the validation images while training: under FSDP every rank renders every prompt with the
    sharded module (the same forwards, so the shard gathers match: no hang)."""
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    validation = ["eval.validation_prompts=[a red circle on the left, a blue square, a green triangle]",
                  "eval.validation_every=2"]  # fmt: skip
    _run(_fsdp_args(fsdp, [*ONE_ITER, *overrides, *validation]))
    _one_process(one, [*ONE_ITER, *overrides, *validation])
    assert _completed(fsdp) == _completed(one) == ["generate:0", "reference:0", "train:1"]
    _assert_close_relative_to_update(_unet(fsdp), _unet(one))
    for run_dir in (fsdp, one):
        rendered = sorted(p.relative_to(run_dir / "iter_01" / "validation").as_posix()
                          for p in (run_dir / "iter_01" / "validation").rglob("*.png"))  # fmt: skip
        assert rendered == [f"step_000000{s}/0000{i}.png" for s in (2, 4) for i in range(3)]
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(fsdp / "iter_01" / "model", local_files_only=True)
    torch.testing.assert_close(pipe.unet.state_dict(), _unet(fsdp), rtol=0, atol=0)


@pytest.mark.parametrize("preset", _families.TRANSFORMERS)
def test_transformer_families_shard_with_their_config_and_train_what_one_process_trains(tmp_path: Path, preset: str):
    """configs/accelerate/fsdp_sd3.yaml, fsdp_flux.yaml, fsdp_zimage.yaml, fsdp_qwenimage.yaml and fsdp_flux2.yaml wrap
    the families' own blocks (the UNet config's BasicTransformerBlock does not exist there, and accelerate refuses
    it); FSDP gives the update of one process at the same batch."""
    from spin_diffusion.presets import build_preset

    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    overrides = [*ONE_ITER, *_families.settings(preset)]
    config = REPO / "configs" / "accelerate" / f"fsdp_{preset.removeprefix('tiny-')}.yaml"
    _run(_fsdp_args(fsdp, overrides, config))
    _one_process(one, overrides)
    w_fsdp, w_one = (
        load_file(str(d / "iter_01" / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
        for d in (fsdp, one)
    )
    base = build_preset(preset, seed=0).denoiser.state_dict()
    diff = torch.cat([(w_fsdp[n] - w_one[n]).flatten() for n in w_one]).norm()
    update = torch.cat([(w_one[n] - base[n]).flatten() for n in w_one]).norm()
    assert update > 0 and diff <= 1e-3 * update, f"|FSDP − one process| = {diff:.3g}, update = {update:.3g}"


def test_fsdp_config_without_the_cpu_override_runs_ddp_and_says_so(tmp_path: Path):
    """What a user gets from accelerate on CPU: two processes, plain DDP, one warning line."""
    run_dir = tmp_path / "run"
    done = _run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(FSDP_CONFIG),
            "-m",
            "spin_diffusion.cli",
            "spin",
            "--config",
            str(TINY),
            "--run-dir",
            str(run_dir),
            *set_args([*ONE_ITER, "train.max_steps=1"]),
        ]
    )
    assert done.stderr.count("accelerate does not shard on CPU") == 1
    assert _completed(run_dir) == ["generate:0", "reference:0", "train:1"]


# ------------------------------------------------------------------------------------------------------------
# kill -9 of all ranks during FSDP training, then --resume: sharded checkpoints give back the same weights

KILL = [
    "num_iterations=1",
    "data.num_builtin=32",
    "train.max_steps=8",
    "train.checkpoint_every=2",
    "train.batch_size=2",
    "eval.enabled=false",
]


def test_fsdp_kill9_then_resume_equals_uninterrupted(tmp_path: Path):
    reference, run_dir = tmp_path / "uninterrupted", tmp_path / "run"
    _run(_fsdp_args(reference, KILL))
    ckpts = run_dir / "iter_01" / "train" / "checkpoints"
    seen: list[str] = []

    def checkpoint_written() -> bool:
        found = [p for p in ckpts.glob("step_*")] if ckpts.exists() else []
        if found:
            seen.extend(sorted(q.name for q in found[0].iterdir()))
        return bool(found)

    interrupt_when(_fsdp_args(run_dir, KILL), checkpoint_written, env=ENV)  # kill -9 of the launcher and both ranks
    assert not (run_dir / "iter_01" / "model").exists()
    assert "pytorch_model_fsdp_0" in seen, seen  # accelerate's sharded (DCP) FSDP checkpoint, not a DDP one
    _run([*_fsdp_args(run_dir, KILL), "--resume"])
    assert _completed(run_dir) == ["generate:0", "reference:0", "train:1"]
    resumed, uninterrupted = _unet(run_dir), _unet(reference)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), f"UNet weight {name} differs after resume"
    steps = [json.loads(line)["step"] for line in (run_dir / "iter_01" / "train" / "train_log.jsonl").open()]
    assert steps == list(range(1, 9))


def test_deepspeed_config_without_deepspeed_is_one_line(tmp_path: Path):
    from accelerate.utils import is_deepspeed_available

    if is_deepspeed_available():
        pytest.skip("deepspeed is installed")
    done = subprocess.run(
        _ddp_args(tmp_path / "run", ONE_ITER),
        capture_output=True,
        text=True,
        timeout=120,
        env={**ENV, "ACCELERATE_USE_CPU": "1", "ACCELERATE_USE_DEEPSPEED": "true"},
    )
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "deepspeed is not installed" in lines[0], done.stderr[-3000:]
    assert not (tmp_path / "run").exists()
