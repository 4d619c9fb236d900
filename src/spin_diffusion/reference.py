"""train.precompute_reference: the reference's terms of every visit of an iteration's training, computed once while
θ_k is loaded (it has just generated the losers) and stored, so the training holds no reference model.

In self-play the reference of train:k+1 is θ_k. Every pair's timestep, noise and conditioning are fixed by its
place in the seeded pair stream before training starts (`trainer._MicroBatches`), so θ_k's denoising errors on the
winner and the loser of every visit (and, for the guard on the exact path at η > 0, its guided loser prediction)
can be computed ahead: `trainer.reference_outputs` computes them exactly as the training step would. This module
stores them and reads them back. Files in ``iter_k/reference/``::

    meta.json                        the run's key and layout (rank 0 writes it first; every rank checks it)
    rank00000-00000.safetensors      rank 0's micro-steps [0, S): ``errors`` [S·B, chunks, K] (and ``guided``)
    rank00000-00001.safetensors      rank 0's micro-steps [S, 2S) ...

Each rank computes and stores its own micro-steps, so N processes share the work and each reads back only its own
rows (a `cache.RowStore`, read a batch at a time). Shards are written atomically and carry the key in their
metadata: a killed precompute resumes at the first missing shard, and files made for another run (another seed,
model, data, settings or process count) are refused, never reused.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from spin_diffusion import atomic, preemption, trainer
from spin_diffusion.cache import RowStore, read_header, shard_key, write_shard
from spin_diffusion.config import LossConfig, Objective, TrainConfig
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.families import Family

META_FILE = "meta.json"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A digest of `model`'s weights: per tensor its name, shape, dtype, sum and sum of squares (in float64)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            values = tensor.detach().double()
            h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            h.update(struct.pack("<dd", values.sum().item(), values.square().sum().item()))
    return h.hexdigest()


def run_key(settings: dict[str, Any], model: torch.nn.Module) -> str:
    """The key of one iteration's stored terms: the settings they depend on (the run's seed, model, data, sampling,
    loss and training config, the iteration, the process count) and θ_k's weights."""
    blob = json.dumps({"settings": settings, "weights": weights_fingerprint(model)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _shard_path(folder: Path, rank: int, shard: int) -> Path:
    return folder / f"rank{rank:05d}-{shard:05d}.safetensors"


def _layout(data: trainer.TrainData, train_cfg: TrainConfig, world_size: int, shard_micro_steps: int) -> dict:
    micro_steps = trainer.num_optimizer_steps(len(data), train_cfg, world_size) * train_cfg.gradient_accumulation_steps
    return {
        "world_size": world_size,
        "micro_steps": micro_steps,  # per rank
        "batch_size": train_cfg.batch_size,
        "shard_micro_steps": shard_micro_steps,
        "shards": -(-micro_steps // shard_micro_steps),  # per rank
    }


def _check_meta(folder: Path, key: str, layout: dict, *, write: bool) -> None:
    """Refuse a folder made for another run; `write` (rank 0) creates meta.json when there is none."""
    path = folder / META_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") != key or saved.get("layout") != layout:
            raise SpinDiffusionError(
                f"{folder} holds reference terms of another run (other seed, model, data, settings or process "
                "count); delete that folder to compute them again"
            )
    elif write:
        folder.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, {"key": key, "layout": layout})


def precompute(
    model: torch.nn.Module,
    data: trainer.TrainData,
    folder: str | Path,
    *,
    key: str,
    objective: Objective,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    family: Family,
    seed: int,
    lora: bool = False,
    guidance: float | None = None,
    shard_micro_steps: int = 64,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
) -> None:
    """Compute and store this rank's reference terms for train(seed, data, configs) (`trainer.reference_outputs`),
    skipping the shards already written with this key. Stops early, keeping the finished shards, once SIGTERM or
    SIGINT was received (the caller stops the run). Every rank calls it; `barrier` waits for all of them."""
    folder = Path(folder)
    layout = _layout(data, train_cfg, world_size, shard_micro_steps)
    _check_meta(folder, key, layout, write=False)  # every rank, before any waits: all of them refuse together
    barrier()
    if rank == 0:
        _check_meta(folder, key, layout, write=True)
    barrier()
    done = {s for s in range(layout["shards"]) if shard_key(_shard_path(folder, rank, s)) == key}  # None if missing
    todo = layout["micro_steps"] - sum(
        min(shard_micro_steps, layout["micro_steps"] - s * shard_micro_steps) for s in done
    )
    bar = tqdm(total=todo, desc="reference", unit="step", disable=not progress)
    rows: dict[str, list[torch.Tensor]] = {"errors": [], "guided": []}
    outputs = trainer.reference_outputs(
        model,
        data,
        objective=objective,
        loss_cfg=loss_cfg,
        train_cfg=train_cfg,
        family=family,
        seed=seed,
        lora=lora,
        guidance=guidance,
        skip=lambda m: m // shard_micro_steps in done,
    )
    for m, errors, guided in outputs:
        rows["errors"].append(errors)
        if guided is not None:
            rows["guided"].append(guided)
        bar.update(1)
        if (m + 1) % shard_micro_steps == 0 or m + 1 == layout["micro_steps"]:
            tensors = {name: torch.cat(parts) for name, parts in rows.items() if parts}
            write_shard(_shard_path(folder, rank, m // shard_micro_steps), tensors, {"key": key})
            rows = {"errors": [], "guided": []}
            if preemption.requested():  # keep the finished shards; the caller stops every rank
                break
    outputs.close()
    bar.close()


def load(
    folder: str | Path,
    *,
    key: str,
    data: trainer.TrainData,
    train_cfg: TrainConfig,
    shard_micro_steps: int = 64,
    rank: int = 0,
    world_size: int = 1,
) -> trainer.ReferenceOutputs:
    """This rank's stored terms, read lazily (a batch at a time) by the training's data loader."""
    folder = Path(folder)
    layout = _layout(data, train_cfg, world_size, shard_micro_steps)
    _check_meta(folder, key, layout, write=False)
    paths = [_shard_path(folder, rank, s) for s in range(layout["shards"])]
    missing = [p.name for p in paths if not p.exists()]
    if missing or not (folder / META_FILE).exists():
        raise SpinDiffusionError(f"{folder} lacks reference terms ({missing[:1] or [META_FILE]}); rerun with --resume")
    try:
        errors = RowStore.open(paths, "errors", key=key)
        guided = RowStore.open(paths, "guided", key=key) if "guided" in read_header(paths[0])[0] else None
    except ValueError as err:
        raise SpinDiffusionError(f"{folder}: {err}; delete that folder to compute the terms again") from None
    return trainer.ReferenceOutputs(errors=errors, guided=guided)
