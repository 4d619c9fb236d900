"""Side-by-side costs of one self-play iteration, in one process on the same components; prints ratios.

    .venv/bin/python benchmarks/bench_iteration.py                       # SD-like model, CPU (~5 min on 2 cores)
    .venv/bin/python benchmarks/bench_iteration.py --device cuda --model /models/stable-diffusion-v1-5
    .venv/bin/python benchmarks/bench_iteration.py --only flops          # FLOP ratios of SD-1.5 and the SD-like model

Sections (`--only` picks some):
  flops     FLOPs per image of UNet forward / VAE encode / VAE decode / text encode, for SD-1.5 (counted on the meta
            device, nothing allocated) and for the model benchmarked. The default "sdlike" model is SD-1.5's
            architecture with channels ~/8, 16x16x4 latents (128-px images) and a 3-layer text encoder; its cost ratios
            match SD-1.5's (printed side by side) while one UNet forward costs ~1/1000 of SD-1.5's.
  generate  opponent generation (`sampling.sample`, DDIM + CFG, latents only) vs diffusers'
            `StableDiffusionPipeline(..., output_type="latent")` on the same UNet, text encoder and embeddings.
  options   the sampling options of `sample.*`: dtype bf16 vs fp32, dpmsolver++ at half the steps vs DDIM, batch size.
  train     one SPIN training step (cached latents + embeddings) vs a Diffusion-DPO-structured step (the same step
            plus tokenize + text-encode the prompts and VAE-encode winner and loser images, every step, as the
            Diffusion-DPO reference train.py does). The encoders are frozen and run before the UNet, so the
            DPO-structured step is measured as the SPIN step + that encoding work, timed in the same process.
  iteration a whole self-play iteration (self_play.run on the shapes world, paper-like sampling: 50 DDIM steps, CFG
            7.5, one epoch): wall time of generate / train / eval.
Figures, not pass/fail; medians over --repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from spin_diffusion import (  # noqa: E402
    encoding,  # noqa: E402
    export,  # noqa: E402
    models,
    presets,  # noqa: E402
    sampling,
    trainer,
)
from spin_diffusion.config import LossConfig, TrainConfig  # noqa: E402

SD15 = dict(  # the architecture of stable-diffusion-v1-5 (configs only)
    unet=dict(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    ),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    seq_len=77,
)
# SD-1.5 with channels ~/8, latents 16x16 (128-px images) and a 3-layer text encoder: VAE/text/UNet FLOP ratios
# within ~2% of SD-1.5's (see `flops`); chosen by counting FLOPs of candidate configs against SD-1.5's.
SDLIKE = dict(
    unet=dict(
        sample_size=16,
        cross_attention_dim=96,
        attention_head_dim=8,
        block_out_channels=(40, 80, 160, 160),
        layers_per_block=2,
        norm_num_groups=8,
    ),
    vae=dict(block_out_channels=(15, 30, 60, 60), layers_per_block=2, norm_num_groups=5),
    text=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=12),
    seq_len=16,  # the shipped tokenizer's length
)


def _modules(arch: dict, vocab: int = 49408, tokenizer=None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **arch["unet"])
    n = len(arch["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        sample_size=arch["unet"]["sample_size"] * 2 ** (n - 1),
        **arch["vae"],
    )
    extra = (
        {}
        if tokenizer is None
        else dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=vocab, max_position_embeddings=arch["seq_len"], **arch["text"], **extra)
    )
    return unet, vae, text


def build_sdlike(seed: int = 0) -> models.Components:
    """The SD-like benchmark model: the demo preset's tokenizer and scheduler, SDLIKE's UNet / VAE / text encoder."""
    c = presets.build_preset("demo", seed=seed, pretrained_vae=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text = _modules(SDLIKE, vocab=len(c.tokenizer), tokenizer=c.tokenizer)
    c.denoiser, c.vae, c.text_encoder = (
        unet.eval(),
        vae.eval().requires_grad_(False),
        text.eval().requires_grad_(False),
    )
    return c


def _count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def component_flops(unet, vae, text, latent: int, seq_len: int, cross_dim: int) -> dict[str, float]:
    """FLOPs per image: UNet forward, VAE encode, VAE decode, text encode (on whatever device the modules are)."""
    dev = next(unet.parameters()).device
    f = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    return {
        "unet": _count(
            lambda: unet(
                torch.randn(1, 4, latent, latent, device=dev),
                torch.tensor([10], device=dev),
                encoder_hidden_states=torch.randn(1, seq_len, cross_dim, device=dev),
            )
        ),
        "vae_enc": _count(lambda: vae.encode(torch.randn(1, 3, latent * f, latent * f, device=dev))) if vae else 0.0,
        "vae_dec": _count(lambda: vae.decode(torch.randn(1, 4, latent, latent, device=dev))) if vae else 0.0,
        "text": _count(lambda: text(torch.zeros(1, seq_len, dtype=torch.long, device=dev))),
    }


def _print_flops(name: str, fl: dict[str, float]) -> None:
    u = fl["unet"]
    print(
        f"flops   {name:10s} UNet fwd {u / 1e9:9.3f} GFLOP/img | VAE enc {fl['vae_enc'] / u:5.2f}x  VAE dec "
        f"{fl['vae_dec'] / u:5.2f}x  text {fl['text'] / u:6.4f}x  (of one UNet forward)"
    )


def _timed(fn, repeats: int) -> float:
    return _compare([fn], repeats)[0]


def _compare(fns, repeats: int) -> list[float]:
    """Median seconds of each function, run interleaved (a, b, c, a, b, c, ...) after one warm-up each, so that
    load from other processes hits every candidate alike and the ratios stay meaningful."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def section_flops(c: models.Components, name: str) -> None:
    with torch.device("meta"):
        unet, vae, text = _modules(SD15)
    rows = [
        ("SD-1.5", component_flops(unet, vae, text, 64, 77, 768)),
        (
            name,
            component_flops(
                c.denoiser,
                c.vae,
                c.text_encoder,
                c.sample_size,
                c.tokenizer.model_max_length,
                c.denoiser.config.cross_attention_dim,
            ),
        ),
    ]
    for label, fl in rows:
        _print_flops(label, fl)
    u = 8.0  # UNet forwards per SPIN pair: policy fwd+bwd (3x) and ref fwd, on winner and loser
    for label, fl in rows:
        extra = (2 * fl["vae_enc"] + fl["text"]) / fl["unet"]
        print(
            f"flops   {label:10s} Diffusion-DPO-structured / SPIN training FLOPs = {(u + extra) / u:.2f}x; one "
            f"opponent image (50 steps x CFG = 100 UNet fwd) / one pair's training (8) = {100 / u:.1f}x"
        )


