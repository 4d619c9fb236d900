"""Seeded, batched DDIM sampling with classifier-free guidance, and the sharded writer of opponent samples.

The opponent θ_k draws one image per training prompt that training visits (all of them unless the iteration
stops before the end of its first epoch). Every draw is keyed by ``sample_seed(run_seed,
iteration, prompt_index)`` alone, so regenerating one prompt, changing the batch size or resuming after a
kill gives bit-identical latents. Samples are kept as latents (never decoded and re-encoded) and, for the
exact objective, with the whole trajectory x'_T … x'_0 plus the sampler's schedule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from safetensors.torch import save_file
from tqdm.auto import tqdm

from spin_diffusion import atomic, preemption
from spin_diffusion.cache import STORE_DTYPES, RowStore, StoreDtype, dedup, read_header, read_tensor
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.families import Cond, Family

META_FILE = "meta.json"
SAMPLERS = ("ddim", "dpmsolver++")  # `sample.scheduler`; only DDIM has the invertible step spin_exact needs
PER_CAPTION = ("every_row", "one")  # `sample.per_caption`: opponent samples per training row, or per distinct caption
SAMPLE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sample_seed(run_seed: int, iteration: int, prompt_index: int) -> int:
    """A 63-bit seed that depends only on (run seed, iteration, prompt index)."""
    state = np.random.SeedSequence([run_seed, iteration, prompt_index]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def ddim_scheduler(scheduler_config: dict) -> DDIMScheduler:
    """The sampler used for opponent and evaluation images: DDIM on the model's own noise schedule."""
    return DDIMScheduler.from_config(scheduler_config)


