"""Per-GPU memory of SPIN-Diffusion training for SD-1.5, SDXL, SD3-medium and FLUX.1-dev, full and LoRA, DDP vs FSDP.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/memory_estimate.py  # ~9 min on 2 busy CPU cores, 9.1 GiB RAM
    PYTHONPATH=src python benchmarks/memory_estimate.py --no-measure   # counts + the activation figures below
    OMP_NUM_THREADS=1 python benchmarks/memory_estimate.py --only flux [--no-measure]  # FLUX.1-dev alone

How each number is obtained (printed with the table):

* parameters: exact, from the published UNet / SD3 transformer configs built on the meta device
  (`accelerate.init_empty_weights`); the text encoders and the VAE likewise from their published configs (SD3: CLIP-L
  and OpenCLIP-bigG with projections, the T5-XXL encoder with its embedding tied as in the checkpoint, the
  16-channel VAE without quant convs);
* LoRA: exact, rank r on every `to_q`, `to_k`, `to_v`, `to_out.0` Linear: r · (in + out) each (no bias); in SD3
  that is the image stream of every joint attention (the text stream's add_*_proj / to_add_out are not targeted);
* policy weights fp32 (master weights; bf16 autocast computes in bf16), gradients fp32, AdamW exp_avg + exp_avg_sq
  fp32 (8 bytes/param); FSDP (FULL_SHARD) divides all three by the number of GPUs; DDP keeps them whole;
* the frozen reference: none by default (train.precompute_reference: its errors are computed before training, by
  the opponent that just generated, and read back); with `train.precompute_reference: false` ("full, reference
  copy") it is bf16, whole on every GPU (the trainer keeps it unsharded in the mixed-precision dtype); LoRA runs have
  none either way (adapters disabled = reference) but keep the frozen base weights (fp32, sharded by FSDP);
* the precompute runs between generation and training, so it adds nothing to training: the opponent (fp32) and a
  bf16 copy of it for the reference's forwards (as training would cast it), no grads, no optimizer;
* text encoders: training reads cached embeddings, so no text encoder is in the training figures; SD3's (T5-XXL
  above all) leave the GPU once the cache is built, so its generation column is the VAE only, and the one-off
  cache-building memory (T5-XXL bf16 weights, and all three encoders + VAE) is printed separately;
* activations: measured, not modelled. A real SD-1.5 UNet runs forward + backward on this CPU for one pair (batch 2:
  winner + loser) with bf16 autocast at 16×16 and 32×32 latents (64×64 needs more RAM and time than this machine
  has); "activations" = peak RSS growth over a baseline that already holds weights and gradients (so it includes
  backward temporaries), cross-checked with the bytes autograd saves for backward. The two sizes give
  growth = C + s·area: C is mostly the bf16 copies of the weights autocast keeps for backward (≈ 2 bytes/param),
  s·area grows with the latent (CPU attention is torch's flash kernel, O(h·w) like flash/memory-efficient attention
  on GPUs), extrapolated to 64×64. SDXL (128×128) is an estimate: C × the parameter ratio + the SD-1.5 area part ×
  the ratio of the summed output sizes of every leaf module in meta-device forwards;
* SD3 activations: measured by the same method, but a full-depth SD3-medium transformer does not fit this machine
  (7.6 GiB fp32 weights + 7.6 GiB grads + ~20 GiB activations at 128²). Its blocks are all alike, so the
  transformer is built at full width (1536, 24 heads) with 2 and with 4 of its 24 blocks (the last one
  context-pre-only, as in the full model) and measured at 64×64 and 128×128 latents (1024 / 4096 image tokens +
  77 + 77 text tokens: CLIP, then T5 at the training's max_sequence_length=77), one pair, timestep σ·1000. Per size,
  growth = A + L·P: P is one block, A the rest (embedders, final norm and projection, the last block's difference);
  the figure is A + 24·P at 128² (measured at the training size: only the depth is extrapolated). The two sizes give
  P = C + s·image tokens (C ≈ the block's bf16 weight copies + its text-token part). These runs make CPU autocast
  do what CUDA autocast does with layer_norm (fp32 in, fp32 out; CPU autocast keeps it in bf16), which adds ~18% to a
  block; the bf16-norm figure is printed too. Gradient checkpointing: the same 2/4-block fit at 128²;
* FLUX.1-dev (transformer: 19 double-stream + 38 single-stream blocks, width 3072; CLIP-L and T5-XXL; SD3's
  16-channel VAE), trained at 1024²: 4096 packed image tokens + 512 T5 tokens, called as FluxPipeline calls it
  (σ in [0, 1], guidance). Parameters and LoRA exact as above (LoRA: the double blocks' image-stream
  to_q/k/v/to_out.0 and the single blocks' to_q/k/v, which have no to_out: 190 Linears). Activations are NOT
  measured at the training size: on the machine this ran on (no AVX-512, bf16 matmuls at ~9 GFLOP/s a core) one
  single block at 96 tokens took ~3 min, the training size would take hours per block. Instead: (1) the exact bytes
  autograd saves for backward are counted with the full 19 + 38-block model at 4096 + 512 tokens on fake tensors
  (FakeTensorMode: shapes, dtypes and autograd without data or compute; bf16 autocast, fp32 norms as CUDA autocast,
  SDPA forced to the flash kernel, storages deduplicated, autocast's bf16 weight copies included); no depth or token
  extrapolation; (2) real runs at full width with 0+1, 0+2 and 1+1 (double + single) blocks at 64 + 32 tokens
  check that count (the saved bytes agree exactly) and give what peak RSS adds to it (backward temporaries,
  allocator), which is added to the full-size count as measured there, at 96 tokens (it grows with the token count,
  so at 4608 tokens it is an underestimate, by ~1 GiB or less at SD3's rate); (3) gradient checkpointing: the
  bytes saved outside the checkpointed blocks ∪ the block inputs the checkpoints hold (counted on fake tensors,
  full size) + one double block's saved bytes (the block being recomputed in backward) + the same transient: a
  rule built on exact counts, not a measurement, checked against a real checkpointed 0+2-block run at 64 + 32
  tokens (it comes out ~6 % under the measured peak growth there);
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
# SD3-medium (stabilityai/stable-diffusion-3-medium-diffusers): transformer/, text_encoder (CLIP-L with projection),
# text_encoder_2 (OpenCLIP-bigG with projection), text_encoder_3 (T5-XXL encoder), vae/ (16 latent channels)
SD3 = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    feed_forward_proj="gated-gelu",
)
VAE_SD3 = {**VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
SD3_LATENT = 128  # 1024 px
SD3_TEXT_TOKENS = 77 + 77  # CLIP-L ⊕ CLIP-G (77) then T5 (families.SD3_MAX_SEQUENCE_LENGTH = 77), joined
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# FLUX.1-dev (black-forest-labs/FLUX.1-dev): transformer/ (19 double-stream + 38 single-stream blocks, width 3072),
# text_encoder (CLIP-L, pooled output), text_encoder_2 (T5-XXL encoder), vae/ (16 latent channels, as SD3's)
FLUX = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_IMAGE_TOKENS = (128 // 2) ** 2  # 1024 px -> 128² latents, packed 2×2 -> 4096 tokens
FLUX_TEXT_TOKENS = 512  # T5 max_sequence_length, FLUX.1-dev's default
# The real (RSS) runs: (image tokens, text tokens), far below the training size (the machine this ran on computes
# bf16 at ~9 GFLOP/s on a core: one single-stream block at these 96 tokens takes ~3 min forward + backward)
FLUX_MEASURED_TOKENS = (64, 32)
FLUX_DEPTHS = ((0, 1), (0, 2), (1, 1))  # (double, single) blocks
# Fake-tensor cases (image tokens, text tokens, double, single, checkpointing): the measured ones (to check the
# saved-bytes count against the real runs), the same depths at the training size, and the full model
FLUX_FAKE_CASES = (
    *((*FLUX_MEASURED_TOKENS, *d, 0) for d in FLUX_DEPTHS),
    (*FLUX_MEASURED_TOKENS, 0, 2, 1),
    *((FLUX_IMAGE_TOKENS, FLUX_TEXT_TOKENS, *d, 0) for d in FLUX_DEPTHS),
    (FLUX_IMAGE_TOKENS, FLUX_TEXT_TOKENS, FLUX["num_layers"], FLUX["num_single_layers"], 0),
    (FLUX_IMAGE_TOKENS, FLUX_TEXT_TOKENS, FLUX["num_layers"], FLUX["num_single_layers"], 1),
)

# Z-Image-Turbo (Tongyi-MAI/Z-Image-Turbo): transformer/ (2 noise-refiner + 2 context-refiner + 30 single-stream
# blocks, width 3840, 30 heads), text_encoder (Qwen3-4B), vae/ (FLUX.1's: 16 latent channels, no quant convs)
ZIMAGE = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1024, 512, 512],
)
QWEN3_4B = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
)
ZIMAGE_TEXT_TOKENS = 512  # ZImagePipeline's max_sequence_length (prompts are shorter: their own tokens only)
# Fake-tensor cases (image tokens, text tokens, main layers, refiner layers, checkpointing)
ZIMAGE_FAKE_CASES = (  # one block, two blocks, the full depth, checkpointed (newer_main reads them in this order)
    (FLUX_IMAGE_TOKENS, ZIMAGE_TEXT_TOKENS, 1, 1, 0),
    (FLUX_IMAGE_TOKENS, ZIMAGE_TEXT_TOKENS, 2, 1, 0),
    (FLUX_IMAGE_TOKENS, ZIMAGE_TEXT_TOKENS, ZIMAGE["n_layers"], ZIMAGE["n_refiner_layers"], 0),
    (FLUX_IMAGE_TOKENS, ZIMAGE_TEXT_TOKENS, ZIMAGE["n_layers"], ZIMAGE["n_refiner_layers"], 1),
)

# Qwen-Image (Qwen/Qwen-Image): transformer/ (60 dual-stream blocks, width 3072, 24 heads, 2×2-packed 16-channel
# latents), text_encoder (Qwen2.5-VL-7B; its vision tower is loaded too), vae/ (Qwen-Image's causal VAE)
QWENIMAGE = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
QWEN25_VL_7B_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
)
QWEN25_VL_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    fullatt_block_indexes=[7, 15, 23, 31],
)
QWENIMAGE_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)
QWENIMAGE_TEXT_TOKENS = 256  # configs/qwenimage_pickapic.yaml's max_sequence_length (the pipeline allows 1024)
QWENIMAGE_FAKE_CASES = (  # (image tokens, text tokens, blocks, checkpointing), in ZIMAGE_FAKE_CASES' order
    (FLUX_IMAGE_TOKENS, QWENIMAGE_TEXT_TOKENS, 1, 0),
    (FLUX_IMAGE_TOKENS, QWENIMAGE_TEXT_TOKENS, 2, 0),
    (FLUX_IMAGE_TOKENS, QWENIMAGE_TEXT_TOKENS, QWENIMAGE["num_layers"], 0),
    (FLUX_IMAGE_TOKENS, QWENIMAGE_TEXT_TOKENS, QWENIMAGE["num_layers"], 1),
)


# FLUX.2 [klein] base 4B (black-forest-labs/FLUX.2-klein-base-4B, Apache-2.0): transformer/ (5 double + 20 single
# blocks, width 3072, no guidance embedding), text_encoder (Qwen3-4B: QWEN3_4B; its layers 9, 18 and 27 stacked give
# the 7680-wide text), vae/ (AutoencoderKLFlux2 as diffusers' defaults give it: 32 latent channels, patchified 2×2 to
# 128). The transformer config was not readable here (the Hub is unreachable); these numbers agree in two
# independent copies of it: DiffSynth-Studio's model table (diffsynth/configs/model_configs.py, FLUX.2-klein-4B) and
# Tenstorrent's tt-forge-models GGUF loader of FLUX.2-klein-base-4B ("inferred from GGUF tensor shapes").
FLUX2_KLEIN = dict(
    patch_size=1,
    in_channels=128,
    out_channels=None,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)
FLUX2_TEXT_TOKENS = 512  # configs/flux2_pickapic.yaml's max_sequence_length (Flux2KleinPipeline's default)
FLUX2_FAKE_CASES = (  # (image tokens, text tokens, double, single, checkpointing), in ZIMAGE_FAKE_CASES' order: the
    # "one block" step is a double block (the larger kind: two streams), added to one double + one single
    (FLUX_IMAGE_TOKENS, FLUX2_TEXT_TOKENS, 1, 1, 0),
    (FLUX_IMAGE_TOKENS, FLUX2_TEXT_TOKENS, 2, 1, 0),
    (FLUX_IMAGE_TOKENS, FLUX2_TEXT_TOKENS, FLUX2_KLEIN["num_layers"], FLUX2_KLEIN["num_single_layers"], 0),
    (FLUX_IMAGE_TOKENS, FLUX2_TEXT_TOKENS, FLUX2_KLEIN["num_layers"], FLUX2_KLEIN["num_single_layers"], 1),
)


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_unet(cfg: dict) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(cfg)


def lora_targets(net: torch.nn.Module) -> list[str]:
    """The module names the tool's LoRA adapts by default in `net` (its family's list: LORA_TARGETS but for FLUX.2)."""
    from diffusers import Flux2Transformer2DModel

    from spin_diffusion.families import Flux2KleinFamily

    return Flux2KleinFamily({}).lora_target_modules(net) if isinstance(net, Flux2Transformer2DModel) else LORA_TARGETS


def lora_params(unet: torch.nn.Module, rank: int) -> int:
    """LoRA parameters of rank `rank` on the default targets (peft's rule: a module name that is a target or ends
    in "." + a target)."""
    targets = lora_targets(unet)
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    )


def meta_sd3(cfg: dict = SD3) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    with init_empty_weights():
        return SD3Transformer2DModel.from_config(cfg)


def meta_flux(cfg: dict = FLUX) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        return FluxTransformer2DModel.from_config(cfg)


def meta_zimage(cfg: dict = ZIMAGE) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel

    with init_empty_weights():
        return ZImageTransformer2DModel.from_config(cfg)


def meta_qwenimage(cfg: dict = QWENIMAGE) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    with init_empty_weights():
        return QwenImageTransformer2DModel.from_config(cfg)


def meta_flux2(cfg: dict = FLUX2_KLEIN) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    with init_empty_weights():
        return Flux2Transformer2DModel.from_config(cfg)


def _text_params(model: torch.nn.Module) -> int:
    # init_empty_weights leaves T5's encoder.embed_tokens untied from shared (and re-tying inside it makes a new
    # meta parameter); the checkpoint ties them, so tie outside it before counting (a no-op for CLIP)
    model.tie_weights()
    return _numel(model)


def frozen_parts(model: str) -> dict[str, int]:
    """Parameters of the text encoder(s) and the VAE (cache building and generation only), by part."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with init_empty_weights():
        if model == "FLUX":
            text = {"CLIP-L": CLIPTextModel(CLIPTextConfig(**CLIP_L)), "T5-XXL": T5EncoderModel(T5Config(**T5_XXL))}
        elif model == "Z-Image":
            from transformers import Qwen3Config, Qwen3Model

            text = {"Qwen3-4B": Qwen3Model(Qwen3Config(**QWEN3_4B))}
        elif model == "FLUX.2 [klein]":
            from diffusers import AutoencoderKLFlux2
            from transformers import Qwen3Config, Qwen3ForCausalLM

            # Flux2KleinPipeline loads a Qwen3ForCausalLM (its LM head tied to the embeddings: tied below)
            text = {"Qwen3-4B": Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B))}
            vae = AutoencoderKLFlux2()
        elif model == "Qwen-Image":
            from diffusers import AutoencoderKLQwenImage
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

            config = Qwen2_5_VLConfig(text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_7B_VISION)
            text = {"Qwen2.5-VL-7B": Qwen2_5_VLForConditionalGeneration(config)}
            return {
                **{name: _text_params(m) for name, m in text.items()},
                "VAE": _numel(AutoencoderKLQwenImage(**QWENIMAGE_VAE)),
            }
        elif model == "SD3":
            text = {
                "CLIP-L": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, projection_dim=768)),
                "CLIP-G": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
                "T5-XXL": T5EncoderModel(T5Config(**T5_XXL)),
            }
        else:
            text = {"CLIP-L": CLIPTextModel(CLIPTextConfig(**CLIP_L))}
            if model == "SDXL":
                text["CLIP-G"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
        if model != "FLUX.2 [klein]":
            vae = AutoencoderKL.from_config(VAE_SD3 if model in ("SD3", "FLUX", "Z-Image") else VAE)
    return {**{name: _text_params(m) for name, m in text.items()}, "VAE": _numel(vae)}


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


def _forward_backward(model: torch.nn.Module, call) -> dict:
    """Peak RSS growth of one bf16-autocast forward + backward over a baseline holding weights and gradients."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
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
            loss = call().float().pow(2).mean()
    loss.backward()
    return {
        "peak_growth": _rss("VmHWM") - base,
        "saved": sum(saved.values()),
        "seconds": time.perf_counter() - started,
        "weights_and_grads": 8 * _numel(model),
    }


def measure_child(latent: int, checkpointing: bool) -> dict:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(SD15).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    x, ctx = torch.randn(2, 4, latent, latent), torch.randn(2, 77, 768)
    t = torch.tensor([100, 700])
    return _forward_backward(unet, lambda: unet(x, t, encoder_hidden_states=ctx).sample)


def _fp32_norms() -> None:
    """CUDA autocast runs layer_norm/group_norm in fp32 (fp32 outputs); CPU autocast runs them in bf16. Make CPU
    do what CUDA does: inputs cast to fp32, norm in fp32, fp32 out."""
    import torch.nn.functional as F

    def fp32(fn):
        def norm(x, *args, **kwargs):
            args = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            kwargs = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return fn(x.float(), *args, **kwargs)

        return norm

    F.layer_norm, F.group_norm = fp32(F.layer_norm), fp32(F.group_norm)


def measure_sd3_child(latent: int, layers: int, checkpointing: bool, fp32_norms: bool) -> dict:
    """SD3-medium's transformer at full width with `layers` of its 24 blocks (the last one context-pre-only, as in
    the full model), one pair, SD3_TEXT_TOKENS text tokens."""
    from diffusers import SD3Transformer2DModel

    if fp32_norms:
        _fp32_norms()
    torch.manual_seed(0)
    model = SD3Transformer2DModel.from_config({**SD3, "num_layers": layers}).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    x = torch.randn(2, SD3["in_channels"], latent, latent)
    ctx = torch.randn(2, SD3_TEXT_TOKENS, SD3["joint_attention_dim"])
    pooled = torch.randn(2, SD3["pooled_projection_dim"])
    sigma_1000 = torch.tensor([100.0, 700.0])
    kw = dict(timestep=sigma_1000, encoder_hidden_states=ctx, pooled_projections=pooled)
    return _forward_backward(model, lambda: model(hidden_states=x, **kw).sample)


def _flux_call(image_tokens: int, text_tokens: int, double: int, single: int, checkpointing: bool):
    """FLUX.1-dev's transformer at full width (3072, 24 heads) with `double` of its 19 double-stream and `single` of
    its 38 single-stream blocks and a closure running it on one pair as FluxPipeline calls it (packed latents, σ in
    [0, 1], guidance). Built in the current mode (real tensors, or fake ones under FakeTensorMode)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel.from_config({**FLUX, "num_layers": double, "num_single_layers": single}).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    side = int(image_tokens**0.5)  # packed grid: latents are 2·side × 2·side
    x = torch.randn(2, image_tokens, FLUX["in_channels"])
    kw = dict(
        timestep=torch.tensor([0.1, 0.7]),
        guidance=torch.full((2,), 3.5),
        pooled_projections=torch.randn(2, FLUX["pooled_projection_dim"]),
        encoder_hidden_states=torch.randn(2, text_tokens, FLUX["joint_attention_dim"]),
        txt_ids=torch.zeros(text_tokens, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(2, side, side, "cpu", torch.float32),
    )
    return model, lambda: model(hidden_states=x, **kw).sample


def measure_flux_child(image_tokens: int, text_tokens: int, double: int, single: int, checkpointing: bool) -> dict:
    """Real run: peak RSS growth and saved bytes of one pair, fp32 norms as CUDA autocast, SDPA forced to the flash
    kernel (O(tokens) memory, as on GPUs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _fp32_norms()
    model, call = _flux_call(image_tokens, text_tokens, double, single, checkpointing)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return _forward_backward(model, call)


def _zimage_call(image_tokens: int, text_tokens: int, layers: int, refiners: int, checkpointing: bool):
    """Z-Image's transformer at full width (3840, 30 heads) with `layers` of its 30 main blocks and `refiners` of each
    2 refiner stacks, and a closure running it on one pair as ZImagePipeline calls it (lists of [16, 1, h, w] latents,
    time 1 - σ, each prompt's own `text_tokens` features). Built in the current mode (fake tensors here)."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel.from_config({**ZIMAGE, "n_layers": layers, "n_refiner_layers": refiners})
    model.train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    side = 2 * int(image_tokens**0.5)  # latents 2·side² for `image_tokens` 2×2 patches
    x = [torch.randn(ZIMAGE["in_channels"], 1, side, side) for _ in range(2)]
    caps = [torch.randn(text_tokens, ZIMAGE["cap_feat_dim"]) for _ in range(2)]
    return model, lambda: torch.stack(model(x, torch.tensor([0.3, 0.9]), caps).sample)


def _flux2_call(image_tokens: int, text_tokens: int, double: int, single: int, checkpointing: bool):
    """FLUX.2 [klein] 4B's transformer at full width (3072, 24 heads) with `double` of its 5 double-stream and
    `single` of its 20 single-stream blocks, and a closure running it on one pair as Flux2KleinPipeline calls it
    (128-channel patchified latents, σ in [0, 1], 4-axis position ids, no guidance)."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    torch.manual_seed(0)
    cfg = {**FLUX2_KLEIN, "num_layers": double, "num_single_layers": single}
    model = Flux2Transformer2DModel.from_config(cfg).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    side = int(image_tokens**0.5)
    text = torch.randn(2, text_tokens, FLUX2_KLEIN["joint_attention_dim"])
    x = torch.randn(2, FLUX2_KLEIN["in_channels"], side, side)
    kw = dict(
        encoder_hidden_states=text,
        timestep=torch.tensor([0.3, 0.9]),
        img_ids=Flux2KleinPipeline._prepare_latent_ids(x),
        txt_ids=Flux2KleinPipeline._prepare_text_ids(text),
    )
    packed = x.flatten(2).transpose(1, 2)  # the pipeline's _pack_latents: [B, C, H, W] -> [B, H·W, C]
    return model, lambda: model(hidden_states=packed, **kw).sample


def _qwenimage_call(image_tokens: int, text_tokens: int, layers: int, checkpointing: bool):
    """Qwen-Image's transformer at full width (3072, 24 heads) with `layers` of its 60 blocks and a closure running
    it on one pair as QwenImagePipeline calls it (packed latents, σ, `text_tokens` of Qwen2.5-VL features)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel.from_config({**QWENIMAGE, "num_layers": layers}).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    side = int(image_tokens**0.5)
    x = torch.randn(2, image_tokens, QWENIMAGE["in_channels"])
    kw = dict(
        encoder_hidden_states=torch.randn(2, text_tokens, QWENIMAGE["joint_attention_dim"]),
        encoder_hidden_states_mask=torch.ones(2, text_tokens),
        timestep=torch.tensor([0.3, 0.9]),
        img_shapes=[[(1, side, side)]] * 2,
    )
    return model, lambda: model(hidden_states=x, **kw).sample


# model -> (the call builder, its fake-tensor cases, its blocks)
_SAVED = {
    "flux": (
        lambda case: _flux_call(*case),
        lambda: FLUX_FAKE_CASES,
        lambda m: [*m.transformer_blocks, *m.single_transformer_blocks],
    ),
    "zimage": (
        lambda case: _zimage_call(*case),
        lambda: ZIMAGE_FAKE_CASES,
        lambda m: [*m.noise_refiner, *m.context_refiner, *m.layers],
    ),
    "qwenimage": (
        lambda case: _qwenimage_call(*case),
        lambda: QWENIMAGE_FAKE_CASES,
        lambda m: list(m.transformer_blocks),
    ),
    "flux2": (
        lambda case: _flux2_call(*case),
        lambda: FLUX2_FAKE_CASES,
        lambda m: [*m.transformer_blocks, *m.single_transformer_blocks],
    ),
}


def saved_child(kind: str) -> dict:
    """The forward + backward of each of the model's cases on fake tensors (FakeTensorMode: shapes, dtypes and
    autograd, no data, no compute): the exact bytes autograd saves for backward (storages deduplicated, autocast's
    bf16 weight copies included), at any size, fp32 norms as CUDA autocast, SDPA forced to the flash kernel (O(tokens)
    memory, as on GPUs). With gradient checkpointing also the bytes of the inputs the checkpointed blocks hold (a
    forward pre-hook on every block): non-reentrant checkpointing hides its recomputed tensors from the hook."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    build, cases, blocks_of = _SAVED[kind]
    _fp32_norms()
    out = {}
    for case in cases():
        with FakeTensorMode(allow_non_fake_inputs=True), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            model, call = build(case)
            saved: dict[int, int] = {}
            held: dict[int, int] = {}

            def pack(tensor, saved=saved):
                saved.setdefault(tensor.untyped_storage()._cdata, tensor.untyped_storage().nbytes())
                return tensor

            def hold(_m, args, kwargs, held=held):
                for t in [*args, *kwargs.values()]:
                    if isinstance(t, torch.Tensor) and torch.is_grad_enabled():
                        held.setdefault(t.untyped_storage()._cdata, t.untyped_storage().nbytes())

            hooks = [b.register_forward_pre_hook(hold, with_kwargs=True) for b in blocks_of(model)]
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = call().float().pow(2).mean()
            for h in hooks:
                h.remove()
            loss.backward()
        out[",".join(map(str, case))] = {
            "saved": sum(saved.values()),
            "held": sum(held.values()),
            "saved_or_held": sum({**saved, **held}.values()),
        }
    return out


def measure(*case: int, flux: bool = False) -> dict:
    """Run one case in a child process: (latent, checkpointing) for SD-1.5, (latent, layers, checkpointing,
    fp32_norms) for SD3, (image tokens, text tokens, double blocks, single blocks, checkpointing) for FLUX."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    out = subprocess.run(
        [sys.executable, __file__, "--child-flux" if flux else "--child", *map(str, map(int, case))],
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
# SD3 cases: (latent, layers, gradient checkpointing, fp32 norms as CUDA autocast). Same machine, OMP_NUM_THREADS=1,
# one run of this script (8.7 min, 9.1 GiB peak RSS, in the SD-1.5 32² case; the SD3 cases peak at ~7 GiB). Each
# case repeats to ~0.02 GiB, which A + 24·P = 11·g(4) - 10·g(2) amplifies to ~±0.2 GiB.
MEASURED_SD3 = {
    (64, 2, False, True): {"peak_growth": 0.81 * GiB, "saved": 0.66 * GiB},
    (64, 4, False, True): {"peak_growth": 1.54 * GiB, "saved": 1.34 * GiB},
    (128, 2, False, True): {"peak_growth": 2.07 * GiB, "saved": 1.70 * GiB},
    (128, 4, False, True): {"peak_growth": 3.70 * GiB, "saved": 3.33 * GiB},
    (128, 2, False, False): {"peak_growth": 1.67 * GiB, "saved": 1.36 * GiB},
    (128, 4, False, False): {"peak_growth": 3.05 * GiB, "saved": 2.70 * GiB},
    (128, 2, True, True): {"peak_growth": 1.39 * GiB, "saved": 0.19 * GiB},
    (128, 4, True, True): {"peak_growth": 1.58 * GiB, "saved": 0.24 * GiB},
}

# FLUX real runs (image tokens, text tokens, double blocks, single blocks, gradient checkpointing): peak RSS growth
# and saved bytes, one child process each, OMP_NUM_THREADS=1, torch 2.13 CPU, diffusers 0.42.1, on a 2-core AMD EPYC
# without AVX-512 (bf16 matmuls ~9 GFLOP/s), shared with other jobs: 200-710 s per case.
MEASURED_FLUX = {
    (64, 32, 0, 1, 0): {"peak_growth": 694591488, "saved": 418109952},
    (64, 32, 0, 2, 0): {"peak_growth": 1032900608, "saved": 736734208},
    (64, 32, 1, 1, 0): {"peak_growth": 1433800704, "saved": 1139156480},
    (64, 32, 0, 2, 1): {"peak_growth": 759091200, "saved": 101746688},
}


def sd3_depth_fit(m: dict, latent: int, ckpt: bool = False, fp32_norms: bool = True) -> tuple[float, float]:
    """growth(L) = A + L·P from the 2- and 4-layer cases: (A, P). A holds the embedders, the final norm/projection
    and what the last (context-pre-only) block lacks of a full one; P is one full block."""
    g2, g4 = (m[(latent, n, ckpt, fp32_norms)]["peak_growth"] for n in (2, 4))
    per_layer = (g4 - g2) / 2
    return g2 - 2 * per_layer, per_layer


# ---------------------------------------------------------------------------------------------------------------
# Table


HEADER = [
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
    "reference precompute (opponent + bf16 copy)",
]


def rows(n_gpus: int, acts: dict[str, float], lora_rank: int, models=("SD-1.5", "SDXL", "SD3")) -> list[list[str]]:
    out = []
    for model in models:
        if model == "FLUX":
            net = meta_flux()
        elif model == "Z-Image":
            net = meta_zimage()
        elif model == "Qwen-Image":
            net = meta_qwenimage()
        elif model == "FLUX.2 [klein]":
            net = meta_flux2()
        else:
            net = meta_sd3() if model == "SD3" else meta_unet(SD15 if model == "SD-1.5" else SDXL)
        p, lp = _numel(net), lora_params(net, lora_rank)
        parts = frozen_parts(model)
        # SD3, FLUX: the text encoders leave the GPU once the embeddings are cached; generation needs only the VAE
        flow = model in ("SD3", "FLUX", "Z-Image", "Qwen-Image", "FLUX.2 [klein]")
        frozen = 2 * (parts["VAE"] if flow else sum(parts.values()))  # bf16
        act = acts[model]
        for mode in ("full", "full, reference copy", f"LoRA r={lora_rank}"):
            for strategy, shards in (("DDP", 1), (f"FSDP ×{n_gpus}", n_gpus)):
                if mode.startswith("full"):  # the default precomputes the reference's terms: no copy in training
                    weights, grads, adam = 4 * p / shards, 4 * p / shards, 8 * p / shards
                    ref = 2 * p if mode == "full, reference copy" else 0
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
                        f"{(4 * p + 2 * p + frozen) / GiB:.2f}" if mode == "full" else "-",
                    ]
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--no-measure", action="store_true", help="use the figures measured here before")
    parser.add_argument(
        "--only",
        choices=("flux", "zimage", "qwenimage", "flux2"),
        help="only this model (its counts, measurement and rows)",
    )
    parser.add_argument("--child", nargs="+", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-flux", nargs=5, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-saved", choices=tuple(_SAVED), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_saved:
        print(json.dumps(saved_child(args.child_saved)))
        return
    if args.only in _NEWER:
        newer_main(args.only, args)
        return
    if args.child_flux:
        image_tokens, text_tokens, double, single, ckpt = args.child_flux
        print(json.dumps(measure_flux_child(image_tokens, text_tokens, double, single, bool(ckpt))))
        return
    if args.only == "flux":
        flux_main(args)
        return
    if args.child:
        if len(args.child) == 2:
            print(json.dumps(measure_child(args.child[0], bool(args.child[1]))))
        else:
            latent, layers, ckpt, fp32_norms = args.child
            print(json.dumps(measure_sd3_child(latent, layers, bool(ckpt), bool(fp32_norms))))
        return

    started = time.perf_counter()
    counts = {
        name: (_numel(u := build()), lora_params(u, args.lora_rank))
        for name, build in (
            ("SD-1.5", lambda: meta_unet(SD15)),
            ("SDXL", lambda: meta_unet(SDXL)),
            ("SD3", meta_sd3),
        )
    }
    for name, (p, lp) in counts.items():
        net = "transformer" if name == "SD3" else "UNet"
        print(f"{name} {net}: {p:,} parameters; LoRA r={args.lora_rank} on {'/'.join(LORA_TARGETS)}: {lp:,}")
    for name in counts:
        parts = frozen_parts(name)
        print(f"{name} frozen parts: " + ", ".join(f"{k} {v:,}" for k, v in parts.items()))
    sd15_elems = leaf_output_elements(SD15, 64)
    sdxl_elems = leaf_output_elements(SDXL, 128)
    ratio = sdxl_elems / sd15_elems
    print(
        f"leaf-module output elements per pair: SD-1.5 @64² {sd15_elems:,}, SDXL @128² {sdxl_elems:,} "
        f"(ratio {ratio:.2f})"
    )

    if args.no_measure:
        m, m3 = MEASURED, MEASURED_SD3
    else:
        m = {key: measure(*key) for key in MEASURED}
        m3 = {key: measure(*key) for key in MEASURED_SD3}

    def seconds(r: dict) -> str:
        return f", {r['seconds']:.0f} s" if "seconds" in r else ""

    for (latent, ckpt), r in m.items():
        print(
            f"SD-1.5 one pair @ {latent}×{latent} latents, bf16 autocast{', gradient checkpointing' if ckpt else ''}: "
            f"peak RSS growth {r['peak_growth'] / GiB:.2f} GiB, saved for backward {r['saved'] / GiB:.2f} GiB"
            + seconds(r)
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

    # SD3: a full-depth transformer does not fit in this machine's RAM (7.6 GiB weights + 7.6 GiB grads + ~20 GiB
    # of activations at 128²), so the blocks are counted: 2 and 4 of them at full width give one block's growth P
    # and the rest A (growth = A + L·P), at 64² and 128²; the 24-layer figure is A + 24·P at 128².
    for (latent, layers, ckpt, fp32_norms), r in m3.items():
        what = ", ".join(
            [f"{layers} of 24 blocks", "fp32 norms (CUDA autocast)" if fp32_norms else "bf16 norms (CPU autocast)"]
            + (["gradient checkpointing"] if ckpt else [])
        )
        print(
            f"SD3 one pair @ {latent}×{latent} latents ({(latent // 2) ** 2} + {SD3_TEXT_TOKENS} tokens), {what}: "
            f"peak RSS growth {r['peak_growth'] / GiB:.2f} GiB, saved for backward {r['saved'] / GiB:.2f} GiB"
            + seconds(r)
        )
    layers = SD3["num_layers"]
    block_p = (_numel(meta_sd3({**SD3, "num_layers": 4})) - _numel(meta_sd3({**SD3, "num_layers": 2}))) / 2
    fits = {latent: sd3_depth_fit(m3, latent) for latent in (64, 128)}
    s_tok = (fits[128][1] - fits[64][1]) / ((128 // 2) ** 2 - (64 // 2) ** 2)  # per block per image token
    c_block = fits[128][1] - s_tok * (128 // 2) ** 2
    act_sd3 = {latent: a + layers * per_layer for latent, (a, per_layer) in fits.items()}
    a_cpu, p_cpu = sd3_depth_fit(m3, SD3_LATENT, fp32_norms=False)
    a_ck, p_ck = sd3_depth_fit(m3, SD3_LATENT, ckpt=True)
    act_sd3_ckpt = a_ck + layers * p_ck
    print(
        f"SD3 per block (fp32 norms) = C + s·image tokens: C = {c_block / GiB:.3f} GiB (its bf16 weight copies "
        f"{2 * block_p / GiB:.3f} GiB + the {SD3_TEXT_TOKENS} text tokens' part), s·4096 = "
        f"{s_tok * 4096 / GiB:.3f} GiB; rest A @128² = {fits[128][0] / GiB:.2f} GiB; "
        f"with CPU autocast's bf16 norms a block is {p_cpu / GiB:.3f} GiB (×{fits[128][1] / p_cpu:.2f} for fp32)"
    )
    print(
        f"=> activations per pair: SD-1.5 @64² ≈ {act_sd15 / GiB:.2f} GiB (fit of two measured sizes); "
        f"SDXL @128² ≈ {act_sdxl / GiB:.2f} GiB (estimate: C × params ratio {sdxl_p / sd15_p:.2f} + s·64² × "
        f"leaf-output ratio {ratio:.2f}); SD3 @128² ≈ {act_sd3[128] / GiB:.2f} GiB (A + {layers}·P, measured blocks; "
        f"{(a_cpu + layers * p_cpu) / GiB:.2f} GiB with CPU autocast's bf16 norms; @64² {act_sd3[64] / GiB:.2f} GiB; "
        f"with gradient checkpointing @128² {act_sd3_ckpt / GiB:.2f} GiB)\n"
    )

    header = HEADER
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    acts = {"SD-1.5": act_sd15, "SDXL": act_sdxl, "SD3": act_sd3[128]}
    for row in rows(args.gpus, acts, args.lora_rank):
        print("| " + " | ".join(row) + " |")
    sd3_parts = frozen_parts("SD3")
    print(
        f"\nGiB per GPU; one pair per GPU per micro-step (activations scale with it); gradient checkpointing "
        f"measured at 32² cut the SD-1.5 peak growth to {ckpt_ratio:.0%} (it removes the area-proportional part; "
        "the constant bf16 weight copies stay, so the saving grows with resolution); SD3 with gradient "
        f"checkpointing: {act_sd3_ckpt / GiB:.2f} GiB of activations instead of {act_sd3[128] / GiB:.2f}. "
        "Not included: CUDA context and allocator slack "
        f"(~1-3 GiB), DDP's gradient buckets (a second gradient copy unless gradient_as_bucket_view), FSDP's "
        f"transient all-gathered unit. 'opponent for generation' = the gathered fp32 policy every rank holds after "
        f"training + text encoders/VAE (training state is freed by then); SD3: the VAE only, its text encoders "
        f"leave the GPU after the embeddings are cached. SD3 cache building (once, before training): T5-XXL "
        f"{2 * sd3_parts['T5-XXL'] / GiB:.2f} GiB in bf16, with CLIP-L, CLIP-G and the VAE "
        f"{2 * sum(sd3_parts.values()) / GiB:.2f} GiB (fp32: {4 * sum(sd3_parts.values()) / GiB:.2f} GiB), plus "
        f"the encoders' activations. ({time.perf_counter() - started:.0f} s)\n"
    )
    flux_main(args)
    for kind in _NEWER:
        newer_main(kind, args)


def flux_main(args: argparse.Namespace) -> None:
    """FLUX.1-dev: counts, the saved-bytes count at full size (fake tensors), the real runs, the rows."""
    started = time.perf_counter()
    net = meta_flux()
    p, lp = _numel(net), lora_params(net, args.lora_rank)
    targets = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(LORA_TARGETS)]
    print(
        f"FLUX transformer: {p:,} parameters; LoRA r={args.lora_rank} on {'/'.join(LORA_TARGETS)}: {lp:,} "
        f"({len(targets)} Linears: the double blocks' image-stream to_q/to_k/to_v/to_out.0, the single blocks' "
        "to_q/to_k/to_v)"
    )
    parts = frozen_parts("FLUX")
    print("FLUX frozen parts: " + ", ".join(f"{k} {v:,}" for k, v in parts.items()))
    fake = _saved_counts("flux")
    m = MEASURED_FLUX if args.no_measure else {key: measure(*key, flux=True) for key in MEASURED_FLUX}
    for key, r in m.items():
        img, txt, double, single, ckpt = key
        print(
            f"FLUX real run, one pair @ {img} + {txt} tokens, {double} double + {single} single blocks, fp32 norms"
            f"{', gradient checkpointing' if ckpt else ''}: "
            f"peak RSS growth {r['peak_growth'] / GiB:.3f} GiB, saved for backward {r['saved'] / GiB:.3f} GiB "
            f"(fake-tensor count: {fake[key]['saved'] / GiB:.3f} GiB)"
            + (f", {r['seconds']:.0f} s" if "seconds" in r else "")
        )
    # what peak RSS adds to the saved bytes (backward temporaries, allocator): measured on the small real runs only
    transient = max(r["peak_growth"] - r["saved"] for key, r in m.items() if not key[-1])
    full = (FLUX_IMAGE_TOKENS, FLUX_TEXT_TOKENS)
    g = {d: fake[(*full, *d, 0)]["saved"] for d in FLUX_DEPTHS}
    p_double, p_single = g[(1, 1)] - g[(0, 1)], g[(0, 2)] - g[(0, 1)]
    rest = g[(0, 1)] - p_single
    n_d, n_s = FLUX["num_layers"], FLUX["num_single_layers"]
    saved = fake[(*full, n_d, n_s, 0)]["saved"]
    ck = fake[(*full, n_d, n_s, 1)]
    act = saved + transient
    # checkpointing: what autograd keeps outside the blocks + the inputs each checkpointed block holds + the one block
    # being recomputed in backward (its saved bytes; a double block is the larger) + the same transient
    act_ck = ck["saved_or_held"] + max(p_double, p_single) + transient
    print(
        f"FLUX saved for backward @ {full[0]} + {full[1]} tokens (fake tensors, exact): a double block "
        f"{p_double / GiB:.3f} GiB, a single block {p_single / GiB:.3f} GiB, the rest {rest / GiB:.3f} GiB; "
        f"{n_d} + {n_s} blocks: {saved / GiB:.2f} GiB (A + {n_d}·D + {n_s}·S = "
        f"{(rest + n_d * p_double + n_s * p_single) / GiB:.2f}); peak RSS − saved on the real runs: up to "
        f"{transient / GiB:.3f} GiB"
    )
    print(
        f"FLUX gradient checkpointing @ {full[0]} + {full[1]} tokens: saved (outside the blocks; the checkpoints' "
        f"inputs among them) {ck['saved'] / GiB:.2f} GiB, block inputs {ck['held'] / GiB:.2f} GiB, together "
        f"{ck['saved_or_held'] / GiB:.2f} GiB; + one double block recomputed {p_double / GiB:.2f} GiB"
    )
    small = FLUX_MEASURED_TOKENS
    ck_small = (*small, 0, 2, 1)
    model_small = fake[ck_small]["saved_or_held"] + fake[(*small, 0, 2, 0)]["saved"] - fake[(*small, 0, 1, 0)]["saved"]
    print(
        f"check of that checkpointing rule on the real 0 + 2-block run @ {small[0]} + {small[1]} tokens: "
        f"{(model_small + transient) / GiB:.3f} GiB by the rule, {m[ck_small]['peak_growth'] / GiB:.3f} GiB measured"
    )
    print(
        f"=> FLUX activations per pair @1024² ({full[0]} + {full[1]} tokens): {act / GiB:.2f} GiB; with gradient "
        f"checkpointing {act_ck / GiB:.2f} GiB\n"
    )
    _print_rows(args, "FLUX", act, act_ck)
    print(
        f"\nGiB per GPU, one pair per GPU; FLUX like SD3: reference bf16 and whole, text encoders off the GPU after "
        f"caching (cache building: T5-XXL {2 * parts['T5-XXL'] / GiB:.2f} GiB in bf16, with CLIP-L and the VAE "
        f"{2 * sum(parts.values()) / GiB:.2f} GiB). ({time.perf_counter() - started:.0f} s)"
    )


def _print_rows(args: argparse.Namespace, model: str, act: float, act_ck: float) -> None:
    """The rows of `model` without and with gradient checkpointing (activations per pair `act`, `act_ck`)."""
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for label, a in (("", act), (" + grad. ckpt", act_ck)):
        for row in rows(args.gpus, {model: a}, args.lora_rank, models=(model,)):
            row[1] += label
            print("| " + " | ".join(row) + " |")


def _saved_counts(kind: str) -> dict:
    """saved_child(kind), run in a child process: {case tuple: its counts}."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    child = subprocess.run(
        [sys.executable, __file__, "--child-saved", kind], capture_output=True, text=True, env=env, check=True
    )
    return {tuple(map(int, k.split(","))): v for k, v in json.loads(child.stdout.strip().splitlines()[-1]).items()}


# the models counted like FLUX.1 but without real runs of their own: kind -> (the name in the rows, its meta
# transformer, the full depth in words, its text tokens); their fake cases are, in order, one block, two blocks, the
# full depth, the full depth checkpointed
_NEWER = {
    "zimage": ("Z-Image", meta_zimage, "2 + 2 refiners + 30 blocks", ZIMAGE_TEXT_TOKENS),
    "qwenimage": ("Qwen-Image", meta_qwenimage, "60 blocks", QWENIMAGE_TEXT_TOKENS),
    "flux2": ("FLUX.2 [klein]", meta_flux2, "5 double + 20 single blocks", FLUX2_TEXT_TOKENS),
}


def newer_main(kind: str, args: argparse.Namespace) -> None:
    """Z-Image-Turbo or Qwen-Image: exact counts, the saved-bytes count at full size (fake tensors), the rows. No
    real run of their blocks: the transient that peak RSS adds to the saved bytes is FLUX.1's, measured on its small
    real runs (the same kind of blocks: attention + MLP with adaLN modulation at a similar width)."""
    started = time.perf_counter()
    name, meta, depth, text_tokens = _NEWER[kind]
    net = meta()
    p, lp = _numel(net), lora_params(net, args.lora_rank)
    on = "/".join(t for t in lora_targets(net) if not t.startswith("single_transformer_blocks."))
    on += " + the single blocks' attn.to_out" if kind == "flux2" else ""
    print(f"{name} transformer: {p:,} parameters; LoRA r={args.lora_rank} on {on}: {lp:,}")
    parts = frozen_parts(name)
    print(f"{name} frozen parts: " + ", ".join(f"{k} {v:,}" for k, v in parts.items()))
    fake = _saved_counts(kind)
    one, two, full, full_ck = (fake[tuple(case)] for case in _SAVED[kind][1]())
    transient = max(r["peak_growth"] - r["saved"] for key, r in MEASURED_FLUX.items() if not key[-1])
    block = two["saved"] - one["saved"]
    act, act_ck = full["saved"] + transient, full_ck["saved_or_held"] + block + transient
    print(
        f"{name} saved for backward @ {FLUX_IMAGE_TOKENS} + {text_tokens} tokens (fake tensors, exact): a block "
        f"{block / GiB:.3f} GiB; {depth}: {full['saved'] / GiB:.2f} GiB; with gradient checkpointing: outside the "
        f"blocks and their inputs {full_ck['saved_or_held'] / GiB:.2f} GiB + one block recomputed; + FLUX's measured "
        f"transient {transient / GiB:.3f} GiB"
    )
    print(
        f"=> {name} activations per pair @1024² ({FLUX_IMAGE_TOKENS} + {text_tokens} tokens): {act / GiB:.2f} GiB; "
        f"with gradient checkpointing {act_ck / GiB:.2f} GiB\n"
    )
    _print_rows(args, name, act, act_ck)
    text = next(k for k in parts if k != "VAE")
    print(
        f"\nGiB per GPU, one pair per GPU; text encoder off the GPU after caching (cache building: {text} "
        f"{2 * parts[text] / GiB:.2f} GiB in bf16, with the VAE {2 * sum(parts.values()) / GiB:.2f} GiB). "
        f"({time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
