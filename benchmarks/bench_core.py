"""Throughput and memory of the core loops on the built-in `demo` model (or a local diffusers folder).

    .venv/bin/python benchmarks/bench_core.py                 # demo preset, CPU
    .venv/bin/python benchmarks/bench_core.py --model /models/stable-diffusion-v1-5 --batch 8 --device cuda

Prints one line per measurement: the median over --repeats after one warm-up, for
  - a training step of each objective (policy forward+backward on B pairs, reference forward, AdamW),
  - DDIM sampling with guidance (images per second), with and without storing the trajectory,
and the peak resident memory of the process. Figures, not pass/fail: speed targets live here, not in tests.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from spin_diffusion import (  # noqa: E402
    encoding,  # noqa: E402
    models,
    presets,  # noqa: E402
    sampling,
    trainer,
)
from spin_diffusion.config import LossConfig, TrainConfig  # noqa: E402


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local diffusers folder (default: the built-in demo preset)")
    parser.add_argument("--batch", type=int, default=16, help="pairs per training step / prompts per sampling batch")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps for sampling")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    c = models.load_components(args.model) if args.model else presets.build_preset("demo")
    device = torch.device(args.device)
    c.denoiser.to(device)
    c.text_encoder.to(device)
    shape = (c.latent_channels, c.sample_size, c.sample_size)
    n = args.batch
    gen = torch.Generator().manual_seed(0)
    embeds = encoding.encode_prompts(c, ["a red circle on the left"] * n).cpu()
    negative = encoding.encode_prompts(c, [""]).cpu()
    print(
        f"model: {args.model or 'demo preset'}, UNet {sum(p.numel() for p in c.denoiser.parameters()) / 1e6:.2f} M "
        f"params, latents {shape}, device {device}, torch threads {torch.get_num_threads()}"
    )

    # Sampling
    seeds = list(range(n))
    for traj in (False, True):
        sec = _timed(
            lambda traj=traj: sampling.sample(
                c.denoiser,
                c.family,
                embeds,
                negative,
                seeds=seeds,
                latent_shape=shape,
                num_steps=args.steps,
                guidance_scale=7.5,
                return_trajectory=traj,
            ),
            args.repeats,
        )
        print(f"sample  DDIM{args.steps}+CFG  batch {n:3d}  trajectory={traj!s:5}  {sec:7.3f} s  {n / sec:8.1f} img/s")

    # Training steps: each objective, `repeats` optimizer steps per measurement
    latents = torch.randn(n * 4, *shape, generator=gen)
    out = sampling.sample(
        c.denoiser,
        c.family,
        embeds[:2],
        negative,
        seeds=[0, 1],
        latent_shape=shape,
        num_steps=args.steps,
        guidance_scale=7.5,
        return_trajectory=True,
    )
    traj = out.trajectory.repeat(2 * n, 1, 1, 1, 1)[: n * 4]
    sched = c.noise_scheduler()
    data = trainer.TrainData(
        winner=latents,
        prompt_embeds=embeds.repeat(4, 1, 1),
        loser=torch.randn(n * 4, *shape, generator=gen),
        loser_trajectory=traj,
        sampler=sampling.SamplerSchedule(
            out.timesteps,
            sched.alphas_cumprod.double(),
            float(sampling.ddim_scheduler(c.scheduler.config).final_alpha_cumprod),
            0.0,
        ),
    )
    for objective in ("sft", "spin_approx", "spin_exact"):
        policy = c.denoiser
        ref = None if objective == "sft" else models.frozen_copy(c.denoiser)
        cfg = TrainConfig(
            batch_size=n, max_steps=args.repeats + 1, checkpoint_every=0, log_every=1000, learning_rate=1e-5
        )
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = trainer.train(
                policy,
                ref,
                data,
                objective=objective,
                loss_cfg=LossConfig(objective=objective),
                train_cfg=cfg,
                family=c.family,
                out_dir=tmp,
                seed=0,
                progress=False,
            )
            total = time.perf_counter() - t0
        per_step = result.wall_seconds / result.steps
        print(f"train   {objective:11s}  {n:3d} pairs/step  {per_step:7.3f} s/step  ({total:.1f} s incl. set-up)")

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"peak RSS {peak_kb / 1024:.0f} MB"
        + (f", peak GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else "")
    )


if __name__ == "__main__":
    main()