def make_scheduler(name: str, family: Family):
    """`sample.scheduler` on the model's noise schedule: "ddim" (η-DDIM; its step can be inverted for the implied
    noise, so spin_exact uses it) or "dpmsolver++" (2nd-order multistep DPM-Solver++, deterministic; good images in
    ~20 steps where DDIM needs ~50; spin_approx only). A flow-matching model (SD3) always samples with its own
    first-order Euler scheduler ("ddim" names that deterministic first-order sampler; its step is inverted the
    same way). The family (`families.make`) holds the model's scheduler config and says which kind it is."""
    scheduler_config = family.scheduler_config
    if family.process.kind == "flow":
        if name != "ddim":
            raise SpinDiffusionError(
                f"sample.scheduler={name} is for DDPM models; a flow-matching model samples with its own Euler "
                "scheduler (sample.scheduler=ddim)"
            )
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    if name == "ddim":
        return ddim_scheduler(scheduler_config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown sampler {name!r}; use one of {SAMPLERS}")


@dataclass(frozen=True)
class Guidance:
    """Guidance beyond the classifier-free scale (`sample.guidance_scale`), for the families that have it.

    - ``true_cfg_scale`` (FLUX.1): classifier-free guidance with the negative prompt, FluxPipeline's
      ``true_cfg_scale``; 1 = off. A FLUX model's ``guidance_scale`` is the value of its guidance embedding instead.
    - ``skip_layers`` (SD3/SD3.5): skip-layer guidance, StableDiffusion3Pipeline's ``skip_guidance_layers`` (SD3.5
      medium: 7, 8, 9); empty = off. While step i is in (start·S, stop·S) the prediction gains
      ``skip_layer_scale · (conditional - conditional without those blocks)``; it acts only with classifier-free
      guidance, as in the pipeline.
    """

    true_cfg_scale: float = 1.0
    skip_layers: tuple[int, ...] = ()
    skip_layer_scale: float = 2.8
    skip_layer_start: float = 0.01
    skip_layer_stop: float = 0.2

    @classmethod
    def of(cls, sample_cfg: Any) -> Guidance:
        """The guidance of a run's ``sample`` config (`config.SampleConfig`)."""
        return cls(
            true_cfg_scale=float(sample_cfg.true_cfg_scale),
            skip_layers=tuple(int(i) for i in sample_cfg.skip_guidance_layers),
            skip_layer_scale=float(sample_cfg.skip_layer_guidance_scale),
            skip_layer_start=float(sample_cfg.skip_layer_guidance_start),
            skip_layer_stop=float(sample_cfg.skip_layer_guidance_stop),
        )

    def check(self, family: Family, num_blocks: int | None) -> None:
        """Refuse, in one line, guidance the family cannot do (``num_blocks``: the transformer's blocks)."""
        if self.true_cfg_scale != 1.0 and not family.embedded_guidance:
            raise SpinDiffusionError(
                f"sample.true_cfg_scale={self.true_cfg_scale} is for FLUX.1 models; a {family.name} model does "
                "classifier-free guidance with sample.guidance_scale"
            )
        if self.skip_layers and not family.skip_layer_guidance:
            raise SpinDiffusionError(
                f"sample.skip_guidance_layers is for SD3/SD3.5 transformers; a {family.name} model cannot skip layers"
            )
        bad = [i for i in self.skip_layers if num_blocks is not None and not 0 <= i < num_blocks]
        if bad:
            raise SpinDiffusionError(
                f"sample.skip_guidance_layers {bad} out of range: the transformer has blocks 0..{num_blocks - 1}"
            )
        if self.skip_layers and not 0 <= self.skip_layer_start < self.skip_layer_stop <= 1:
            raise SpinDiffusionError(
                "sample.skip_layer_guidance_start and _stop must satisfy 0 <= start < stop <= 1, got "
                f"{self.skip_layer_start} and {self.skip_layer_stop}"
            )

    def to_json(self) -> dict | None:
        """The non-default settings (None when all are default: older meta.json files have none)."""
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        return None if self == Guidance() else d


def pipeline_kwargs(family: Family, guidance_scale: float, guidance: Guidance, negative_prompt: str) -> dict[str, Any]:
    """The keyword arguments of the family's diffusers pipeline call that sample as the opponent does, where the
    pipeline's defaults differ (the guidance scale, which is Qwen-Image's true_cfg_scale with its negative prompt;
    SD3's T5 length; FLUX's T5 length, guidance and true CFG; Z-Image's and Qwen-Image's text length; skip-layer
    guidance). FLUX's guidance value is always given: it is conditioning."""
    out: dict[str, Any] = {}
    if family.max_sequence_length is not None:
        out["max_sequence_length"] = family.max_sequence_length
    if family.embedded_guidance or guidance_scale != family.default_guidance_scale:
        out[family.guidance_argument] = guidance_scale
    if family.guidance_needs_negative_prompt and family.cfg_scale(guidance_scale) != 1.0:
        out["negative_prompt"] = negative_prompt  # Qwen-Image guides only when given one
    if family.embedded_guidance:
        if guidance.true_cfg_scale != 1.0:
            out |= {"true_cfg_scale": guidance.true_cfg_scale, "negative_prompt": negative_prompt}
    if guidance.skip_layers and family.skip_layer_guidance:
        out |= {
            "skip_guidance_layers": list(guidance.skip_layers),
            "skip_layer_guidance_scale": guidance.skip_layer_scale,
            "skip_layer_guidance_start": guidance.skip_layer_start,
            "skip_layer_guidance_stop": guidance.skip_layer_stop,
        }
    return out


def cfg_scale(family: Family, guidance_scale: float, guidance: Guidance) -> float:
    """The classifier-free guidance scale the sampler applies: what the family's pipeline makes of
    ``guidance_scale`` (``Family.cfg_scale``: itself, or Z-Image's 1 + g), or for a family with a guidance embedding
    (FLUX.1) ``guidance.true_cfg_scale``."""
    return guidance.true_cfg_scale if family.embedded_guidance else family.cfg_scale(guidance_scale)


def resolve_dtype(name: str, device: torch.device | str) -> str:
    """`sample.dtype` -> "fp32" | "bf16" | "fp16": "auto" is bf16 on CUDA and fp32 elsewhere (bf16 matmuls on
    CPUs without bf16 units are slower than fp32)."""
    if name == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if name not in SAMPLE_DTYPES:
        raise ValueError(f"unknown sample dtype {name!r}; use auto, fp32, bf16 or fp16")
    return name


class SampleOutput(NamedTuple):
    latents: torch.Tensor  # [B, C, h, w] final x'_0 (scaled latents, as the denoiser sees them)
    trajectory: torch.Tensor | None  # [B, S+1, C, h, w]: x'_T, x'_{t_1}, …, x'_0 in sampling order
    timesteps: torch.Tensor  # [S] scheduler timesteps, in sampling order (descending)


def initial_noise(seeds: list[int], latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """x_T for each seed, drawn on the CPU so the result is the same on every device. -> [B, C, h, w]"""
    return torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def _as_cond(x: Cond | torch.Tensor | RowStore | None) -> Cond | None:
    """A bare `[N, L, D]` embedding (SD-1.x/2.x) is a Cond without pooled embeddings."""
    return x if x is None or isinstance(x, Cond) else Cond(x)


@torch.no_grad()
def sample(
    model: Callable[..., object],
    family: Family,
    cond: Cond,
    negative: Cond | None,
    *,
    seeds: list[int],
    latent_shape: tuple[int, int, int],
    num_steps: int,
    guidance_scale: float,
    eta: float = 0.0,
    return_trajectory: bool = False,
    scheduler: str = "ddim",
    dtype: str | None = None,
    image_size: int | None = None,
    guidance: Guidance = Guidance(),
) -> SampleOutput:
    """DDIM (or DPM-Solver++; Euler for flow-matching models) sampling with classifier-free guidance.

    Args:
        model: the denoiser (UNet2DConditionModel, or SD3Transformer2DModel for the sd3 family).
        family: `families.Family` of the model (conditioning, network call, scheduler config).
        cond: text conditioning of the B prompts (`families.Cond`; a bare `[B, L, D]` tensor for SD-1.x/2.x).
        negative: one-prompt (or B-prompt) unconditional conditioning; needed when guidance_scale != 1.
        seeds: one seed per sample; sample i depends on seeds[i] only (batch-size invariant).
        latent_shape: `(C, h, w)`.
        eta: DDIM η; the per-step noise (η > 0) is also drawn from each sample's own generator.
        scheduler: "ddim" or "dpmsolver++" (η must be 0), see `make_scheduler`.
        dtype: None or the model's own dtype runs it as it is; "bf16" / "fp16" run its forward passes under
            autocast (the module keeps its weights; the scheduler's arithmetic stays float32).
        image_size: pixels per side of the images (SDXL's time ids); needed for the sdxl family.
        guidance: true CFG (FLUX.1) and skip-layer guidance (SD3/SD3.5); a FLUX model's guidance embedding gets
            ``guidance_scale``.
    """
    cond, negative = _as_cond(cond), _as_cond(negative)
    batch = len(cond)
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} prompts")
    if scheduler != "ddim" and eta > 0:
        raise ValueError(f"eta > 0 needs the ddim sampler, not {scheduler}")
    param = next(model.parameters())  # type: ignore[attr-defined]
    device, param_dtype = param.device, param.dtype
    compute = SAMPLE_DTYPES[dtype] if dtype is not None else param_dtype
    autocast = torch.autocast(device.type, dtype=compute, enabled=compute != param_dtype)
    sampler_name, scheduler = scheduler, make_scheduler(scheduler, family)
    flow = family.process.kind == "flow"
    family.set_timesteps(scheduler, num_steps, latent_shape)
    embedded = guidance_scale if family.embedded_guidance else None
    scale = cfg_scale(family, guidance_scale, guidance)
    use_cfg = scale != 1.0
    skip = guidance.skip_layers if use_cfg and family.skip_layer_guidance else ()
    context = cond.to(device, param_dtype)
    time_ids = None
    if family.uses_time_ids:
        if image_size is None:
            raise ValueError(f"the {family.name} family needs image_size")
        time_ids = family.time_ids(batch, image_size, device)
    if use_cfg:
        if negative is None:
            raise ValueError("classifier-free guidance needs negative conditioning")
        uncond = negative.to(device, param_dtype)
        context = Cond.cat([uncond.expand(batch) if len(uncond) == 1 else uncond, context])
        time_ids = None if time_ids is None else torch.cat([time_ids, time_ids])
    generators = [torch.Generator().manual_seed(s + 1) for s in seeds]  # per-step noise, distinct from x_T
    init_sigma = getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers start at σ = 1
    latents = (initial_noise(seeds, latent_shape) * init_sigma).to(device, torch.float32)
    trajectory = [latents.cpu()] if return_trajectory else None

    num = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        model_in = (latents if flow else scheduler.scale_model_input(latents, t)).to(param_dtype)
        skip_now = skip and num * guidance.skip_layer_start < i < num * guidance.skip_layer_stop
        with autocast:
            if use_cfg:
                out = family.predict(
                    model, torch.cat([model_in, model_in]), t, context, time_ids, guidance=embedded
                ).float()
            else:
                model_out = family.predict(model, model_in, t, context, time_ids, guidance=embedded).float()
            if skip_now:  # the conditional half alone, with the blocks skipped
                cond_ids = None if time_ids is None else time_ids[batch:]
                skipped = family.predict(model, model_in, t, context[batch:], cond_ids, skip_layers=skip).float()
        if use_cfg:
            uncond_out, cond_out = out.chunk(2)
            model_out = family.guide(uncond_out, cond_out, scale)
            if skip_now:
                model_out = model_out + guidance.skip_layer_scale * (cond_out - skipped)
        if sampler_name == "ddim" and not flow:
            variance_noise = None
            if eta > 0:
                variance_noise = torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(device)
            latents = scheduler.step(model_out, t, latents, eta=eta, variance_noise=variance_noise).prev_sample
        else:
            latents = scheduler.step(model_out, t, latents).prev_sample
        if trajectory is not None:
            trajectory.append(latents.cpu())

    traj = torch.stack(trajectory, dim=1) if trajectory is not None else None
    return SampleOutput(latents=latents.cpu(), trajectory=traj, timesteps=scheduler.timesteps.cpu())


# ---------------------------------------------------------------------------------------------------------------
# Which prompts the opponent samples


@dataclass(frozen=True)
class OpponentPrompts:
    """Which prompts θ_k samples in one iteration, and which sample each training row is paired with.

    `every_row`: prompt i is row i. `one`: prompt u is the u-th distinct caption (in order of first appearance),
    sampled once and paired with every row of that caption; its seed is keyed by u, so it does not depend on which
    rows training visits, on the batch or on the number of processes."""

    num_prompts: int  # rows (every_row) or distinct captions (one)
    visited: torch.Tensor  # [M] the prompts training visits, in the order of their first visit
    first_row: torch.Tensor | None  # [num_prompts] the first row of each caption (its conditioning); None: row i
    row_prompt: torch.Tensor | None  # [N] the prompt of each row; None: row i's prompt is i

    @property
    def prompts(self) -> tuple[int, ...] | None:
        """`GenerationSpec.prompts`: None when every prompt is visited (they are then sampled in prompt order)."""
        return None if len(self.visited) == self.num_prompts else tuple(self.visited.tolist())

    def conditioning(self, rows: Cond) -> Cond:
        """The conditioning of each prompt, from that of the training rows (tensors or RowStores, read lazily)."""
        first = self.first_row
        if first is None:
            return rows
        return rows.map(lambda x: x[first] if isinstance(x, torch.Tensor) else x.take(first))

    def per_row(self, samples: RowStore) -> RowStore:
        """The opponent's samples indexed by training row (a view: a caption's sample serves all its rows)."""
        return samples if self.row_prompt is None else samples.take(self.row_prompt)


def opponent_prompts(captions: Sequence[str], visited_rows: torch.Tensor, per_caption: str) -> OpponentPrompts:
    """The prompts to sample for training rows `captions` of which training visits `visited_rows` (in order)."""
    if per_caption not in PER_CAPTION:
        choices = ", ".join(repr(choice) for choice in PER_CAPTION)
        raise SpinDiffusionError(f"sample.per_caption must be one of {choices}; got {per_caption!r}")
    if per_caption == "every_row":
        return OpponentPrompts(len(captions), visited_rows, None, None)
    unique, row_caption = dedup(captions)
    first_row = torch.from_numpy(np.unique(row_caption.numpy(), return_index=True)[1]).long()
    visited = torch.tensor(list(dict.fromkeys(row_caption[visited_rows].tolist())), dtype=torch.long)
    return OpponentPrompts(len(unique), visited, first_row, row_caption)


# ---------------------------------------------------------------------------------------------------------------
# Sharded, resumable generation of the opponent's samples


@dataclass(frozen=True)
class GenerationSpec:
    """What identifies a set of opponent samples; stored in meta.json and checked on resume."""

    run_seed: int
    iteration: int
    num_prompts: int
    num_steps: int
    guidance_scale: float
    eta: float
    latent_shape: tuple[int, int, int]
    store_trajectory: bool
    shard_size: int
    store_dtype: StoreDtype = "fp32"  # dtype of the stored latents / trajectories (reads return float32)
    scheduler: str = "ddim"  # sampler (`make_scheduler`)
    dtype: str = "fp32"  # compute dtype of the denoiser's forward passes (resolved: fp32 | bf16 | fp16)
    # Prompt indices to sample, in the order the shards hold them (the order training first visits them);
    # None = all num_prompts in prompt order. Recorded in meta.json as "prompts".
    prompts: tuple[int, ...] | None = None
    per_caption: str = "every_row"  # what a prompt is: a training row, or a distinct caption (`OpponentPrompts`)
    guidance: Guidance = Guidance()  # true CFG (FLUX.1), skip-layer guidance (SD3); recorded only when not default

    def to_json(self) -> dict:
        d = self.__dict__.copy()
        d["latent_shape"] = list(self.latent_shape)
        del d["prompts"]
        guidance = self.guidance.to_json()
        if guidance is None:
            del d["guidance"]
        else:
            d["guidance"] = guidance
        return d

    def order(self) -> list[int]:
        """The prompt indices sampled, shard by shard."""
        return list(range(self.num_prompts)) if self.prompts is None else list(self.prompts)


def _shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard_{shard:05d}.safetensors"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic.path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def _write_meta(out_dir: Path, spec: GenerationSpec, family: Family, *, check_only: bool = False) -> None:
    """Write meta.json, or check that an existing one holds the same spec; `check_only` never writes.

    It records the sampler's schedule that spin_exact inverts: DDPM models' timesteps and ᾱ; flow-matching
    models' timesteps (σ·1000) and the S+1 σ of the Euler steps (terminal 0 included)."""
    sampler = make_scheduler(spec.scheduler, family)
    family.set_timesteps(sampler, spec.num_steps, spec.latent_shape)
    meta = {
        "spec": spec.to_json(),
        # which prompts were sampled (shard order); null = all of them in prompt order
        "num_generated": len(spec.order()),
        "prompts": None if spec.prompts is None else list(spec.prompts),
        "timesteps": sampler.timesteps.tolist(),
    }
    if family.process.kind == "flow":
        meta["sigmas"] = sampler.sigmas.tolist()
        meta["num_train_timesteps"] = int(sampler.config.num_train_timesteps)
    else:
        sched = ddim_scheduler(family.scheduler_config)
        meta["alphas_cumprod"] = sched.alphas_cumprod.tolist()
        meta["final_alpha_cumprod"] = float(sched.final_alpha_cumprod)
        meta["num_train_timesteps"] = int(sched.config.num_train_timesteps)
    path = out_dir / META_FILE
    if path.exists():
        old = json.loads(path.read_text())
        # folders from before these settings: fp32 storage, DDIM in fp32, one sample per row
        defaults = {"store_dtype": "fp32", "scheduler": "ddim", "dtype": "fp32", "per_caption": "every_row"}
        old_spec = defaults | old["spec"]
        if old_spec != meta["spec"]:
            raise SpinDiffusionError(
                f"{out_dir} holds samples made with other settings ({old['spec']}); "
                "delete that folder or restore the original config to resume"
            )
        if old.get("prompts") != meta["prompts"]:
            raise SpinDiffusionError(
                f"{out_dir} holds samples of other prompts ({old.get('num_generated', spec.num_prompts)} generated, "
                f"now {meta['num_generated']}: the training length, batch or number of processes changed); "
                "delete that folder or restore the original settings to resume"
            )
        return
    if check_only:
        return
    atomic.write_json(path, meta, indent=None)


def generate_shards(
    model: Callable[..., object],
    family: Family,
    cond: Cond,
    negative: Cond | None,
    out_dir: str | Path,
    spec: GenerationSpec,
    *,
    batch_size: int,
    image_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> None:
    """Sample one image per prompt of `spec.order()` with θ_k and write `shard_XXXXX.safetensors` files to `out_dir`.

    Shard s holds the prompts `spec.order()[s·shard_size : (s+1)·shard_size]`: `indices [n]` (their prompt
    indices), `latents [n, C, h, w]` and, when `spec.store_trajectory`, `trajectory [n, S+1, C, h, w]`.
    Finished shards are skipped, so a killed run resumes where it stopped; shards are
    written atomically. With several processes, process `rank` takes shards `rank, rank + world_size, …`.

    Args:
        cond: conditioning of all training prompts (N == spec.num_prompts), tensors or RowStores (read one batch
            at a time).
        negative: one-prompt unconditional conditioning for guidance.
        image_size: pixels per side (SDXL's time ids).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store_dtype = STORE_DTYPES[spec.store_dtype]
    cond, negative = _as_cond(cond), _as_cond(negative)
    n = len(cond)
    if n != spec.num_prompts:
        raise ValueError(f"spec says {spec.num_prompts} prompts, got {n} embeddings")
    # Every rank checks an existing meta.json: otherwise rank > 0 would add shards made with other settings
    # to a folder that rank 0 refuses, and a later resume with the original settings would keep them.
    _write_meta(out, spec, family, check_only=rank != 0)
    order = spec.order()
    if order and (min(order) < 0 or max(order) >= n or len(set(order)) != len(order)):
        raise ValueError("spec.prompts must be distinct prompt indices in [0, num_prompts)")
    num_shards = math.ceil(len(order) / spec.shard_size)
    todo = [s for s in range(rank, num_shards, world_size) if not _shard_path(out, s).exists()]
    bar = tqdm(
        total=sum(len(order[s * spec.shard_size : (s + 1) * spec.shard_size]) for s in todo),
        desc=f"generate θ_{spec.iteration}",
        disable=not progress,
        unit="img",
    )
    for shard in todo:
        if preemption.requested():  # SIGTERM/SIGINT: keep the finished shards, the caller stops the run
            break
        rows = order[shard * spec.shard_size : (shard + 1) * spec.shard_size]
        latents, trajs = [], []
        for start in range(0, len(rows), batch_size):
            idx = rows[start : start + batch_size]
            result = sample(
                model,
                family,
                cond[idx],
                negative,
                image_size=image_size,
                seeds=[sample_seed(spec.run_seed, spec.iteration, i) for i in idx],
                latent_shape=spec.latent_shape,
                num_steps=spec.num_steps,
                guidance_scale=spec.guidance_scale,
                eta=spec.eta,
                return_trajectory=spec.store_trajectory,
                scheduler=spec.scheduler,
                dtype=spec.dtype,
                guidance=spec.guidance,
            )
            latents.append(result.latents.to(store_dtype))
            if result.trajectory is not None:
                trajs.append(result.trajectory.to(store_dtype))
            bar.update(len(idx))
        tensors = {"indices": torch.tensor(rows, dtype=torch.long), "latents": torch.cat(latents)}
        if trajs:
            tensors["trajectory"] = torch.cat(trajs)
        _atomic_save(tensors, _shard_path(out, shard))
    bar.close()


@dataclass
class GeneratedSet:
    """The opponent's samples indexed by prompt (row i = prompt i); rows are read from disk on demand. When only
    some prompts were generated (`prompts`), reading another prompt's row raises IndexError."""

    latents: RowStore  # [N, C, h, w]
    trajectory: RowStore | None  # [N, S+1, C, h, w]
    timesteps: torch.Tensor  # [S] sampling timesteps, descending
    alphas_cumprod: torch.Tensor | None  # [T_train] ᾱ of the noise schedule (None for flow-matching models)
    final_alpha_cumprod: float  # ᾱ used after the last step (DDIM's set_alpha_to_one)
    eta: float
    prompts: torch.Tensor | None = None  # [M] the generated prompt indices in shard order; None = all N
    sigmas: torch.Tensor | None = None  # [S+1] σ of a flow-matching model's Euler steps (terminal 0); else None


def load_generated(out_dir: str | Path) -> GeneratedSet:
    """Open the shards of a finished generation folder (see generate_shards) as lazy row stores.

    Reads only the shard headers and each shard's `indices` (8 bytes per prompt), never the samples."""
    out = Path(out_dir)
    meta_path = out / META_FILE
    if not meta_path.exists():
        raise SpinDiffusionError(f"no generated samples in {out} (missing {META_FILE}); run the generate phase first")
    meta = json.loads(meta_path.read_text())
    spec = meta["spec"]
    n, shard_size = spec["num_prompts"], spec["shard_size"]
    prompts = meta.get("prompts")
    order = torch.arange(n) if prompts is None else torch.tensor(prompts, dtype=torch.long)
    index_map = None
    if prompts is not None:  # prompt i -> stored row, -1 for prompts that were not generated
        index_map = torch.full((n,), -1, dtype=torch.long)
        index_map[order] = torch.arange(len(order))
    paths = [_shard_path(out, shard) for shard in range(math.ceil(len(order) / shard_size))]
    for shard, path in enumerate(paths):
        if not path.exists():
            raise SpinDiffusionError(f"generation in {out} is incomplete ({path.name} missing); rerun with --resume")
        expected = order[shard * shard_size : (shard + 1) * shard_size]
        try:
            indices = read_tensor(path, "indices")
        except (OSError, ValueError, KeyError) as err:
            raise SpinDiffusionError(f"{path} is unreadable ({err}); delete it and rerun with --resume") from None
        if not torch.equal(indices, expected):
            raise SpinDiffusionError(f"{path} holds unexpected prompt indices; delete it and rerun with --resume")
    try:
        latents = RowStore.open(paths, "latents", index_map=index_map)
        trajectory = (
            RowStore.open(paths, "trajectory", index_map=index_map)
            if "trajectory" in read_header(paths[0])[0]
            else None
        )
    except (OSError, ValueError) as err:
        raise SpinDiffusionError(
            f"generation in {out} is unreadable ({err}); delete that shard and rerun with --resume"
        ) from None
    flow = "sigmas" in meta
    return GeneratedSet(
        latents=latents,
        trajectory=trajectory,
        timesteps=torch.tensor(meta["timesteps"], dtype=torch.float32 if flow else torch.long),
        alphas_cumprod=None if flow else torch.tensor(meta["alphas_cumprod"], dtype=torch.float64),
        final_alpha_cumprod=0.0 if flow else float(meta["final_alpha_cumprod"]),
        eta=float(spec["eta"]),
        prompts=None if prompts is None else order,
        sigmas=torch.tensor(meta["sigmas"], dtype=torch.float64) if flow else None,
    )


@dataclass
class SamplerSchedule:
    """The opponent's sampler schedule, needed to turn stored trajectories into spin_exact targets: DDIM's (ᾱ, η)
    for the implied noise ε̃', or a flow model's Euler σ for the implied velocity ṽ."""

    timesteps: torch.Tensor  # [S] descending
    alphas_cumprod: torch.Tensor | None  # [T_train]; None for flow-matching models
    final_alpha_cumprod: float
    eta: float
    sigmas: torch.Tensor | None = None  # [S+1] flow-matching models' Euler σ (terminal 0 included)

    @classmethod
    def of(cls, generated: GeneratedSet) -> SamplerSchedule:
        """The schedule that `generated` (sampling.load_generated) was sampled with."""
        return cls(
            generated.timesteps,
            generated.alphas_cumprod,
            generated.final_alpha_cumprod,
            generated.eta,
            generated.sigmas,
        )

    def implied_target(self, x_t: torch.Tensor, x_prev: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """The opponent's effective network output on step `step_index` (x_t -> x_prev): ε̃' for DDIM
        (`implied_noise`), ṽ = (x_prev - x_t) / (σ_{i+1} - σ_i) for an Euler flow step (`implied_velocity`)."""
        if self.sigmas is not None:
            return implied_velocity(x_t, x_prev, self.sigmas[step_index], self.sigmas[step_index + 1])
        coef_a, coef_b = ddim_coefficients(
            self.timesteps, step_index, self.alphas_cumprod, self.final_alpha_cumprod, self.eta
        )
        return implied_noise(x_t, x_prev, coef_a.to(x_t.device), coef_b.to(x_t.device))


def valid_exact_steps(sampler: SamplerSchedule) -> torch.Tensor:
    """Indices of sampling steps usable by spin_exact: those with B_t != 0 (ε̃' is undefined when B_t = 0, e.g.
    the last step of a "linspace" schedule that ends at t = 0); for flow models, steps with σ_{i+1} != σ_i."""
    steps = torch.arange(len(sampler.timesteps))
    if sampler.sigmas is not None:
        return steps[(sampler.sigmas[1:] - sampler.sigmas[:-1]).abs() > 1e-6]
    _, coef_b = ddim_coefficients(
        sampler.timesteps, steps, sampler.alphas_cumprod, sampler.final_alpha_cumprod, sampler.eta
    )
    return steps[coef_b.abs() > 1e-6]


def ddim_coefficients(
    timesteps: torch.Tensor,
    step_index: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: float,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A_t and B_t of the DDIM step x_{t-1} = A_t x_t + B_t ε + σ_t z used by `sample`.

    A_t = sqrt(ᾱ_prev / ᾱ_t),  B_t = sqrt(1 - ᾱ_prev - σ_t²) - sqrt(ᾱ_prev (1 - ᾱ_t) / ᾱ_t), with
    σ_t = η sqrt((1 - ᾱ_prev)/(1 - ᾱ_t)) sqrt(1 - ᾱ_t/ᾱ_prev) (Song et al. 2021, Eq. 12/16).

    ᾱ_prev is taken at t - T_train // S, exactly as `DDIMScheduler.step` does, and is `final_alpha_cumprod`
    when that is negative. This equals the next sampling timestep only for evenly spaced schedules ("leading",
    or "trailing" with S dividing T_train); "linspace" and other "trailing" schedules step elsewhere.

    Args:
        timesteps: `[S]` sampling timesteps in sampling order.
        step_index: `[...]` integer indices into `timesteps` (the step from x_{t_i} to x_{t_{i+1}}).
        alphas_cumprod: `[T_train]` ᾱ of the training noise schedule (its length is T_train).
    Returns:
        (A, B), each shaped like `step_index`, float64.
    """
    t = timesteps[step_index]
    t_prev = t - len(alphas_cumprod) // len(timesteps)  # DDIMScheduler.step's prev_timestep
    a_t = alphas_cumprod[t]
    a_prev = torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0)], torch.full_like(a_t, final_alpha_cumprod))
    sigma2 = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    coef_a = (a_prev / a_t).sqrt()
    coef_b = (1 - a_prev - sigma2).clamp(min=0).sqrt() - (a_prev * (1 - a_t) / a_t).sqrt()
    return coef_a, coef_b


def implied_noise(x_t: torch.Tensor, x_prev: torch.Tensor, coef_a: torch.Tensor, coef_b: torch.Tensor) -> torch.Tensor:
    """ε̃_t = (x_{t-1} - A_t x_t) / B_t: the noise the sampler effectively used on this step.

    With η = 0 and no guidance this is exactly the opponent's ε-prediction at x_t; with guidance it is the
    guided ε. It is the target of the exact SPIN objective on generated trajectories (METHOD.md §2.2).

    Args:
        x_t, x_prev: `[B, C, h, w]` consecutive trajectory latents.
        coef_a, coef_b: `[B]` from `ddim_coefficients`.
    """
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    a = coef_a.reshape(shape).to(torch.float64)
    b = coef_b.reshape(shape).to(torch.float64)
    return ((x_prev.double() - a * x_t.double()) / b).to(x_t.dtype)


def implied_velocity(
    x_t: torch.Tensor, x_prev: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """ṽ = (x_{σ'} - x_σ) / (σ' - σ): the velocity an Euler step x_{σ'} = x_σ + (σ' - σ) v effectively used.

    With no guidance it is the opponent's velocity prediction at x_σ; with guidance, the guided one. It is the
    flow-matching counterpart of `implied_noise` (docs/FAMILIES.md).

    Args:
        x_t, x_prev: `[B, C, h, w]` consecutive trajectory latents (σ, then σ' < σ).
        sigma, sigma_next: `[B]` the step's σ and σ'.
    """
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    dt = (sigma_next.to(torch.float64) - sigma.to(torch.float64)).reshape(shape).to(x_t.device)
    return ((x_prev.double() - x_t.double()) / dt).to(x_t.dtype)
