"""One explicit training loop for every objective: sft, dpo, spin_approx, spin_exact, ddo and caption_contrast.

The loop reads top to bottom: pick the pairs of this micro-step → draw (t, ε) once per pair → noise
winner and loser with the same (t, ε) → policy errors (grad) and reference errors (no grad) → loss from
spin_diffusion.losses → backward → clip → AdamW step. `accelerate` handles devices, mixed precision,
gradient accumulation and distributed data parallelism (DDP, or FSDP when accelerate's config asks for it);
nothing else is hidden.

The trainer does not know about self-play iterations: the caller hands it a policy, a frozen reference
(or a LoRA policy whose disabled adapters are the reference) and tensors of cached latents.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm.auto import tqdm

from spin_diffusion import distributed, lean_imports, losses, models, objectives, preemption
from spin_diffusion.cache import RowStore
from spin_diffusion.config import LossConfig, Objective, TrainConfig
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.families import Cond, Family, ForwardProcess
from spin_diffusion.lora import adapters_disabled
from spin_diffusion.sampling import SamplerSchedule, valid_exact_steps

CHECKPOINT_PREFIX = "step_"
logger = logging.getLogger(__name__)


@dataclass
class TrainData:
    """Cached training tensors, row i = prompt i."""

    winner: torch.Tensor | RowStore  # [N, C, h, w] latents of the real (or preferred) images
    prompt_embeds: Cond | torch.Tensor | RowStore  # text conditioning of the N prompts (a tensor: [N, L, D] embeds)
    loser: torch.Tensor | RowStore | None = (
        None  # [N, C, h, w] latents of θ_k's sample (spin) or the rejected image (dpo)
    )
    loser_trajectory: torch.Tensor | RowStore | None = None  # [N, S+1, C, h, w] θ_k's sampling chain (spin_exact)
    sampler: SamplerSchedule | None = None  # spin_exact only
    empty_embed: Cond | torch.Tensor | None = None  # the empty prompt's conditioning (train.caption_dropout > 0)
    # SDXL's micro-conditioning, 6 numbers per image: [N, 6], or [1, 6] shared by every row (generated images)
    winner_time_ids: torch.Tensor | RowStore | None = None
    loser_time_ids: torch.Tensor | RowStore | None = None
    # The caption contrast (loss.caption_contrast_weight > 0, objective caption_contrast): the distinct-caption id of
    # every row [N] long, the first row of every distinct caption [U] long (its conditioning), and per caption id its
    # one-word neighbours' ids (loss.caption_contrast_negatives=one_word; None = random). `caption_table` builds them.
    caption_ids: torch.Tensor | None = None
    caption_first_row: torch.Tensor | None = None
    caption_neighbours: list[torch.Tensor] | None = None
    # sample.opponent_pool: the losers of earlier iterations, oldest first ([N, C, h, w] each, indexed by row), and
    # which rows each holds ([P, N] bool); `loser` is the latest, holding every visited row. None = latest only.
    loser_pool: tuple[torch.Tensor | RowStore, ...] | None = None
    loser_pool_has: torch.Tensor | None = None
    # spin_exact's guard: the opponent's classifier-free guidance (scale and unconditional input), to rebuild its
    # noise-free step target ε_guided(x'_t) when it sampled with η > 0 (losses.loser_guard_scale)
    guidance_scale: float = 1.0
    negative_embed: Cond | torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_embeds, Cond):
            self.prompt_embeds = Cond(self.prompt_embeds)
        if self.empty_embed is not None and not isinstance(self.empty_embed, Cond):
            self.empty_embed = Cond(self.empty_embed)
        if self.negative_embed is not None and not isinstance(self.negative_embed, Cond):
            self.negative_embed = Cond(self.negative_embed)

    def __len__(self) -> int:
        return self.winner.shape[0]

    def check(self, objective: Objective) -> None:
        n = len(self)
        spec = objectives.get(objective)
        if self.prompt_embeds.shape[0] != n:
            raise ValueError("winner and prompt_embeds differ in length")
        if (
            spec.loser in ("generated", "pairs")
            and not spec.trajectory
            and (self.loser is None or self.loser.shape != self.winner.shape)
        ):
            raise ValueError(f"{objective} needs loser latents shaped like the winners")
        if self.caption_ids is not None and (self.caption_ids.shape != (n,) or self.caption_first_row is None):
            raise ValueError("caption_ids must be [N] long, with caption_first_row")
        if self.loser_pool is not None and (
            self.loser_pool_has is None or self.loser_pool_has.shape != (len(self.loser_pool), n)
        ):
            raise ValueError("loser_pool needs loser_pool_has shaped [len(loser_pool), N]")
        if spec.trajectory:
            if self.loser_trajectory is None or self.sampler is None:
                raise ValueError("spin_exact needs the opponent's trajectories and sampler schedule")
            if self.loser_trajectory.shape[0] != n or self.loser_trajectory.shape[2:] != self.winner.shape[1:]:
                raise ValueError("loser_trajectory must be [N, S+1, C, h, w] matching the winners")


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken in total (including steps before a resume)
    resumed_from: int  # step of the checkpoint the run resumed from (0 = fresh)
    final_loss: float  # mean loss of the last logging window
    wall_seconds: float  # time spent in this call
    log_path: Path
    policy: torch.nn.Module | None = None  # the trained denoiser as an ordinary module (see `train`)


@dataclass
class ReferenceOutputs:
    """The frozen reference's terms for every visit of this rank's training, computed before it starts
    (train.precompute_reference; `reference_outputs`): row m·B + b is pair b of this rank's micro-step m."""

    errors: torch.Tensor | RowStore  # [M·B, chunks, K] denoising errors of winner, loser (and winner under c′)
    guided: torch.Tensor | RowStore | None = None  # [M·B, K, C, h, w] θ_k's guided loser prediction (exact guard)


class Validation(Protocol):
    """Renders a few fixed prompts with the model being trained (eval.validation_prompts; model_eval.Validation)."""

    prompts: list[str]
    every: int  # optimizer steps between renders

    def __call__(self, model: torch.nn.Module, step: int, *, every_rank_renders_all: bool) -> list[Image.Image] | None:
        """Call on every rank; the images in prompt order on the main process, None elsewhere."""


