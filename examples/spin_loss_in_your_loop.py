"""SPIN-Diffusion's loss in your own diffusers + accelerate training loop (no spin_diffusion trainer, no run dir).

A tiny class-conditional UNet learns "a red / green / blue square". Each self-play iteration k freezes the current
model as the opponent θ_k, lets it sample its own image for every real image's class (the loser), and trains
θ_{k+1} with `spin_diffusion.spin_loss` to denoise the real images better, and θ_k's own samples worse, than θ_k
does. A few steps of plain denoising (`spin_diffusion.denoise_error`) first, so that the opponent draws something.

    python examples/spin_loss_in_your_loop.py                       # ~1 min on a CPU
    python examples/spin_loss_in_your_loop.py --sft-steps 5 --steps 8 --iterations 1    # seconds

Prints one JSON line per step (loss and metrics), then {"done": ...}.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

import spin_diffusion as sd

SIZE, CLASSES = 16, 3  # 16×16 images of a red, green or blue square


def real_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A square of the label's color at a random place on black, in [-1, 1]: [N, 3, SIZE, SIZE]."""
    images = -torch.ones(len(labels), 3, SIZE, SIZE)
    corners = torch.randint(0, SIZE - 6, (len(labels), 2), generator=generator)
    for image, label, (y, x) in zip(images, labels.tolist(), corners.tolist(), strict=True):
        image[label, y : y + 6, x : x + 6] = 1.0
    return images


@torch.no_grad()
def own_samples(unet, sampler: DDIMScheduler, labels: torch.Tensor, steps: int, generator: torch.Generator):
    """The frozen opponent's own images for these classes: DDIM from seeded noise."""
    sampler.set_timesteps(steps)
    x = torch.randn(len(labels), 3, SIZE, SIZE, generator=generator).to(labels.device)
    for t in sampler.timesteps:
        x = sampler.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
    return x.clamp(-1, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="real images (and opponent samples per iteration)")
    parser.add_argument("--sft-steps", type=int, default=100, help="plain denoising steps before self-play")
    parser.add_argument("--iterations", type=int, default=2, help="self-play iterations K")
    parser.add_argument("--steps", type=int, default=40, help="SPIN steps per iteration")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of the opponent's samples")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=2000.0, help="β in Diffusion-DPO units")
    parser.add_argument("--loser-guard", type=float, default=None, help="Diffusion-SDPO's μ (e.g. 0.9); off if unset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes, counts = (args.images, args.batch_size, args.sample_steps), (args.sft_steps, args.iterations, args.steps)
    if min(sizes) < 1 or min(counts) < 0:
        parser.error("--images, --batch-size and --sample-steps must be >= 1; step and iteration counts >= 0")
    if not args.beta > 0 or not args.lr > 0:
        parser.error("--beta and --lr must be > 0")

    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    unet = UNet2DModel(
        sample_size=SIZE,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        num_class_embeds=CLASSES,
    )
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    sampler = DDIMScheduler.from_config(noise_scheduler.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    labels = torch.arange(args.images) % CLASSES
    real = real_images(labels, g)

    def noised_batch(images: list[torch.Tensor]):
        """The same rows of each image set, noised with the same noise and timestep (as SPIN pairs them)."""
        rows = torch.randint(0, args.images, (args.batch_size,), generator=g)
        noise = torch.randn(args.batch_size, 3, SIZE, SIZE, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch_size,), generator=g)
        noised = [noise_scheduler.add_noise(x[rows], noise, t) for x in images]
        return torch.cat(noised), t.repeat(len(images)), labels[rows].repeat(len(images)), noise

    def step(loss: torch.Tensor) -> None:
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(args.sft_steps):  # plain denoising: the model the self-play starts from
        x, t, y, noise = noised_batch([real])
        step(sd.denoise_error(unet(x.to(accelerator.device), t, class_labels=y).sample, noise).mean())

    for k in range(args.iterations):
        opponent = copy.deepcopy(accelerator.unwrap_model(unet)).eval().requires_grad_(False)  # θ_k, frozen
        generated = own_samples(opponent, sampler, labels.to(accelerator.device), args.sample_steps, g).cpu()
        for i in range(args.steps):
            x, t, y, noise = noised_batch([real, generated])  # rows: B winners (real), then B losers (own samples)
            x, t, y, noise = (v.to(accelerator.device) for v in (x, t, y, noise))
            policy_winner, policy_loser = unet(x, t, class_labels=y).sample.chunk(2)
            with torch.no_grad():
                ref_winner, ref_loser = opponent(x, t, class_labels=y).sample.chunk(2)
            out = sd.spin_loss(
                policy_winner,
                policy_loser,
                ref_winner,
                ref_loser,
                target_winner=noise,
                target_loser=noise,
                beta=args.beta,
                loser_guard=args.loser_guard,
            )
            step(out.loss)
            metrics = {name: round(value.mean().item(), 6) for name, value in out.metrics.items()}
            print(json.dumps({"iteration": k + 1, "step": i + 1, "loss": out.loss.item(), **metrics}), flush=True)
    print(json.dumps({"done": {"iterations": args.iterations, "steps": args.steps}}))


if __name__ == "__main__":
    main()
