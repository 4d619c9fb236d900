"""Checks that run before any expensive work: is the output folder writable, and will the run fit on its disk?

The disk estimate adds up what a run writes (the latent cache, every iteration's opponent samples, the exported
pipelines, the training checkpoints while they exist, evaluation images) from the sizes that decide them: the
number of prompts and distinct captions, the latent and embedding shapes, the storage dtypes and the model's
parameter counts. A run that would not fit is refused with the numbers, before it encodes or generates anything.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from spin_diffusion import distributed, lean_imports
from spin_diffusion.config import TrainConfig
from spin_diffusion.errors import SpinDiffusionError

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
GB = 1e9


def existing_ancestor(path: Path) -> Path:
    """`path` itself or the nearest folder above it that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str = "output folder") -> None:
    """Refuse a folder that cannot be created or written to (checked on the nearest existing ancestor)."""
    base = existing_ancestor(path)
    if not base.is_dir():
        raise SpinDiffusionError(f"{what} {path}: {base} is a file, not a folder; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise SpinDiffusionError(f"{what} {path} cannot be written ({base} is not writable); choose another path")


@dataclass(frozen=True)
class DiskEstimate:
    """Bytes a run will write, by kind."""

    cache: int
    samples: int
    exports: int
    checkpoints: int
    eval_images: int

    @property
    def total(self) -> int:
        return self.cache + self.samples + self.exports + self.checkpoints + self.eval_images

    def describe(self) -> str:
        parts = [
            ("cache", self.cache),
            ("opponent samples", self.samples),
            ("exported models", self.exports),
            ("checkpoints", self.checkpoints),
            ("evaluation images", self.eval_images),
        ]
        return ", ".join(f"{name} {size / GB:.2f} GB" for name, size in parts if size)


def estimate_run_bytes(
    *,
    num_rows: int,
    num_captions: int,
    latent_shape: tuple[int, ...],
    embed_shape: tuple[int, ...],
    cache_dtype: str,
    images_per_row: int,
    iterations: int,
    self_play: bool,
    store_dtype: str,
    trajectory_steps: int | None,
    pipeline_params: int,
    denoiser_params: int,
    trainable_params: int,
    eval_images: int,
    image_pixels: int,
    opponent_samples: int | None = None,
    reference_bytes: int = 0,
) -> DiskEstimate:
    """What a run writes. `images_per_row` is 2 for preference pairs; `trajectory_steps` S stores S+1 latents per
    opponent sample (spin_exact); a checkpoint holds the denoiser's weights and AdamW's two moments of the trainable
    ones (fp32), and the newest is written before the previous one is removed, so two can exist at once.
    `opponent_samples` per iteration: one per row unless given (sample.per_caption=one: one per caption).
    `reference_bytes` per iteration: the reference's stored terms (train.precompute_reference), counted with the
    samples."""
    latent = math.prod(latent_shape)
    cache = (
        num_rows * images_per_row * latent * BYTES[cache_dtype]
        + num_captions * math.prod(embed_shape) * BYTES[cache_dtype]
    )
    per_sample = latent * BYTES[store_dtype] * ((trajectory_steps + 1) if trajectory_steps else 1)
    per_iteration = num_rows if opponent_samples is None else opponent_samples
    samples = iterations * (per_iteration * per_sample if self_play else 0) + iterations * reference_bytes
    exports = iterations * pipeline_params * 4
    checkpoints = 2 * 4 * (denoiser_params + 2 * trainable_params)
    evals = (iterations + 1) * eval_images * image_pixels * 3 // 2  # PNG: roughly half of the raw RGB bytes
    return DiskEstimate(cache, samples, exports, checkpoints, evals)


def check_disk(run_dir: Path, need: DiskEstimate, *, already_written: int = 0) -> None:
    """Refuse to start when the filesystem of `run_dir` has less free space than the run still needs."""
    free = shutil.disk_usage(existing_ancestor(run_dir)).free
    missing = need.total - already_written
    if missing > free:
        raise SpinDiffusionError(
            f"{run_dir} needs about {need.total / GB:.2f} GB ({need.describe()}) but its disk has {free / GB:.2f} GB "
            "free; free some space, choose another --run-dir, or store less (data.cache_dtype=bf16, "
            "sample.store_dtype=bf16, fewer num_iterations)"
        )


def folder_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 if it does not exist)."""
    if not Path(path).exists():
        return 0
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def check_training(train: TrainConfig) -> None:
    """Refuse, before any work, a train.* setting this installation cannot run: a tracker or optimizer whose
    package is missing, or an EMA under FSDP (the EMA would have to follow the sharded weights)."""
    import importlib.util

    if train.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise SpinDiffusionError(
            "train.report_to=wandb needs the wandb package: pip install wandb (or set train.report_to: tensorboard)"
        )
    if train.optimizer == "adamw8bit" and not lean_imports.installed("bitsandbytes"):
        raise SpinDiffusionError(
            'train.optimizer=adamw8bit needs the bitsandbytes package: pip install "spin-diffusion[8bit]" '
            "(or set train.optimizer: adamw)"
        )
    if train.ema_decay is not None and distributed.fsdp_requested():
        raise SpinDiffusionError(
            "train.ema_decay is not supported with FSDP (the EMA would follow sharded weights); "
            "train without it, or launch without the FSDP config (plain DDP keeps the EMA)"
        )