def set_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 matmuls and cuDNN convolutions on CUDA devices (train.allow_tf32); nothing elsewhere."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with train.* hyper-parameters: torch's (adamw) or bitsandbytes' with 8-bit states (adamw8bit)."""
    kwargs = dict(
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    if cfg.optimizer == "adamw8bit":
        bnb = lean_imports.import_module("bitsandbytes")  # the CLI holds it back until a run wants it
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def num_optimizer_steps(n: int, cfg: TrainConfig, world_size: int = 1) -> int:
    """max_steps, or the steps that make `epochs` passes over n pairs."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    return max(1, math.ceil(cfg.epochs * n / per_step))


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch `epoch` of the pair stream visits the n pairs. -> [n] long"""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch)))


class _IndexStream:
    """Pair indices for any micro-step, reproducible without state: epoch e visits a fixed permutation."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def take(self, start: int, count: int) -> torch.Tensor:
        out = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, self.n)
            if epoch not in self._perms:
                self._perms = {epoch: _epoch_perm(self.n, self.seed, epoch)}
            out.append(self._perms[epoch][offset])
        return torch.stack(out)


def stream_positions(n: int, cfg: TrainConfig, world_size: int = 1) -> int:
    """How many positions of the pair stream `train` consumes over n pairs: steps × accumulation × ranks × batch."""
    return num_optimizer_steps(n, cfg, world_size) * cfg.gradient_accumulation_steps * world_size * cfg.batch_size


def visited_rows(n: int, seed: int, num_positions: int) -> torch.Tensor:
    """The distinct pair indices that positions [0, num_positions) of `_IndexStream(n, seed)` visit, in the order
    of their first visit. Every index is visited once per epoch, so this is the first `num_positions` entries of
    epoch 0's permutation, or all n of them once the stream reaches a second epoch. -> [min(n, num_positions)] long
    """
    return _epoch_perm(n, seed, 0)[: max(0, min(n, num_positions))]


def reference_outputs(
    model: torch.nn.Module,
    data: TrainData,
    *,
    objective: Objective,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    family: Family,
    seed: int,
    lora: bool = False,
    guidance: float | None = None,
    skip: Callable[[int], bool] = lambda m: False,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """The reference's terms of every micro-step this rank's `train` will make, computed before it
    (train.precompute_reference): `train(..., reference=ReferenceOutputs(...))` with the collected outputs then
    trains exactly as with the reference model, without holding it.

    `model` is θ_k, the model training starts from: full fine-tuning's reference is a frozen copy of it in the
    mixed-precision dtype (made here only when that differs from its own, and freed at the end); a LoRA policy's
    (lora=True) is θ_k itself, as the policy with its adapters disabled. The same data, seed and configs as the
    training give the same batches, draws and autocast, so the terms are the ones `train` would compute.

    Yields, for each micro-step m not skipped, in order: (m, errors [B, chunks, K], guided [B, K, C, h, w] or None),
    on the CPU."""
    _check_arguments(model, None, data, objective, loss_cfg, train_cfg, ReferenceOutputs(torch.empty(0)))
    torch.set_flush_denormal(True)  # as `_accelerator` does for training
    accelerator = Accelerator(mixed_precision=train_cfg.mixed_precision)  # the training's autocast
    device = accelerator.device
    total = (
        num_optimizer_steps(len(data), train_cfg, accelerator.num_processes) * train_cfg.gradient_accumulation_steps
    )
    micro_batches = _micro_batches(data, seed, objective, loss_cfg, train_cfg, family, accelerator, 0, total)
    reference = model
    ref_dtype = _reference_dtype(train_cfg)
    if not lora and next(model.parameters()).dtype != ref_dtype:  # `train` casts its frozen copy the same way
        reference = models.frozen_copy(model, dtype=ref_dtype)
    reference.to(device)
    if not lora:
        reference.eval()

    def run_reference(fn):
        with torch.no_grad(), accelerator.autocast():
            return fn(reference)

    for m in range(total):
        if skip(m):
            continue
        f = _forward_inputs(
            micro_batches[m],
            objective=objective,
            loss_cfg=loss_cfg,
            family=family,
            device=device,
            sampler=data.sampler,
        )
        errors, guided = _reference_terms(
            run_reference,
            f,
            objective=objective,
            loss_cfg=loss_cfg,
            family=family,
            sampler=data.sampler,
            guidance=guidance,
            opponent_guidance=(data.guidance_scale, data.negative_embed),
        )
        if guided is not None:
            guided = guided.reshape(f.b, f.k, *guided.shape[1:]).cpu()
        yield m, errors.cpu(), guided


def _latest_checkpoint(ckpt_dir: Path) -> tuple[int, Path] | None:
    found = [
        (int(p.name[len(CHECKPOINT_PREFIX) :]), p)
        for p in ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return max(found) if found else None


def _truncate_log(log_path: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not log_path.exists():
        return
    kept = [
        line for line in log_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step
    ]
    log_path.write_text("".join(line + "\n" for line in kept))


def remove_checkpoints(out_dir: str | Path) -> None:
    """Delete the resumable checkpoints of a finished training (the exported model supersedes them)."""
    shutil.rmtree(Path(out_dir) / "checkpoints", ignore_errors=True)


def train(
    policy: torch.nn.Module,
    ref: torch.nn.Module | None,
    data: TrainData,
    *,
    objective: Objective,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    family: Family,
    out_dir: str | Path,
    seed: int,
    progress: bool = True,
    hparams: dict[str, Any] | None = None,
    validation: Validation | None = None,
    guidance: float | None = None,
    reference: ReferenceOutputs | None = None,
) -> TrainResult:
    """Train `policy` on `data` with `objective`; resumes from the latest checkpoint in `out_dir`.

    Use `TrainResult.policy` afterwards: it is `policy` itself (trained in place) under DDP or one process; under
    FSDP, whose prepared module holds only this rank's shard, it is a new, unsharded module with the full trained
    weights on every rank (`policy` must not be used any more).

    Args:
        policy: the denoiser being trained (full fine-tuning, or with a LoRA adapter added).
        ref: the frozen reference θ_k; None for sft, or for a LoRA policy (reference = adapters disabled).
        family: the model's family (`Components.family`): forward process, targets and how the network is called.
        out_dir: gets `train_log.jsonl`, the trackers' files (`tensorboard/`, `wandb/`: train_cfg.report_to) and
            `checkpoints/step_XXXXXXX/`.
        seed: seeds the pair order and the (t, ε) draws; the same seed gives the same run.
        hparams: the trackers' hyper-parameters (the run's whole config, flat: config.hparams); the values that
            train this iteration (β, learning rate, pairs per step) are added to them.
        validation: renders its prompts with the model (the EMA weights when train_cfg.ema_decay is set) every
            `validation.every` steps; the images go to the trackers.
        guidance: the guidance embedding's value for a guidance-distilled model (FLUX.1-dev; its sampling value,
            as diffusers' FLUX training scripts do); other families ignore it.
        reference: the reference's terms of every visit, computed before training by `reference_outputs` with the
            same data, seed and configs (train.precompute_reference); then `ref` is None and no reference runs.

    With train_cfg.ema_decay the returned policy holds the EMA of the trained weights.
    """
    _check_arguments(policy, ref, data, objective, loss_cfg, train_cfg, reference)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    log_path = out / "train_log.jsonl"

    # 1. Accelerator, optimizer, schedule, EMA
    accelerator = _accelerator(train_cfg, out)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    total_steps = num_optimizer_steps(len(data), train_cfg, accelerator.num_processes)
    for param in family.unused_parameters(policy):  # no gradient ever reaches them, and DDP refuses them
        param.requires_grad_(False)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, train_cfg)
    lr_scheduler = get_scheduler(
        train_cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train_cfg.warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    policy, optimizer, lr_scheduler = accelerator.prepare(policy, optimizer, lr_scheduler)
    if fsdp:  # the prepared module's (sharded) parameters; accelerate clips FSDP grads only for the whole list
        trainable = list(policy.parameters())
    if ref is not None:  # the frozen reference only runs forward: keep it in the mixed-precision dtype
        ref_dtype = _reference_dtype(train_cfg)
        cast = {} if next(ref.parameters()).dtype == ref_dtype else {"dtype": ref_dtype}  # diffusers warns on any cast
        ref.to(accelerator.device, **cast)
    device = accelerator.device
    ema = None
    if train_cfg.ema_decay is not None:
        if fsdp:  # preflight.check_training refuses it earlier; this guards direct callers
            raise SpinDiffusionError("train.ema_decay is not supported with FSDP")
        ema = EMAModel(trainable, decay=train_cfg.ema_decay)  # the trained parameters (LoRA: the adapters)
        accelerator.register_for_checkpointing(ema)  # saved in every checkpoint, restored by load_state

    # 2. Resume
    start_step = _resume(accelerator, ckpt_dir, log_path)
    if ema is not None:
        ema.to(device)  # load_state restores the EMA on the CPU
    _init_trackers(accelerator, out, objective, loss_cfg, train_cfg, hparams)

    ga = train_cfg.gradient_accumulation_steps
    if reference is not None and len(reference.errors) < total_steps * ga * train_cfg.batch_size:
        raise ValueError("the precomputed reference holds fewer visits than this training makes")
    first, count = start_step * ga, (total_steps - start_step) * ga
    micro_batches = _micro_batches(
        data, seed, objective, loss_cfg, train_cfg, family, accelerator, first, count, reference
    )
    # batch_size=None: each item already is one micro-batch; workers read the cache ahead of the GPU.
    loader = iter(
        torch.utils.data.DataLoader(micro_batches, batch_size=None, shuffle=False, num_workers=train_cfg.num_workers)
    )
    window: dict[str, list[float]] = defaultdict(list)
    last_loss = float("nan")
    started = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc=f"train {objective}",
        disable=not (progress and accelerator.is_main_process),
    )

    clock = preemption.Clock(train_cfg.checkpoint_every_minutes)
    loss_kw = dict(
        objective=objective,
        loss_cfg=loss_cfg,
        family=family,
        sampler=data.sampler,
        fsdp=fsdp,
        guidance=guidance,
        opponent_guidance=(data.guidance_scale, data.negative_embed),
    )
    policy.train()
    for step in range(start_step, total_steps):
        # 3. One optimizer step: `ga` micro-batches (accelerate accumulates their gradients), clip, step
        for _ in range(ga):
            batch = next(loader)
            with accelerator.accumulate(policy):
                loss, metrics = _micro_step_loss(policy, ref, batch, accelerator=accelerator, **loss_kw)
                accelerator.backward(loss)
                if accelerator.sync_gradients and train_cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, train_cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window["loss"].append(loss.detach().item())
            for name, value in metrics.items():
                window[name].append(value.float().mean().item())
        if ema is not None:
            ema.step(trainable)

        # 4. Log, render the validation prompts, checkpoint
        done = step + 1
        bar.update(1)
        if done % max(1, train_cfg.log_every) == 0 or done == total_steps:
            last_loss = _log_window(accelerator, log_path, window, step=done, lr=lr_scheduler.get_last_lr()[0])
            bar.set_postfix(loss=f"{last_loss:.4f}")
        if validation is not None and done % validation.every == 0:
            _validate(accelerator, policy, trainable, ema, validation, done, fsdp=fsdp)
        # Step-based and time-based checkpoints, and a stop asked for by SIGTERM/SIGINT: the ranks agree (one
        # all-reduce of two flags), so all of them checkpoint and stop after the same step.
        stop, time_due = preemption.agree(device, preemption.requested(), clock.due())
        step_due = train_cfg.checkpoint_every > 0 and done % train_cfg.checkpoint_every == 0
        if done < total_steps and (step_due or time_due or stop):
            _save_checkpoint(accelerator, ckpt_dir, done, train_cfg.checkpoints_total_limit)
            clock.reset()
        if stop and done < total_steps:
            bar.close()
            raise preemption.Preempted(
                f"training stopped at step {done} of {total_steps}; checkpoint saved in {ckpt_dir}"
            )

    bar.close()
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): it destroys the process group the run goes on with
        tracker.finish()
    if window:
        last_loss = float(np.mean(window["loss"]))
    elif math.isnan(last_loss):  # a resumed run that had nothing left to do still reports its last logged loss
        last_loss = _last_logged_loss(log_path)
    if ema is not None:
        ema.copy_to(trainable)  # the policy's own parameters (DDP wraps them, it does not copy them)
    trained = unsharded_copy(policy) if fsdp else accelerator.unwrap_model(policy)
    if fsdp:
        accelerator.free_memory()  # drop the sharded module and the optimizer states before the caller goes on
    trained.eval()
    return TrainResult(
        steps=total_steps,
        resumed_from=start_step,
        final_loss=last_loss,
        wall_seconds=time.perf_counter() - started,
        log_path=log_path,
        policy=trained,
    )


def _init_trackers(
    accelerator: Accelerator,
    out: Path,
    objective: Objective,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    hparams: dict[str, Any] | None,
) -> None:
    """The trackers' run (train.report_to): the whole config, and this iteration's β, rate and pairs per step."""
    accelerator.init_trackers(
        "spin_diffusion",
        config={
            **(hparams or {}),
            "objective": objective,
            "beta": loss_cfg.beta,
            "learning_rate": train_cfg.learning_rate,
            "pairs_per_step": train_cfg.batch_size * train_cfg.gradient_accumulation_steps * accelerator.num_processes,
        },
        init_kwargs={"wandb": {"dir": str(out), "name": f"{out.parent.name} {objective}"}},
    )


def _log_window(
    accelerator: Accelerator, log_path: Path, window: dict[str, list[float]], *, step: int, lr: float
) -> float:
    """Log the means of the steps since the last log line (train_log.jsonl and the trackers) and empty the window.
    -> the mean loss"""
    record = {"step": step, "lr": lr, **{k: float(np.mean(v)) for k, v in window.items()}}
    window.clear()
    accelerator.log(record, step=step)
    if accelerator.is_main_process:
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return record["loss"]


def _last_logged_loss(log_path: Path) -> float:
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    return json.loads(lines[-1]).get("loss", float("nan")) if lines else float("nan")


def _reference_dtype(train_cfg: TrainConfig) -> torch.dtype:
    """The frozen reference only runs forward: it is kept in the mixed-precision dtype."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(train_cfg.mixed_precision, torch.float32)


