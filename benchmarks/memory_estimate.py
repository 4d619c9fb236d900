"""Per-GPU memory of SPIN-Diffusion training for SD-1.5 and SDXL UNets, full fine-tuning and LoRA, DDP vs FSDP.

    PYTHONPATH=src python benchmarks/memory_estimate.py            # ~4 min on 2 CPU cores, < 8 GiB RAM
    PYTHONPATH=src python benchmarks/memory_estimate.py --no-measure   # counts + the activation figures below

How each number is obtained (printed with the table):

* parameters: exact, from the published UNet configs built on the meta device (`accelerate.init_empty_weights`);
  the text encoders and the VAE likewise from their published configs;
* LoRA: exact, rank r on every `to_q`, `to_k`, `to_v`, `to_out.0` Linear: r · (in + out) each (no bias);
* policy weights fp32 (master weights; bf16 autocast computes in bf16), gradients fp32, AdamW exp_avg + exp_avg_sq
  fp32 (8 bytes/param); FSDP (FULL_SHARD) divides all three by the number of GPUs; DDP keeps them whole;
* the frozen reference: bf16, whole on every GPU (the trainer keeps it unsharded in the mixed-precision dtype);
  LoRA runs have none (adapters disabled = reference) but keep the frozen base weights (fp32, sharded by FSDP);
* activations: measured, not modelled. A real SD-1.5 UNet runs forward + backward on this CPU for one pair (batch 2:
  winner + loser) with bf16 autocast at 16×16 and 32×32 latents (64×64 needs more RAM and time than this machine
  has); "activations" = peak RSS growth over a baseline that already holds weights and gradients (so it includes
  backward temporaries), cross-checked with the bytes autograd saves for backward. The two sizes give
  growth = C + s·area: C is mostly the bf16 copies of the weights autocast keeps for backward (≈ 2 bytes/param),
  s·area grows with the latent (CPU attention is torch's flash kernel, O(h·w) like flash/memory-efficient attention
  on GPUs), extrapolated to 64×64. SDXL (128×128) is an estimate: C × the parameter ratio + the SD-1.5 area part ×
  the ratio of the summed output sizes of every leaf module in meta-device forwards;
* the reference forward and the opponent's generation run without grad: their activations are transient.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

GiB = 2**30
SD15 = dict(
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
    sample_size=64,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL = dict(
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
    layers_per_block=2,
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
CLIP_BIGG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_unet(cfg: dict) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(cfg)


def lora_params(unet: torch.nn.Module, rank: int) -> int:
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear) and name.endswith(LORA_TARGETS)
    )


def frozen_parts(sdxl: bool) -> int:
    """Text encoder(s) + VAE parameters (generation and cache building only)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        n = _numel(CLIPTextModel(CLIPTextConfig(**CLIP_L))) + _numel(AutoencoderKL.from_config(VAE))
        if sdxl:
            n += _numel(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)))
    return n


def leaf_output_elements(cfg: dict, latent: int, batch: int = 2) -> int:
    """Sum of output elements of every leaf module in one meta-device forward (the activation scaling rule)."""
    unet = meta_unet(cfg)
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    for m in unet.modules():
        if not list(m.children()):
            m.register_forward_hook(hook)
    kw = {}
    if cfg.get("addition_embed_type") == "text_time":
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, 1280, device="meta"),
            "time_ids": torch.zeros(batch, 6, device="meta"),
        }
    with torch.no_grad():
        unet(
            torch.zeros(batch, 4, latent, latent, device="meta"),
            torch.zeros(batch, device="meta"),
            encoder_hidden_states=torch.zeros(batch, 77, cfg["cross_attention_dim"], device="meta"),
            **kw,
        )
    return total


# ---------------------------------------------------------------------------------------------------------------
# Measurement (one child process per case, so each has its own peak RSS)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure_child(latent: int, checkpointing: bool) -> dict:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(SD15).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    for p in unet.parameters():
        p.grad = torch.zeros_like(p)
    x, ctx = torch.randn(2, 4, latent, latent), torch.randn(2, 77, 768)
    t = torch.tensor([100, 700])
    saved: dict[int, int] = {}

    def pack(tensor):
        saved.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        return tensor

    base = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    started = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = unet(x, t, encoder_hidden_states=ctx).sample.float().pow(2).mean()
    loss.backward()
    return {
        "peak_growth": _rss("VmHWM") - base,
        "saved": sum(saved.values()),
        "seconds": time.perf_counter() - started,
        "weights_and_grads": 8 * _numel(unet),
    }


def measure(latent: int, checkpointing: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(latent), str(int(checkpointing))],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# Measured with this script on a 2-core AMD EPYC (avx512_bf16), torch 2.13 CPU, diffusers 0.42.1; used by
# --no-measure. Bytes for one pair (batch 2), bf16 autocast.
# (Rounded to 0.01 GiB; the full run took 5.5 min with another job on the same 2 cores, 9.1 GiB peak RSS.)
MEASURED = {
    (32, False): {"peak_growth": 2.31 * GiB, "saved": 2.01 * GiB},
    (16, False): {"peak_growth": 1.94 * GiB, "saved": 1.69 * GiB},
    (32, True): {"peak_growth": 1.86 * GiB, "saved": 0.28 * GiB},
}


# ---------------------------------------------------------------------------------------------------------------
# Table


