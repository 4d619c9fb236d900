"""SIGTERM (cluster preemption) with real signals to real processes, 1 and 2 processes: the current optimizer step
or generation shard finishes, a checkpoint is written, the run exits with EXIT_PREEMPTED and says how to resume;
`--resume` then ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _launch import interrupt_when, set_args, spin_in_process, torchrun_args
from spin_diffusion.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.heavy  # real processes: left out of `scripts/test.sh --quick`

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
CONFIG = [
    "num_iterations=1",
    "data.num_builtin=48",
    "sample.shard_size=4",
    "sample.num_steps=8",
    "train.max_steps=40",
    "train.checkpoint_every=1000",
    "train.batch_size=2",
    "eval.enabled=false",
]


def _command(nproc: int, run_dir: Path, *extra: str) -> list[str]:
    args = ["--config", str(TINY), "--run-dir", str(run_dir), *set_args(CONFIG), *extra]
    if nproc == 1:
        return [sys.executable, "-m", "spin_diffusion.cli", "spin", *args]
    return torchrun_args(nproc, "spin", *args)


@pytest.fixture(scope="module", params=[1, 2], ids=["1proc", "2proc"])
def reference(request, tmp_path_factory) -> tuple[int, Path]:
    nproc = request.param
    run_dir = tmp_path_factory.mktemp(f"pre{nproc}") / "run"
    if nproc == 1:  # in this process: the reference needs no process of its own
        spin_in_process(TINY, CONFIG, run_dir)
        return nproc, run_dir
    done = subprocess.run(_command(nproc, run_dir), capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return nproc, run_dir


def _unet(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "iter_01" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("phase", ["generate", "train"])
def test_sigterm_checkpoints_exits_75_and_resumes_identically(tmp_path: Path, reference, phase: str):
    nproc, ref_dir = reference
    run_dir = tmp_path / "run"
    gen = run_dir / "iter_00" / "generated"
    log = run_dir / "iter_01" / "train" / "train_log.jsonl"
    ready = (
        (lambda: (gen / "shard_00001.safetensors").exists())
        if phase == "generate"
        else (lambda: log.exists() and len(log.read_text().splitlines()) >= 3)
    )
    # to the launcher (torchrun forwards it to every rank)
    proc = interrupt_when(_command(nproc, run_dir), ready, env=ENV, sig=signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED if nproc == 1 else proc.returncode != 0, stderr[-3000:]
    assert "preempted:" in stderr and "--resume" in stderr
    state = run_dir / "state.json"
    completed = json.loads(state.read_text())["completed"] if state.exists() else []
    assert "train:1" not in completed
    if phase == "train":
        assert "generate:0" in completed
        ckpts = list((run_dir / "iter_01" / "train" / "checkpoints").glob("step_*"))
        assert len(ckpts) == 1 and 3 <= int(ckpts[0].name[5:]) < 40  # written at the step the signal stopped
    else:
        assert "generate:0" not in completed
    done = subprocess.run(_command(nproc, run_dir, "--resume"), capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    w, ref = _unet(run_dir), _unet(ref_dir)
    for name in ref:
        assert torch.equal(w[name], ref[name]), f"UNet weight {name} differs after the preempted run resumed"