def _check_arguments(
    policy: torch.nn.Module,
    ref: torch.nn.Module | None,
    data: TrainData,
    objective: Objective,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    reference: ReferenceOutputs | None = None,
) -> None:
    """Programming errors of a caller (user input is checked long before, in config and preflight)."""
    data.check(objective)
    if reference is not None and (ref is not None or not objectives.get(objective).needs_ref):
        raise ValueError("a precomputed reference replaces `ref` (pass ref=None), for an objective with a reference")
    if isinstance(loss_cfg.beta, tuple) or isinstance(train_cfg.learning_rate, tuple):
        raise ValueError("resolve the per-iteration loss.beta / train.learning_rate first (config.for_iteration)")
    if train_cfg.total_batch_size is not None or train_cfg.scale_lr:
        raise ValueError(
            "resolve train.total_batch_size / train.scale_lr for the process count first (config.for_world)"
        )
    if train_cfg.caption_dropout > 0 and data.empty_embed is None:
        raise ValueError("train.caption_dropout > 0 needs TrainData.empty_embed")
    lora = bool(getattr(policy, "peft_config", None))
    if objectives.get(objective).needs_ref and ref is None and reference is None and not lora:
        raise ValueError(f"{objective} needs a reference model (or a LoRA policy)")
    if ref is not None and ref is policy:
        raise ValueError("policy and ref must be different objects; pass ref=None for a LoRA policy")