def rows(n_gpus: int, act_sd15: float, act_sdxl: float, lora_rank: int) -> list[list[str]]:
    out = []
    for model, cfg, sdxl in (("SD-1.5", SD15, False), ("SDXL", SDXL, True)):
        unet = meta_unet(cfg)
        p, lp = _numel(unet), lora_params(unet, lora_rank)
        frozen = frozen_parts(sdxl) * 2  # bf16
        act = act_sdxl if sdxl else act_sd15
        for mode in ("full", f"LoRA r={lora_rank}"):
            for strategy, shards in (("DDP", 1), (f"FSDP ×{n_gpus}", n_gpus)):
                if mode == "full":
                    weights, grads, adam, ref = 4 * p / shards, 4 * p / shards, 8 * p / shards, 2 * p
                else:  # frozen base fp32 (+ adapter), grads/Adam of the adapter only, no reference copy
                    weights, grads, adam, ref = 4 * (p + lp) / shards, 4 * lp / shards, 8 * lp / shards, 0
                total = weights + grads + adam + ref + act
                out.append(
                    [
                        model,
                        mode,
                        strategy,
                        *(f"{v / GiB:.2f}" for v in (weights, grads, adam, ref, act, total)),
                        f"{frozen / GiB:.2f}",
                        f"{(4 * p + frozen) / GiB:.2f}",
                    ]
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--no-measure", action="store_true", help="use the figures measured here before")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_child(args.child[0], bool(args.child[1]))))
        return

    started = time.perf_counter()
    counts = {
        name: (_numel(u := meta_unet(cfg)), lora_params(u, args.lora_rank))
        for name, cfg in (("SD-1.5", SD15), ("SDXL", SDXL))
    }
    for name, (p, lp) in counts.items():
        print(f"{name} UNet: {p:,} parameters; LoRA r={args.lora_rank} on {'/'.join(LORA_TARGETS)}: {lp:,}")
    sd15_elems = leaf_output_elements(SD15, 64)
    sdxl_elems = leaf_output_elements(SDXL, 128)
    ratio = sdxl_elems / sd15_elems
    print(
        f"leaf-module output elements per pair: SD-1.5 @64² {sd15_elems:,}, SDXL @128² {sdxl_elems:,} "
        f"(ratio {ratio:.2f})"
    )

    if args.no_measure:
        m = MEASURED
    else:
        m = {key: measure(*key) for key in MEASURED}
    for (latent, ckpt), r in m.items():
        extra = f", {r['seconds']:.0f} s" if "seconds" in r else ""
        print(
            f"SD-1.5 one pair @ {latent}×{latent} latents, bf16 autocast{', gradient checkpointing' if ckpt else ''}: "
            f"peak RSS growth {r['peak_growth'] / GiB:.2f} GiB, saved for backward {r['saved'] / GiB:.2f} GiB{extra}"
        )
    # growth = C + s·area: C does not grow with the latent (mostly the bf16 copies of the weights that autocast
    # makes and keeps for backward, ≈ 2 bytes/param; CUDA autocast caches them the same way), s·area does.
    g16, g32 = m[(16, False)]["peak_growth"], m[(32, False)]["peak_growth"]
    per_px = (g32 - g16) / (32**2 - 16**2)
    const = g16 - per_px * 16**2
    sd15_p, sdxl_p = counts["SD-1.5"][0], counts["SDXL"][0]
    act_sd15 = const + per_px * 64**2
    act_sdxl = const * sdxl_p / sd15_p + per_px * 64**2 * ratio
    ckpt_ratio = m[(32, True)]["peak_growth"] / g32
    print(
        f"fit growth = C + s·area: C = {const / GiB:.2f} GiB (bf16 weight copies: {2 * sd15_p / GiB:.2f} GiB), "
        f"s·64² = {per_px * 64**2 / GiB:.2f} GiB"
    )
    print(
        f"gradient checkpointing at 32²: peak growth ×{ckpt_ratio:.2f}, saved-for-backward "
        f"×{m[(32, True)]['saved'] / m[(32, False)]['saved']:.2f}"
    )
    print(
        f"=> activations per pair: SD-1.5 @64² ≈ {act_sd15 / GiB:.2f} GiB (fit of two measured sizes); "
        f"SDXL @128² ≈ {act_sdxl / GiB:.2f} GiB (estimate: C × params ratio {sdxl_p / sd15_p:.2f} + s·64² × "
        f"leaf-output ratio {ratio:.2f})\n"
    )

    header = [
        "model",
        "training",
        "strategy",
        "policy weights",
        "grads",
        "AdamW",
        "reference (bf16)",
        "activations / pair",
        "total / GPU",
        "text enc.+VAE (bf16, generation only)",
        "opponent for generation",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows(args.gpus, act_sd15, act_sdxl, args.lora_rank):
        print("| " + " | ".join(row) + " |")
    print(
        f"\nGiB per GPU; one pair per GPU per micro-step (activations scale with it); gradient checkpointing "
        f"measured at 32² cut the peak growth to {ckpt_ratio:.0%} (it removes the area-proportional part; the "
        "constant bf16 weight copies stay, so the saving grows with resolution). Not included: CUDA context "
        "and allocator slack "
        f"(~1-3 GiB), DDP's gradient buckets (a second gradient copy unless gradient_as_bucket_view), FSDP's "
        f"transient all-gathered unit. 'opponent for generation' = the gathered fp32 policy every rank holds after "
        f"training + text encoders/VAE (training state is freed by then). ({time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
