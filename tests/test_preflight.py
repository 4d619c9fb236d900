"""Checks before any expensive work: writable output folder, disk space estimated and refused with numbers."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from spin_diffusion import preflight
from spin_diffusion.config import TrainConfig, load_config
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.self_play import run

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_estimate_adds_up_what_a_run_writes():
    """SD-1.5-like: 1000 rows, 250 captions, fp16 cache, 3 iterations of spin_exact with 50 steps."""
    sizes = dict(
        num_rows=1000,
        num_captions=250,
        latent_shape=(4, 64, 64),
        embed_shape=(77, 768),
        cache_dtype="fp16",
        images_per_row=1,
        iterations=3,
        self_play=True,
        store_dtype="bf16",
        trajectory_steps=50,
        pipeline_params=1_000_000,
        denoiser_params=800_000,
        trainable_params=800_000,
        eval_images=10,
        image_pixels=512 * 512,
    )
    est = preflight.estimate_run_bytes(**sizes)
    assert est.cache == 1000 * 16384 * 2 + 250 * 77 * 768 * 2
    assert est.samples == 3 * 1000 * 16384 * 2 * 51
    assert est.exports == 3 * 1_000_000 * 4
    assert est.checkpoints == 2 * 4 * (800_000 + 2 * 800_000)
    assert est.eval_images == 4 * 10 * 512 * 512 * 3 // 2
    assert est.total == est.cache + est.samples + est.exports + est.checkpoints + est.eval_images
    per_caption = preflight.estimate_run_bytes(**sizes, opponent_samples=250)  # sample.per_caption=one
    assert per_caption.samples == 3 * 250 * 16384 * 2 * 51 and per_caption.cache == est.cache


def test_a_run_that_does_not_fit_is_refused_with_numbers_and_writes_nothing(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    run_dir = tmp_path / "run"
    with pytest.raises(SpinDiffusionError, match=r"needs about .* GB \(cache .*but its disk has 0.00 GB free"):
        run(load_config(TINY, [f"run_dir={run_dir}"]), progress=False)
    assert not run_dir.exists()


def test_run_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpinDiffusionError, match="is a file, not a folder"):
        run(load_config(TINY, [f"run_dir={tmp_path / 'file' / 'run'}"]), progress=False)


@pytest.mark.parametrize(
    ("train", "package", "message"),
    [
        ({"report_to": "wandb"}, "wandb", r"train.report_to=wandb needs the wandb package: pip install wandb"),
        (
            {"optimizer": "adamw8bit"},
            "bitsandbytes",
            r'train.optimizer=adamw8bit needs the bitsandbytes package: pip install "spin-diffusion\[8bit\]"',
        ),
    ],
)
def test_a_tracker_or_optimizer_without_its_package_is_one_line(monkeypatch, train, package, message):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(SpinDiffusionError, match=message):
        preflight.check_training(TrainConfig(**train))
    monkeypatch.undo()
    preflight.check_training(TrainConfig(**train))  # installed here (dev extra)
    preflight.check_training(TrainConfig(report_to="none"))


def test_ema_under_fsdp_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SpinDiffusionError, match="train.ema_decay is not supported with FSDP"):
        run(load_config(TINY, [f"run_dir={tmp_path / 'run'}", "train.ema_decay=0.99"]), progress=False)
    assert not (tmp_path / "run").exists()
