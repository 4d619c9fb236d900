"""Regenerate the VAE shipped with the `demo` preset (src/spin_diffusion/assets/demo_vae/).

The demo world's images are simple, but a VAE trained for a few hundred steps sometimes merges two palette
colors (green -> cyan, red -> orange), which would make the exact judge fail on perfect latents. So the
VAE is trained once, long enough, checked with the judge on reconstructions, and shipped (about 160 kB):

    .venv/bin/python scripts/train_demo_vae.py            # ~1-2 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from spin_diffusion import encoding, presets, world
from spin_diffusion.demo.pretrain import train_vae
from spin_diffusion.images import pil_to_tensor

OUT = Path(__file__).resolve().parents[1] / "src" / "spin_diffusion" / "assets" / "demo_vae"


def main() -> int:
    torch.manual_seed(0)
    c = presets.build_preset("demo", seed=0, pretrained_vae=False)
    images = pil_to_tensor([img for img, _ in world.make_examples(4096, seed=2)]) * 2 - 1
    started = time.perf_counter()
    info = train_vae(c, images, steps=1500, batch_size=32, lr=2e-3, seed=0)
    test = world.make_examples(480, seed=7)
    recon = encoding.decode_latents(c, encoding.encode_images(c, pil_to_tensor([i for i, _ in test]) * 2 - 1))
    judged = world.judge_batch(recon, [cap for _, cap in test])
    info.update({f"judge_{k}": v for k, v in judged.items()}, train_seconds=round(time.perf_counter() - started, 1))
    print(json.dumps(info, indent=1))
    if judged["all"] < 0.99:
        print("reconstructions fail the judge; not saving", file=sys.stderr)
        return 1
    c.vae.save_pretrained(OUT, safe_serialization=True)
    (OUT / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
