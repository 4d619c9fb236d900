"""The cost of one self-play iteration at the paper's proportions, in UNet forwards, for the protocols of
docs/CHEAPER_ITERATIONS.md; prints each one's cost and its ratio to the paper's protocol.

    .venv/bin/python benchmarks/iteration_cost.py                          # SD-1.5 on Pick-a-Pic v2, 8 GPUs
    .venv/bin/python benchmarks/iteration_cost.py --unique-captions 100000
    .venv/bin/python benchmarks/iteration_cost.py --measure                # the training pair's cost measured here

The model counts, per iteration: generation = opponent images × sampler steps × 2 (classifier-free guidance);
training = optimizer steps × pairs per step × the cost of one pair in UNet-forward units (policy forward and backward
on winner and loser, reference forward on both: 2·(1 + 2) + 2 = 8 by FLOPs, backward = 2 forwards; `--measure`
replaces it by the ratio measured on the SD-like model of bench_iteration.py, whose FLOP ratios are SD-1.5's).
The reference's 2 forwards of a pair (winner and loser, no grad) move out of the training step into the
precompute after generation (train.precompute_reference, the default): the "reference" column counts them; the total
is the same with the option on or off, and the training step is the rest. Evaluation is left out (the same for every
protocol). Work splits evenly over GPUs (generation shards by rank,
training is data-parallel), so the per-GPU count is the total / GPUs and the ratios do not depend on the GPU count.

Opponent images: every_row samples one per visited row; per_caption one per distinct caption among the visited rows,
counted here as min(distinct captions, visited rows) (exact when an iteration visits every row, as the paper's
does: 500 × 2048 = 1,024,000 ≥ 959,040; an upper bound otherwise).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from spin_diffusion import encoding

PICKAPIC_ROWS = 959_040  # Pick-a-Pic v2 train pairs
PICKAPIC_CAPTIONS = 58_960  # distinct prompts Diffusion-DPO reports for it (after dropping ties)
FLOP_PAIR_FORWARDS = 8.0
REFERENCE_FORWARDS = 2.0  # of a pair's cost: the reference's forwards on its winner and loser


@dataclass(frozen=True)
class Scale:
    rows: int = PICKAPIC_ROWS
    unique_captions: int = PICKAPIC_CAPTIONS
    optimizer_steps: int = 500  # per iteration (the released SPIN-Diffusion card)
    pairs_per_step: int = 2048  # effective batch: 8 GPUs × 8 × 32 accumulation
    gpus: int = 8

    @property
    def visited_rows(self) -> int:
        return min(self.rows, self.optimizer_steps * self.pairs_per_step)


@dataclass(frozen=True)
class Protocol:
    name: str
    per_caption: str  # every_row | one
    sampler: str  # ddim | dpmsolver++ (the same forwards per step; the name is for the table)
    steps: int
    guidance: bool = True


PROTOCOLS = (
    Protocol("paper: every_row, DDIM 50", "every_row", "ddim", 50),
    Protocol("every_row, DPM-Solver++ 20", "every_row", "dpmsolver++", 20),
    Protocol("per_caption, DDIM 50", "one", "ddim", 50),
    Protocol("per_caption, DPM-Solver++ 20", "one", "dpmsolver++", 20),
)


def opponent_images(scale: Scale, per_caption: str) -> int:
    if per_caption == "every_row":
        return scale.visited_rows
    if per_caption == "one":
        return min(scale.unique_captions, scale.visited_rows)
    raise ValueError(f"per_caption must be every_row or one, got {per_caption!r}")


def forwards(scale: Scale, protocol: Protocol, pair_forwards: float = FLOP_PAIR_FORWARDS) -> dict[str, float]:
    """UNet forwards of one iteration by stage: {"images", "generate", "reference", "train", "total", "per_gpu"};
    "train" includes "reference" (its forwards run in the step, or before it with train.precompute_reference)."""
    images = opponent_images(scale, protocol.per_caption)
    generate = images * protocol.steps * (2 if protocol.guidance else 1)
    pairs = scale.optimizer_steps * scale.pairs_per_step
    train, reference = pairs * pair_forwards, pairs * REFERENCE_FORWARDS
    total = generate + train
    return {"images": images, "generate": generate, "reference": reference, "train": train, "total": total,
            "per_gpu": total / scale.gpus}  # fmt: skip


def table(scale: Scale, pair_forwards: float) -> str:
    reference = forwards(scale, PROTOCOLS[0], pair_forwards)["total"]
    lines = [
        "| protocol | opponent images | generate (M fwd) | train (M fwd) | of which the reference (M fwd, moved "
        "before training by train.precompute_reference) | total (M fwd) | per GPU (M fwd) | generation share | "
        "cheaper than the paper's |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in PROTOCOLS:
        f = forwards(scale, p, pair_forwards)
        lines.append(
            f"| {p.name} | {f['images']:,} | {f['generate'] / 1e6:.1f} | {f['train'] / 1e6:.1f} | "
            f"{f['reference'] / 1e6:.1f} | "
            f"{f['total'] / 1e6:.1f} | {f['per_gpu'] / 1e6:.2f} | {100 * f['generate'] / f['total']:.0f} % | "
            f"{reference / f['total']:.2f}x |"
        )
    return "\n".join(lines)


def measure_pair_forwards(batch: int = 4, steps: int = 10, repeats: int = 3) -> float:
    """One SPIN training pair in units of one sampling forward (per image, batched), on the SD-like model."""
    import os
    import statistics
    import sys
    import tempfile
    import time
    from pathlib import Path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from bench_iteration import build_sdlike

    from spin_diffusion import models, sampling, trainer
    from spin_diffusion.config import LossConfig, TrainConfig

    c = build_sdlike()
    shape = (c.latent_channels, c.sample_size, c.sample_size)
    embeds = encoding.encode_prompts(c, [f"a red circle number {i}" for i in range(batch)])
    negative = encoding.encode_prompts(c, [""])
    sample_times = []
    for r in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        sampling.sample(c.denoiser, c.family, embeds, negative, seeds=list(range(batch)), latent_shape=shape,
                        num_steps=steps, guidance_scale=7.5)  # fmt: skip
        if r:
            sample_times.append(time.perf_counter() - t0)
    per_forward = statistics.median(sample_times) / (batch * 2 * steps)
    gen = torch.Generator().manual_seed(0)
    data = trainer.TrainData(
        winner=torch.randn(4 * batch, *shape, generator=gen),
        prompt_embeds=encoding.encode_prompts(c, [f"a green triangle {i}" for i in range(4 * batch)]).cpu(),
        loser=torch.randn(4 * batch, *shape, generator=gen),
    )
    cfg = TrainConfig(batch_size=batch, max_steps=repeats + 1, checkpoint_every=0, log_every=1000)
    with tempfile.TemporaryDirectory() as tmp:
        result = trainer.train(c.denoiser, models.frozen_copy(c.denoiser), data, objective="spin_approx",
                               loss_cfg=LossConfig(), train_cfg=cfg, family=c.family, out_dir=tmp, seed=0,
                               progress=False)  # fmt: skip
    per_pair = result.wall_seconds / result.steps / batch
    print(f"measured: {per_forward * 1e3:.2f} ms per sampling forward (per image), {per_pair * 1e3:.2f} ms per "
          f"training pair = {per_pair / per_forward:.1f} forwards (FLOPs: {FLOP_PAIR_FORWARDS:g})")  # fmt: skip
    return per_pair / per_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=PICKAPIC_ROWS)
    parser.add_argument("--unique-captions", type=int, default=PICKAPIC_CAPTIONS)
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per iteration")
    parser.add_argument("--pairs-per-step", type=int, default=2048)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--pair-forwards", type=float, default=FLOP_PAIR_FORWARDS, help="a training pair's cost")
    parser.add_argument("--measure", action="store_true", help="measure --pair-forwards on the SD-like model")
    args = parser.parse_args()
    scale = Scale(args.rows, args.unique_captions, args.steps, args.pairs_per_step, args.gpus)
    pair = measure_pair_forwards() if args.measure else args.pair_forwards
    print(f"{scale.rows:,} rows, {scale.unique_captions:,} distinct captions, {scale.optimizer_steps} steps × "
          f"{scale.pairs_per_step} pairs ({scale.visited_rows:,} rows visited), {scale.gpus} GPUs, a training pair = "
          f"{pair:.1f} UNet forwards\n")  # fmt: skip
    print(table(scale, pair))


if __name__ == "__main__":
    main()
