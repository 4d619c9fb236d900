"""train.precompute_reference on and off: the training step's time side by side, the precompute's time, and peak RSS.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_reference.py                 # demo preset and SD-1.5 width
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_reference.py --model demo    # one of them

For each model, full fine-tuning with spin_approx on random latents (one pair per micro-step as the memory tables,
--batch to change it), fp32 on the CPU:

* step time: `trainer.train` with a frozen reference model (off) and with the reference's terms read back (on),
  alternating --rounds times (after a warm-up round) in one child process from the same weights, --steps optimizer
  steps each; the median seconds per step of each, and their ratio (the loop's own clock: data loading included,
  set-up excluded);
* precompute: `trainer.reference_outputs` over the same steps, seconds per step (the forwards that moved);
* peak RSS: each mode in a fresh child process (model, data, precompute if on, then training); VmHWM of the whole
  child, and of the training alone (the peak reset just before it). Without mixed precision the reference copy is an
  fp32 copy of the model (bf16 on GPUs with mixed precision), and the precompute runs on the model itself.
Figures, not pass/fail. Run it alone: two torch jobs on 2 cores slow each other down unevenly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from spin_diffusion import encoding, models, presets, trainer  # noqa: E402
from spin_diffusion.config import LossConfig, TrainConfig  # noqa: E402

GiB = 2**30
SD15_UNET = dict(  # stable-diffusion-v1-5's UNet (859.5 M parameters), here at 16×16 latents (128-px images)
    sample_size=16,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


def build(name: str) -> tuple[torch.nn.Module, object, trainer.TrainData]:
    """(denoiser, family, data of 64 random pairs shaped for it)."""
    c = presets.build_preset("demo" if name == "demo" else "tiny", seed=0)
    if name == "sd15":
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        unet, latent, seq, dim = UNet2DConditionModel(**SD15_UNET), (4, 16, 16), 77, 768
    else:
        side = c.resolution // c.vae_scale_factor
        unet, latent = c.denoiser, (c.latent_channels, side, side)
        seq, dim = encoding.encode(c, ["a"]).shape[1:]
    g = torch.Generator().manual_seed(0)
    n = 64
    data = trainer.TrainData(
        winner=torch.randn(n, *latent, generator=g),
        prompt_embeds=torch.randn(n, seq, dim, generator=g),
        loser=torch.randn(n, *latent, generator=g),
    )
    return unet.eval(), c.family, data


def configs(steps: int, batch: int) -> tuple[LossConfig, TrainConfig]:
    return LossConfig(objective="spin_approx", beta=5000.0), TrainConfig(
        learning_rate=1e-6, batch_size=batch, max_steps=steps, checkpoint_every=0, log_every=steps, report_to="none"
    )


def precompute(model, family, data, loss_cfg, train_cfg) -> tuple[trainer.ReferenceOutputs, float]:
    started = time.perf_counter()
    outputs = list(
        trainer.reference_outputs(
            model, data, objective="spin_approx", loss_cfg=loss_cfg, train_cfg=train_cfg, family=family, seed=0
        )
    )
    seconds = time.perf_counter() - started
    return trainer.ReferenceOutputs(torch.cat([e for _, e, _ in outputs])), seconds


def train(model, family, data, loss_cfg, train_cfg, stored, out: Path) -> float:
    """Seconds per optimizer step of one training of `model` (trained in place)."""
    ref = None if stored is not None else models.frozen_copy(model)
    result = trainer.train(model.requires_grad_(True), ref, data, objective="spin_approx", loss_cfg=loss_cfg,
                           train_cfg=train_cfg, family=family, out_dir=out, seed=0, progress=False,
                           reference=stored)  # fmt: skip
    return result.wall_seconds / result.steps


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def child_times(name: str, rounds: int, steps: int, batch: int) -> dict:
    """Both modes alternating in this process, every round from the same weights (read back from disk, so no second
    copy of the model is held)."""
    model, family, data = build(name)
    loss_cfg, train_cfg = configs(steps, batch)
    times: dict[str, list[float]] = {"off": [], "on": [], "precompute": []}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(model.state_dict(), weights)
        for r in range(rounds + 1):  # round 0 warms up and is not counted
            for mode in ("off", "on"):
                model.load_state_dict(torch.load(weights, mmap=True))
                stored, seconds = None, 0.0
                if mode == "on":
                    stored, seconds = precompute(model, family, data, loss_cfg, train_cfg)
                step = train(model, family, data, loss_cfg, train_cfg, stored, Path(tmp) / f"{mode}{r}")
                if r:
                    times[mode].append(step)
                    if mode == "on":
                        times["precompute"].append(seconds / steps)
    return {"params": sum(p.numel() for p in model.parameters()), **times}


def child_peak(name: str, on: bool, steps: int, batch: int) -> dict:
    """Peak RSS of one mode: the whole process, and the training alone (the peak reset just before it)."""
    model, family, data = build(name)
    loss_cfg, train_cfg = configs(steps, batch)
    stored = precompute(model, family, data, loss_cfg, train_cfg)[0] if on else None
    whole_before = _peak()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    with tempfile.TemporaryDirectory() as tmp:
        train(model, family, data, loss_cfg, train_cfg, stored, Path(tmp))
    training = _peak()
    return {"peak_training": training, "peak_whole": max(whole_before, training)}


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "sd15"), nargs="*", default=["demo", "sd15"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, name = args.child[:2]
        if kind == "times":
            print(json.dumps(child_times(name, args.rounds, args.steps, args.batch)))
        else:
            print(json.dumps(child_peak(name, kind == "on", args.steps, args.batch)))
        return
    sizes = ["--rounds", str(args.rounds), "--steps", str(args.steps), "--batch", str(args.batch)]
    print(f"torch threads: {torch.get_num_threads()}; {args.rounds} rounds × {args.steps} steps, batch {args.batch}")
    for name in args.model:
        t = _child("times", name, *sizes)
        off, on, pre = (statistics.median(t[k]) for k in ("off", "on", "precompute"))
        print(f"\n{name}: {t['params'] / 1e6:.1f} M parameters")
        print(f"  step with a reference model      {off:.3f} s   (rounds: {', '.join(f'{x:.3f}' for x in t['off'])})")
        print(f"  step with precomputed terms      {on:.3f} s   (rounds: {', '.join(f'{x:.3f}' for x in t['on'])})")
        print(f"  speed-up of the step             {off / on:.2f}x")
        print(f"  precompute per step              {pre:.3f} s")
        print(f"  step + its precompute            {on + pre:.3f} s (vs {off:.3f} s)")
        for mode in ("off", "on"):
            peak = _child(mode, name, *sizes)
            label = "reference model  " if mode == "off" else "precomputed terms"
            print(f"  peak RSS, {label}: training {peak['peak_training'] / GiB:.2f} GiB, whole process "
                  f"{peak['peak_whole'] / GiB:.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