def _accelerator(train_cfg: TrainConfig, out: Path) -> Accelerator:
    """accelerate's Accelerator for this training (mixed precision, accumulation, trackers writing under `out`).

    On CPUs, subnormal floats (tiny gradients once the logistic saturates) make every op ~10x slower; flushing them
    to zero changes nothing measurable."""
    torch.set_flush_denormal(True)
    accelerator = Accelerator(
        mixed_precision=train_cfg.mixed_precision,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
        log_with=None if train_cfg.report_to == "none" else train_cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
    )
    _warn_if_fsdp_ignored(accelerator)
    if (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and accelerator.state.deepspeed_plugin.zero_stage == 3
    ):
        raise SpinDiffusionError(
            "DeepSpeed ZeRO-3 is not supported (the trained denoiser could not be exported on every "
            "rank); use ZeRO-2 or configs/accelerate/fsdp.yaml"
        )
    return accelerator


def _resume(accelerator: Accelerator, ckpt_dir: Path, log_path: Path) -> int:
    """Load the newest checkpoint into the prepared objects (model, optimizer, schedule, RNGs, EMA) and cut the log
    back to its step; a fresh start removes an old log. -> the step resumed from (0 = fresh)"""
    latest = _latest_checkpoint(ckpt_dir)
    if latest is None:
        if accelerator.is_main_process and log_path.exists():
            log_path.unlink()
        return 0
    step, path = latest
    saved_ranks = len(list(path.glob("random_states_*.pkl")))
    if saved_ranks and saved_ranks != accelerator.num_processes:
        raise SpinDiffusionError(
            f"the checkpoint {path} was written by {saved_ranks} processes and this run has "
            f"{accelerator.num_processes}; resume with {saved_ranks} (the effective batch depends on it)"
        )
    accelerator.load_state(str(path))
    if accelerator.is_main_process:
        _truncate_log(log_path, step)
    return step