def section_generate(c, device, batch: int, steps: int, repeats: int) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        unet=c.denoiser,
        scheduler=DDIMScheduler.from_config(c.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a red circle number {i}" for i in range(batch)]
    embeds = encoding.encode_prompts(c, prompts)
    negative = encoding.encode_prompts(c, [""])
    shape = (c.latent_channels, c.sample_size, c.sample_size)
    seeds = list(range(batch))
    side = c.sample_size * c.vae_scale_factor

    def ours():
        sampling.sample(
            c.denoiser,
            c.family,
            embeds,
            negative,
            seeds=seeds,
            latent_shape=shape,
            num_steps=steps,
            guidance_scale=7.5,
        )

    def diffusers_pipe():
        pipe(
            prompt_embeds=embeds.to(device),
            negative_prompt_embeds=negative.expand(batch, -1, -1).to(device),
            num_inference_steps=steps,
            guidance_scale=7.5,
            height=side,
            width=side,
            output_type="latent",
            generator=[torch.Generator().manual_seed(s) for s in seeds],
        )

    t_ours, t_pipe = _compare([ours, diffusers_pipe], repeats)
    print(
        f"generate  ours {batch / t_ours:8.2f} img/s   diffusers pipeline {batch / t_pipe:8.2f} img/s   "
        f"pipeline time / ours = {t_pipe / t_ours:.2f}x  (DDIM{steps}+CFG, batch {batch}, latents only)"
    )


def section_options(c, device, batch: int, steps: int, repeats: int) -> None:
    embeds = encoding.encode_prompts(c, [f"a blue square {i}" for i in range(32)])
    negative = encoding.encode_prompts(c, [""])
    shape = (c.latent_channels, c.sample_size, c.sample_size)

    def run(n=batch, **kw):
        kw = {"num_steps": steps, **kw}
        return lambda: sampling.sample(
            c.denoiser,
            c.family,
            embeds[:n],
            negative,
            seeds=list(range(n)),
            latent_shape=shape,
            guidance_scale=7.5,
            **kw,
        )

    low = "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
    small, large = max(1, batch // 4), batch * 2
    cands = {
        f"DDIM{steps} fp32 batch {batch}": run(),
        f"dtype {low}": run(dtype=low),
        "dtype fp16": run(dtype="fp16"),
        f"dpmsolver++ {steps // 2} steps": run(num_steps=steps // 2, scheduler="dpmsolver++"),
        f"batch {small}": run(n=small),
        f"batch {large}": run(n=large),
    }
    if low == "fp16":
        del cands["dtype fp16"]
    images = {
        name: small if name == f"batch {small}" else large if name == f"batch {large}" else batch for name in cands
    }
    secs = dict(zip(cands, _compare(list(cands.values()), repeats), strict=True))
    base = secs[f"DDIM{steps} fp32 batch {batch}"] / batch
    for name, sec in secs.items():
        print(f"options   {name:24s}: {images[name] / sec:8.2f} img/s  speed-up {base / (sec / images[name]):.2f}x")


def section_train(c, device, batch: int, repeats: int) -> None:
    shape = (c.latent_channels, c.sample_size, c.sample_size)
    gen = torch.Generator().manual_seed(0)
    n = batch * 4
    prompts = [f"a green triangle at the top {i}" for i in range(n)]
    data = trainer.TrainData(
        winner=torch.randn(n, *shape, generator=gen),
        prompt_embeds=encoding.encode_prompts(c, prompts).cpu(),
        loser=torch.randn(n, *shape, generator=gen),
    )
    cfg = TrainConfig(
        batch_size=batch,
        max_steps=repeats + 1,
        checkpoint_every=0,
        log_every=1000,
        learning_rate=1e-5,
        mixed_precision="bf16" if device.type == "cuda" else "no",
    )
    ref = models.frozen_copy(c.denoiser)
    with tempfile.TemporaryDirectory() as tmp:
        result = trainer.train(
            c.denoiser,
            ref,
            data,
            objective="spin_approx",
            loss_cfg=LossConfig(),
            train_cfg=cfg,
            family=c.family,
            out_dir=tmp,
            seed=0,
            progress=False,
        )
    spin_step = result.wall_seconds / result.steps
    del ref
    side = c.sample_size * c.vae_scale_factor
    images = torch.rand(2 * batch, 3, side, side, generator=gen) * 2 - 1  # winner and loser pixels

    def encode():  # what the Diffusion-DPO train.py does per step besides the UNet work
        tokens = c.tokenizer(
            prompts[:batch],
            padding="max_length",
            max_length=c.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        with torch.no_grad():
            c.text_encoder(tokens)
            c.vae.encode(images.to(device)).latent_dist.sample() * c.vae.config.scaling_factor

    enc = _timed(encode, repeats)
    print(
        f"train     SPIN step {spin_step:7.3f} s ({batch} pairs)   + encoding {enc:7.3f} s   "
        f"Diffusion-DPO-structured / SPIN = {(spin_step + enc) / spin_step:.2f}x"
    )


def section_iteration(c, device, num_prompts: int, steps: int, batch: int) -> None:
    from spin_diffusion import self_play
    from spin_diffusion.config import load_config

    phases: dict[str, float] = {"generate": 0.0, "train": 0.0, "eval": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] += time.perf_counter() - t0

        return wrapper

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export.save_pipeline(c, Path(tmp) / "model")
        cfg = load_config(
            None,
            [
                f"run_dir={Path(tmp) / 'run'}",
                f"model.path={model_dir}",
                "data.builtin=shapes",
                f"data.num_builtin={num_prompts}",
                "num_iterations=1",
                f"sample.num_steps={steps}",
                "sample.guidance_scale=7.5",
                f"sample.batch_size={batch}",
                f"train.batch_size={batch}",
                "train.epochs=1",
                "train.checkpoint_every=0",
                "eval.include_base=false",
                f"eval.num_prompts={max(8, num_prompts // 4)}",
                "loss.objective=spin_approx",
            ]
            + (["train.mixed_precision=bf16"] if device.type == "cuda" else []),
        )
        saved = sampling.generate_shards, trainer.train, self_play.evaluate_denoiser
        sampling.generate_shards = timed("generate", saved[0])
        trainer.train = timed("train", saved[1])
        self_play.evaluate_denoiser = timed("eval", saved[2])
        try:
            t0 = time.perf_counter()
            self_play.run(cfg, progress=False)
            total = time.perf_counter() - t0
        finally:
            sampling.generate_shards, trainer.train, self_play.evaluate_denoiser = saved
    other = total - sum(phases.values())
    print(
        f"iteration {num_prompts} prompts, DDIM{steps}+CFG, 1 epoch batch {batch}, eval {cfg.eval.num_prompts} "
        f"prompts: total {total:.1f} s"
    )
    for name, sec in [*phases.items(), ("other (load, cache, export)", other)]:
        print(f"iteration   {name:28s} {sec:8.1f} s  {100 * sec / total:5.1f} %")
    print(f"iteration   generation / training = {phases['generate'] / phases['train']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdlike", help="sdlike (default), demo, or a local diffusers folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps for generate/options")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iteration-prompts", type=int, default=64)
    parser.add_argument("--only", nargs="*", default=["flops", "generate", "options", "train", "iteration"])
    args = parser.parse_args()

    torch.set_flush_denormal(True)
    if args.model == "sdlike":
        c = build_sdlike()
    elif args.model == "demo":
        c = presets.build_preset("demo")
    else:
        c = models.load_components(args.model)
    device = torch.device(args.device)
    for module in (c.denoiser, c.text_encoder, c.vae):
        if module is not None:
            module.to(device)
    print(
        f"model {args.model}: UNet {sum(p.numel() for p in c.denoiser.parameters()) / 1e6:.2f} M params, latents "
        f"{c.latent_channels}x{c.sample_size}x{c.sample_size}, device {device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    if "flops" in args.only:
        section_flops(c, args.model if len(args.model) < 11 else "model")
    if "generate" in args.only:
        section_generate(c, device, args.batch, args.steps, args.repeats)
    if "options" in args.only:
        section_options(c, device, args.batch, args.steps, args.repeats)
    if "train" in args.only:
        section_train(c, device, args.batch, args.repeats)
    if "iteration" in args.only:
        section_iteration(c, device, args.iteration_prompts, 50, args.batch)


if __name__ == "__main__":
    main()