def _validate(
    accelerator: Accelerator,
    policy: torch.nn.Module,
    trainable: list[torch.nn.Parameter],
    ema: EMAModel | None,
    validation: Validation,
    step: int,
    *,
    fsdp: bool,
) -> None:
    """Render the validation prompts with the current weights (their EMA, if any) and log the images.

    Every rank takes part: under FSDP each renders all prompts with the sharded module (same forwards, so the
    shard gathers match); otherwise the ranks share the prompts with the unwrapped module, which runs no
    collective. The training state is left exactly as it was (EMA swapped back, train mode restored)."""
    model = policy if fsdp else accelerator.unwrap_model(policy)
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    model.eval()
    images = validation(model, step, every_rank_renders_all=fsdp)
    model.train()
    if ema is not None:
        ema.restore(trainable)
    if images is None:
        return
    for tracker in accelerator.trackers:  # the main process's trackers
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(img.convert("RGB")) for img in images])
            tracker.log_images({"validation": stacked}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            shown = [wandb.Image(img, caption=p) for img, p in zip(images, validation.prompts, strict=True)]
            tracker.log({"validation": shown}, step=step)


def _warn_if_fsdp_ignored(accelerator: Accelerator) -> None:
    """accelerate 1.15 shards only on accelerators: on CPU an FSDP config silently becomes DDP (MULTI_CPU)."""
    if (
        accelerator.distributed_type == DistributedType.MULTI_CPU
        and distributed.fsdp_requested()
        and accelerator.is_main_process
    ):
        logger.warning(
            "the accelerate config asks for FSDP, but accelerate does not shard on CPU: "
            "this run is plain data parallel (DDP) with full weights on every process"
        )


def unsharded_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Every rank: an ordinary (unwrapped, unsharded) copy of the FSDP-prepared `model` with its full weights.

    Collective: every rank must call it. Works for FSDP2 (`fully_shard`, the module itself is the FSDP module)
    and FSDP1 (`FullyShardedDataParallel` wrapper). The copy is built on the meta device and takes the gathered
    tensors as its parameters (no second copy); LoRA adapters (`peft_config`) are re-added before loading.
    """
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    # cpu_offload=False: every rank gets the full tensors (True would give them to rank 0 only)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    inner = model.module if isinstance(model, FSDP1) else model
    cls = next(c for c in type(inner).__mro__ if not issubclass(c, FSDPModule))  # FSDP2: FSDP<Cls> -> <Cls>
    with init_empty_weights():
        copy = cls.from_config(inner.config)
        for name, peft_cfg in (getattr(inner, "peft_config", None) or {}).items():
            copy.add_adapter(peft_cfg, adapter_name=name)
    copy.load_state_dict(full, strict=True, assign=True)
    trainable = {n.replace("_fsdp_wrapped_module.", "") for n, p in inner.named_parameters() if p.requires_grad}
    for name, param in copy.named_parameters():
        param.requires_grad_(name in trainable)
    return copy


def _save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, step: int, keep: int | None) -> None:
    """Write checkpoints/step_N atomically, then keep the newest ``keep`` checkpoints (None: all of them)."""
    final = ckpt_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = ckpt_dir / f"tmp_{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, final)
        saved = sorted(p for p in ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX) :].isdigit())
        for old in saved[: -keep if keep else 0]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


@dataclass
class _Draws:
    """The random draws of one micro-batch, rows pair-major (b*K + k)."""

    t_or_step: torch.Tensor  # [B*K] training times (DDPM t, or flow σ), or (spin_exact) sampler step indices
    noise: torch.Tensor  # [B*K, C, h, w] ε for the winner (and the loser when shared)
    loser_noise: torch.Tensor  # [B*K, C, h, w] ε' for the loser
    drop_caption: torch.Tensor  # [B*K] bool: train this row on the empty prompt


def _draw_noise(
    positions: range,
    seed: int,
    *,
    latent_shape: torch.Size,
    k_steps: int,
    share_noise: bool,
    process: ForwardProcess,
    exact_steps: torch.Tensor | None,
    caption_dropout: float,
) -> _Draws:
    """Per pair: K timesteps (or, with `exact_steps`, K of those sampling-step indices) and the noises, from a
    generator keyed by (seed, position of the pair in the stream)."""
    shape = (k_steps, *latent_shape)
    ts, noises, loser_noises, drops = [], [], [], []
    for pos in positions:
        gen = torch.Generator().manual_seed(_seed(seed, 1, pos))
        if exact_steps is not None:
            ts.append(exact_steps[torch.randint(0, len(exact_steps), (k_steps,), generator=gen)])
        else:
            ts.append(process.draw_times(gen, k_steps, latent_shape))
        noises.append(torch.randn(shape, generator=gen))
        loser_noises.append(noises[-1] if share_noise else torch.randn(shape, generator=gen))
        drops.append((torch.rand(1, generator=gen) < caption_dropout).expand(k_steps))  # one draw per pair
    return _Draws(torch.cat(ts), torch.cat(noises), torch.cat(loser_noises), torch.cat(drops))


def _micro_batches(
    data: TrainData,
    seed: int,
    objective: Objective,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    family: Family,
    accelerator: Accelerator,
    first_micro_step: int,
    num_micro_steps: int,
    reference: ReferenceOutputs | None = None,
) -> _MicroBatches:
    """This rank's micro-batches of a training (`train`, and `reference_outputs` ahead of it)."""
    spec = objectives.get(objective)
    return _MicroBatches(
        data,
        seed,
        objective=objective,
        batch_size=train_cfg.batch_size,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        k_steps=loss_cfg.timesteps_per_pair,
        share_noise=loss_cfg.share_noise,
        process=family.process,
        exact_steps=valid_exact_steps(data.sampler) if spec.trajectory else None,
        caption_dropout=train_cfg.caption_dropout,
        contrast=loss_cfg.caption_contrast_weight > 0 or spec.loser == "caption",
        first_micro_step=first_micro_step,
        num_micro_steps=num_micro_steps,
        reference=reference,
    )


class _MicroBatches(torch.utils.data.Dataset):
    """Micro-step m of this rank -> the cached tensors of its B pairs and their (t, ε) draws.

    Pairs are picked by position in the seeded pair stream: micro-step m of rank r holds positions
    [(m·W + r)·B, (m·W + r + 1)·B), so W ranks × B pairs and 1 rank × W·B pairs visit the same pairs with the
    same draws. Only these rows are read from the cache (which may be an on-disk RowStore), so memory is
    O(batch), whatever the number of prompts. Rows of the returned tensors are pair-major (b*K + k).
    """

    def __init__(
        self,
        data: TrainData,
        seed: int,
        *,
        objective: Objective,
        batch_size: int,
        world_size: int,
        rank: int,
        k_steps: int,
        share_noise: bool,
        process: ForwardProcess,
        exact_steps: torch.Tensor | None,
        caption_dropout: float,
        first_micro_step: int,
        num_micro_steps: int,
        contrast: bool = False,
        reference: ReferenceOutputs | None = None,
    ) -> None:
        self.data, self.seed, self.objective = data, seed, objectives.get(objective)
        self.contrast, self.process = contrast, process
        if contrast and data.caption_ids is None:
            raise ValueError("the caption contrast needs TrainData.caption_ids (trainer.caption_table)")
        self.bsz, self.world, self.rank, self.k_steps = batch_size, world_size, rank, k_steps
        self.draw_kwargs = dict(
            k_steps=k_steps,
            share_noise=share_noise,
            process=process,
            exact_steps=exact_steps,
            caption_dropout=caption_dropout,
        )
        self.first, self.count = first_micro_step, num_micro_steps
        self.stream = _IndexStream(len(data), seed)
        self.reference = reference

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        first = ((self.first + i) * self.world + self.rank) * self.bsz
        idx = self.stream.take(first, self.bsz)  # [B]
        data, k = self.data, self.k_steps
        draws = _draw_noise(
            range(first, first + self.bsz), self.seed, latent_shape=data.winner.shape[1:], **self.draw_kwargs
        )
        context = data.prompt_embeds[idx].repeat_interleave(k)  # embeds [B*K, L, D]
        if draws.drop_caption.any():
            context = context.where(draws.drop_caption, data.empty_embed)
        batch = {
            "idx": idx,
            "winner": data.winner[idx].repeat_interleave(k, dim=0),
            "context": context.tensors(),
            "t_or_step": draws.t_or_step,
            "noise": draws.noise,
            "loser_noise": draws.loser_noise,
        }
        if self.objective.trajectory:
            traj = data.loser_trajectory[idx].repeat_interleave(k, dim=0)  # [B*K, S+1, C, h, w]
            rows = torch.arange(traj.shape[0])
            batch["loser_t"] = traj[rows, draws.t_or_step]  # x'_t and x'_{t-1} of the opponent's chain
            batch["loser_prev"] = traj[rows, draws.t_or_step + 1]
        elif self.objective.loser in ("generated", "pairs"):
            loser = data.loser[idx] if data.loser_pool is None else self._pool_losers(idx, first)
            batch["loser"] = loser.repeat_interleave(k, dim=0)
        if self.contrast:  # c′: another distinct caption per pair, drawn by the pair's place in the stream
            uniform = torch.cat(
                [torch.rand(1, generator=torch.Generator().manual_seed(_seed(self.seed, 2, pos))) for pos in
                 range(first, first + self.bsz)]
            )  # fmt: skip
            other = mismatched_captions(
                data.caption_ids[idx], uniform, len(data.caption_first_row), data.caption_neighbours
            )
            rows = data.caption_first_row[other]
            batch["mismatch_context"] = data.prompt_embeds[rows].repeat_interleave(k).tensors()
            # a pair trained on the empty prompt has no caption to contrast
            batch["caption_kept"] = ~draws.drop_caption
        for name in ("winner_time_ids", "loser_time_ids"):
            ids = getattr(data, name)
            if ids is not None:
                rows = ids[idx] if ids.shape[0] > 1 else ids.expand(len(idx), -1)
                batch[name] = rows.repeat_interleave(k, dim=0)
        if self.reference is not None:  # this rank's visits, in the order it makes them
            m = self.first + i
            batch["ref_errors"] = self.reference.errors[m * self.bsz : (m + 1) * self.bsz]
            if self.reference.guided is not None:
                batch["ref_guided"] = self.reference.guided[m * self.bsz : (m + 1) * self.bsz]
        return batch

    def _pool_losers(self, idx: torch.Tensor, first: int) -> torch.Tensor:
        """sample.opponent_pool: each pair's loser from one iteration of the pool that holds its row (the latest
        always does), drawn uniformly by the pair's place in the stream. -> [B, C, h, w]"""
        data = self.data
        pool = (*data.loser_pool, data.loser)
        rows = []
        for b, pos in enumerate(range(first, first + self.bsz)):
            i = idx[b : b + 1]
            held = [p for p in range(len(pool) - 1) if data.loser_pool_has[p, i].item()] + [len(pool) - 1]
            gen = torch.Generator().manual_seed(_seed(self.seed, 3, pos))
            rows.append(pool[held[torch.randint(0, len(held), (1,), generator=gen).item()]][i])
        return torch.cat(rows)


def caption_table(captions: list[str], one_word: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
    """TrainData's caption contrast fields from the rows' captions: (caption id per row [N], first row of each
    distinct caption [U], and with `one_word` each caption's one-word neighbours' ids, else None).

    Two captions are one-word neighbours when they have the same number of words and differ in exactly one of them
    ("a red circle" / "a blue circle"): found in O(U·L) by hashing every caption with each word masked in turn.
    Raises ValueError with fewer than 2 distinct captions (no c′ exists)."""
    ids: dict[str, int] = {}
    row_ids, first_row = [], []
    for i, caption in enumerate(captions):
        if caption not in ids:
            ids[caption] = len(ids)
            first_row.append(i)
        row_ids.append(ids[caption])
    if len(ids) < 2:
        raise ValueError(f"the caption contrast needs at least 2 distinct captions, got {len(ids)}")
    neighbours = None
    if one_word:
        masked: dict[tuple, list[int]] = defaultdict(list)
        for caption, u in ids.items():
            words = caption.split()
            for j in range(len(words)):
                masked[(len(words), j, *words[:j], *words[j + 1 :])].append(u)
        found: list[set[int]] = [set() for _ in ids]
        for group in masked.values():
            for u in group:
                found[u].update(v for v in group if v != u)
        neighbours = [torch.tensor(sorted(f), dtype=torch.long) for f in found]
    return torch.tensor(row_ids, dtype=torch.long), torch.tensor(first_row, dtype=torch.long), neighbours


def mismatched_captions(
    caption_ids: torch.Tensor, uniform: torch.Tensor, num_captions: int, neighbours: list[torch.Tensor] | None
) -> torch.Tensor:
    """The mismatched caption c′ of each pair: never its own caption.

    Pair b with caption u = ``caption_ids[b]`` and draw d = ``uniform[b]`` ∈ [0, 1) gets ``neighbours[u][⌊d·n⌋]``
    when u has n > 0 one-word neighbours, else the ⌊d·(U−1)⌋-th of the U − 1 other distinct captions (u skipped).
    -> ``[B]`` long caption ids"""
    out = []
    for u, d in zip(caption_ids.tolist(), uniform.tolist(), strict=True):
        near = neighbours[u] if neighbours is not None else None
        if near is not None and len(near):
            out.append(int(near[min(int(d * len(near)), len(near) - 1)]))
        else:
            j = min(int(d * (num_captions - 1)), num_captions - 2)
            out.append(j if j < u else j + 1)
    return torch.tensor(out, dtype=torch.long)


@dataclass
class _Forward:
    """One micro-batch as the models see it: rows [winner | loser (| winner under c′)] of B·K each, concatenated."""

    b: int  # pairs
    k: int  # timesteps per pair
    chunks: int  # 2, or 3 with the caption contrast beside the loss
    model_in: torch.Tensor  # [chunks·B·K, C, h, w] noised inputs
    t: torch.Tensor  # [B·K] training times (spin_exact: the opponent's step times)
    t2: torch.Tensor  # [chunks·B·K]
    context: Cond  # [chunks·B·K] conditioning
    time_ids: torch.Tensor | None  # SDXL's micro-conditioning, [chunks·B·K, 6]
    target: torch.Tensor  # [chunks·B·K, ...] regression targets
    loser_t: torch.Tensor  # [B·K, C, h, w] the noised loser (spin_exact: x'_t of the opponent's chain)

    def errors(self, pred: torch.Tensor) -> list[torch.Tensor]:
        """Per chunk, the denoising error of each row: [B, K] each."""
        return [e.reshape(self.b, self.k) for e in losses.denoise_error(pred, self.target).chunk(self.chunks)]


def _forward_inputs(
    batch: dict[str, torch.Tensor],
    *,
    objective: Objective,
    loss_cfg: LossConfig,
    family: Family,
    device: torch.device,
    sampler: SamplerSchedule | None,
) -> _Forward:
    """The noised inputs, times, conditioning and targets of a preference micro-batch (`_MicroBatches` item)."""
    spec = objectives.get(objective)
    process = family.process
    k_steps = loss_cfg.timesteps_per_pair
    b = batch["winner"].shape[0] // k_steps
    winner = batch["winner"].to(device)
    context = Cond.from_tensors(batch["context"]).to(device)
    noise = batch["noise"].to(device)
    winner_ids = batch.get("winner_time_ids")
    winner_ids = None if winner_ids is None else winner_ids.to(device)

    # Times: drawn from the training schedule (DDPM t, or flow σ), or the opponent's sampling steps (spin_exact).
    if spec.trajectory:
        assert sampler is not None
        step_index = batch["t_or_step"]
        t = process.exact_time(sampler, step_index).to(device)
    else:
        t = batch["t_or_step"].to(device)
    winner_t = process.noised(winner, noise, t)

    # Loser branch: forward-noised final latent at the winner's t (dpo, spin_approx, ddo), the stored chain
    # (spin_exact), or the real image itself under the mismatched caption c′ (caption_contrast).
    loser_context = context
    if spec.trajectory:
        loser_t = batch["loser_t"].to(device)
        loser_target = sampler.implied_target(loser_t, batch["loser_prev"].to(device), step_index)
        winner_target = process.exact_winner_target(winner, noise, t)  # ε-space (DDPM) or velocity (flow)
    elif spec.loser == "caption":
        loser_t, winner_target = winner_t, process.target(winner, noise, t)
        loser_target = winner_target
        loser_context = Cond.from_tensors(batch["mismatch_context"]).to(device)
    else:
        loser = batch["loser"].to(device)
        loser_noise = batch["loser_noise"].to(device)
        loser_t = process.noised(loser, loser_noise, t)
        winner_target, loser_target = process.target(winner, noise, t), process.target(loser, loser_noise, t)

    # One forward per model over [winner | loser] (and, with the caption contrast beside it, [winner under c′]).
    contrast_weight = loss_cfg.caption_contrast_weight if spec.loser != "caption" else 0.0
    inputs, times, contexts, targets = (
        [winner_t, loser_t],
        [t, t],
        [context, loser_context],
        [winner_target, loser_target],
    )
    ids2 = None
    if winner_ids is not None:
        loser_ids = winner_ids if spec.loser == "caption" else batch.get("loser_time_ids", batch["winner_time_ids"])
        ids2 = [winner_ids, loser_ids.to(device)]
    if contrast_weight > 0:
        mismatch = Cond.from_tensors(batch["mismatch_context"])
        inputs, times, targets = inputs + [winner_t], times + [t], targets + [winner_target]
        contexts = contexts + [mismatch.to(device)]
        ids2 = None if ids2 is None else ids2 + [winner_ids]
    return _Forward(
        b=b,
        k=k_steps,
        chunks=len(inputs),
        model_in=torch.cat(inputs),
        t=t,
        t2=torch.cat(times),
        context=Cond.cat(contexts),
        time_ids=None if ids2 is None else torch.cat(ids2),
        target=torch.cat(targets),
        loser_t=loser_t,
    )


def _predict(
    model: torch.nn.Module, f: _Forward, *, family: Family, trajectory: bool, guidance: float | None
) -> torch.Tensor:
    """`model`'s output on every row of `f` (spin_exact: in the sampler's ε-space or velocity)."""
    process = family.process
    pred = family.predict(model, f.model_in, process.model_timestep(f.t2), f.context, f.time_ids, guidance=guidance)
    return process.exact_space(pred.float(), f.model_in, f.t2) if trajectory else pred


def _needs_guided_target(objective: Objective, loss_cfg: LossConfig, sampler: SamplerSchedule | None) -> bool:
    """The guard on the exact path with a stochastic opponent (η > 0) needs θ_k's guided prediction of the loser."""
    return loss_cfg.loser_guard is not None and objectives.get(objective).trajectory and sampler.eta > 0


def _reference_terms(
    run_reference: Callable[[Callable[[torch.nn.Module], torch.Tensor]], torch.Tensor],
    f: _Forward,
    *,
    objective: Objective,
    loss_cfg: LossConfig,
    family: Family,
    sampler: SamplerSchedule | None,
    guidance: float | None,
    opponent_guidance: tuple[float, Cond | None],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the loss needs from the frozen reference θ_k: its denoising errors [B, chunks, K], and (the guard on the
    exact path at η > 0) its guided prediction of the loser [B·K, C, h, w] in float32, else None.

    `run_reference(fn)` runs fn on the reference module without grad. `train` calls this every micro-step, or
    `reference_outputs` once per visit before training (train.precompute_reference)."""
    trajectory = objectives.get(objective).trajectory
    ref_pred = run_reference(lambda model: _predict(model, f, family=family, trajectory=trajectory, guidance=guidance))
    errors = torch.stack(f.errors(ref_pred), dim=1)  # [B, chunks, K]
    if not _needs_guided_target(objective, loss_cfg, sampler):
        return errors, None
    # The stored step x'_{t-1} = A x'_t + B ε_guided + σ z carries the sampler's noise z in its implied target
    # ε̃' = ε_guided + (σ/B) z; the guard uses the noise-free target ε_guided(x'_t), θ_k's guided prediction (the
    # mean of ε̃' given x'_t), so g_l is the loser term's expected output gradient.
    n = f.b * f.k
    guided = ref_pred.detach().float()[n : 2 * n]
    scale, negative = opponent_guidance
    if scale != 1.0:
        process = family.process
        loser_ids = None if f.time_ids is None else f.time_ids[n : 2 * n]
        uncond_context = negative.to(f.loser_t.device).expand(n)

        def uncond(model: torch.nn.Module) -> torch.Tensor:
            out = family.predict(
                model, f.loser_t, process.model_timestep(f.t), uncond_context, loser_ids, guidance=guidance
            )
            return process.exact_space(out.float(), f.loser_t, f.t)

        unconditional = run_reference(uncond).float()
        guided = family.guide(unconditional, guided, scale)  # the sampler's CFG combination
    return errors, guided


def _micro_step_loss(
    policy: torch.nn.Module,
    ref: torch.nn.Module | None,
    batch: dict[str, torch.Tensor],
    *,
    objective: Objective,
    loss_cfg: LossConfig,
    family: Family,
    accelerator: Accelerator,
    sampler: SamplerSchedule | None,
    fsdp: bool = False,
    guidance: float | None = None,
    opponent_guidance: tuple[float, Cond | None] = (1.0, None),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss of one micro-batch (`_MicroBatches` item): B pairs, each at K timesteps (rows b*K + k).

    The reference's terms come from the batch when they were computed before training (``ref_errors``, and
    ``ref_guided`` for the exact path's guard: train.precompute_reference), else from a forward of `ref` (or of the
    policy with its LoRA adapters disabled)."""
    spec = objectives.get(objective)
    device = accelerator.device
    if spec.loss is None:  # sft: the plain denoising loss on the real images
        process = family.process
        k_steps = loss_cfg.timesteps_per_pair
        b = batch["winner"].shape[0] // k_steps
        winner, noise, t = batch["winner"].to(device), batch["noise"].to(device), batch["t_or_step"].to(device)
        context = Cond.from_tensors(batch["context"]).to(device)
        winner_ids = batch.get("winner_time_ids")
        winner_ids = None if winner_ids is None else winner_ids.to(device)
        target = process.target(winner, noise, t)
        pred = family.predict(
            policy, process.noised(winner, noise, t), process.model_timestep(t), context, winner_ids, guidance=guidance
        )
        err = losses.denoise_error(pred, target).reshape(b, k_steps)
        per_sample, metrics = losses.sft_loss(err)
        return per_sample.mean(), metrics

    f = _forward_inputs(batch, objective=objective, loss_cfg=loss_cfg, family=family, device=device, sampler=sampler)
    b, k_steps, chunks = f.b, f.k, f.chunks
    policy_pred = _predict(policy, f, family=family, trajectory=spec.trajectory, guidance=guidance)
    policy_errs = f.errors(policy_pred)

    if "ref_errors" in batch:  # computed once before training (train.precompute_reference)
        ref_stack = batch["ref_errors"].to(device)
        guided = batch["ref_guided"].to(device).flatten(0, 1) if "ref_guided" in batch else None
    else:

        def run_reference(fn):  # fn(reference) without grad: the frozen copy, or the policy with adapters disabled
            with torch.no_grad(), accelerator.autocast():
                if ref is not None:
                    return fn(ref)
                # under FSDP only the prepared module can run (it gathers its shards); DDP's wrapper is skipped
                with adapters_disabled(accelerator.unwrap_model(policy)):
                    return fn(policy if fsdp else accelerator.unwrap_model(policy))

        ref_stack, guided = _reference_terms(
            run_reference,
            f,
            objective=objective,
            loss_cfg=loss_cfg,
            family=family,
            sampler=sampler,
            guidance=guidance,
            opponent_guidance=opponent_guidance,
        )
    ref_errs = ref_stack.unbind(dim=1)  # [B, K] per chunk
    policy_err = losses.DenoiseErrors(winner=policy_errs[0], loser=policy_errs[1])
    ref_err = losses.DenoiseErrors(winner=ref_errs[0], loser=ref_errs[1])

    guard = None
    if loss_cfg.loser_guard is not None:  # per row (pair × timestep): see losses.loser_guard_scale
        residual_winner, residual_loser = (policy_pred.detach().float() - f.target.float()).chunk(chunks)[:2]
        if guided is not None:  # the exact path at η > 0: the noise-free loser target (_reference_terms)
            n = residual_loser.shape[0]
            residual_loser = policy_pred.detach().float()[n : 2 * n] - guided
        guard = losses.loser_guard_scale(residual_winner, residual_loser, loss_cfg.loser_guard).reshape(b, k_steps)
        policy_err = policy_err._replace(loser=losses.scale_gradient(policy_err.loser, guard))
    options = {arg: getattr(loss_cfg, key) for arg, key in spec.options}
    per_sample, metrics = spec.loss(
        policy_err,
        ref_err,
        loss_cfg.beta,
        sft_weight=loss_cfg.sft_weight,
        dpop_lambda=loss_cfg.dpop_lambda,
        **options,
    )
    if spec.loser == "caption":  # a pair trained on the empty prompt has no caption to contrast
        per_sample = per_sample * batch["caption_kept"].reshape(b, k_steps)[:, 0].to(per_sample)
    if guard is not None:
        metrics["loser_guard_lambda"] = guard.mean(dim=1)
    if chunks == 3:  # the caption contrast beside the loss
        contrast, contrast_metrics = losses.caption_contrast_loss(
            losses.DenoiseErrors(winner=policy_errs[0], loser=policy_errs[2]),
            losses.DenoiseErrors(winner=ref_errs[0], loser=ref_errs[2]),
            loss_cfg.beta,
        )
        kept = batch["caption_kept"].reshape(b, k_steps)[:, 0].to(contrast)
        contrast_weight = loss_cfg.caption_contrast_weight
        per_sample = per_sample + contrast_weight * kept * contrast
        metrics["caption_contrast_term"] = (contrast_weight * kept * contrast).detach()
        metrics["caption_margin"] = contrast_metrics["margin"]
    return per_sample.mean(), metrics
