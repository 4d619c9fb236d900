"""Tiny and demo models built from configs alone (no download): the "tiny" presets of the tests (SD, SDXL and SD3
families at diffusers' get_dummy_components sizes) and the CPU demo's ~1 M-parameter model, with the tokenizer
shipped in ``spin_diffusion/assets/tokenizer``."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import torch

from spin_diffusion.config import Preset
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.models import Components, check_compatible, freeze

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"  # vocab.json + merges.txt (make_tokenizer.py)
PRESETS: tuple[str, ...] = typing.get_args(Preset)

# UNet / text encoder / VAE sizes. "tiny" copies diffusers' get_dummy_components sizes (tests);
# "demo" is the CPU demo world: 32x32 RGB images, 16x16x4 latents, ~1 M-parameter UNet.
_PRESET_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": dict(
            sample_size=8,
            block_out_channels=(4, 8),
            layers_per_block=1,
            norm_num_groups=2,
            cross_attention_dim=8,
            attention_head_dim=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        "text": dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2),
        "vae": dict(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2),
        "scheduler": dict(beta_schedule="scaled_linear"),
    },
    "demo": {
        # Three levels (16, 8, 4): the 4x4 level sees the latent's borders everywhere, which is where a conv
        # UNet gets its sense of position from; with two levels "on the left" stayed at chance after 500 steps.
        "unet": dict(
            sample_size=16,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            norm_num_groups=32,
            cross_attention_dim=32,
            attention_head_dim=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        # (8, 16) without mid-block attention: fits the shapes world in ~200 steps (reconstructions are judged
        # 100 % correct) at about half the cost per step of (16, 32).
        "vae": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False),
        "scheduler": dict(beta_schedule="scaled_linear"),
    },
}


def _load_shipped_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    # Positional paths: the parameter names differ between transformers 4 (vocab_file) and 5 (vocab).
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=16)


DEMO_VAE_DIR = Path(__file__).parent / "assets" / "demo_vae"  # made by scripts/train_demo_vae.py


def build_preset(
    name: Preset,
    *,
    seed: int = 0,
    pretrained_vae: bool = True,
) -> Components:
    """Build a randomly initialised built-in model from configs (no download, no files).

    - ``"tiny-sdxl"``, ``"tiny-sd3"``, ``"tiny-sd35"``, ``"tiny-flux"``: for tests, the SDXL, SD3, SD3.5 and FLUX.1
      families at the ``"tiny"`` sizes (:func:`_build_family_preset`); ``"tiny-zimage"``, ``"tiny-qwenimage"``,
      ``"tiny-flux2"``: Z-Image, Qwen-Image and FLUX.2 [klein] (:func:`_build_tiny_zimage`,
      :func:`_build_tiny_qwenimage`, :func:`_build_tiny_flux2`).

    - ``"tiny"``: for tests. UNet (4, 8) channels, 8x8x4 latents, 16x16 images, 8-dim text encoder.
    - ``"demo"``: the CPU demo world. UNet (32, 64, 64) channels, ~1.7 M parameters, 16x16x4 latents,
      32x32 images; CLIP text encoder with 32-dim hidden states, 2 layers; VAE (8, 16) channels.

    Both use the shipped 16-token CLIP BPE tokenizer and a DDIM scheduler (SD-1.x betas:
    ``scaled_linear`` 0.00085..0.012 over 1000 steps, epsilon prediction, ``steps_offset=1``). The
    ``"demo"`` VAE is the shipped one, fitted to the shapes world with a calibrated ``scaling_factor``
    (``pretrained_vae=False`` gives a random one, as ``"tiny"`` always has, with ``scaling_factor=1.0``).

    The same ``seed`` gives bit-identical weights. The global torch RNG is left untouched.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if name in ("tiny-sdxl", "tiny-sd3", "tiny-sd35", "tiny-flux"):
        return _build_family_preset(name, seed)
    if name == "tiny-zimage":
        return _build_tiny_zimage(seed)
    if name == "tiny-qwenimage":
        return _build_tiny_qwenimage(seed)
    if name == "tiny-flux2":
        return _build_tiny_flux2(seed)
    if name not in _PRESET_CONFIGS:
        raise SpinDiffusionError(f"unknown model preset {name!r} (choose one of: {', '.join(PRESETS)})")
    cfg = _PRESET_CONFIGS[name]
    tokenizer = _load_shipped_tokenizer()
    latent_channels = 4
    vae_factor = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            in_channels=latent_channels,
            out_channels=latent_channels,
            **cfg["unet"],
        )
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **cfg["text"],
        )
        text_encoder = CLIPTextModel(text_config)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(cfg["vae"]["block_out_channels"]),
            up_block_types=("UpDecoderBlock2D",) * len(cfg["vae"]["block_out_channels"]),
            latent_channels=latent_channels,
            sample_size=cfg["unet"]["sample_size"] * vae_factor,
            scaling_factor=1.0,
            **cfg["vae"],
        )
    if name == "demo" and pretrained_vae and (DEMO_VAE_DIR / "config.json").exists():
        # The demo world's VAE is shipped, trained and checked (scripts/train_demo_vae.py); the UNet is random.
        vae = AutoencoderKL.from_pretrained(DEMO_VAE_DIR, local_files_only=True)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="epsilon",
        **cfg["scheduler"],
    )
    unet.eval()
    c = Components(unet, freeze(text_encoder), tokenizer, scheduler, freeze(vae), "StableDiffusionPipeline", None)
    check_compatible(c)
    return c


def _tiny_t5_tokenizer() -> Any:
    """A T5 tokenizer built offline (a Unigram model over letters and a few word pieces), for ``tiny-sd3``,
    ``tiny-sd35`` and ``tiny-flux``."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + list(string.ascii_lowercase + string.digits + ",.-'")
    pieces += ["\u2581" + ch for ch in string.ascii_lowercase]
    vocab = [(p, 0.0 if i < 3 else -float(len(p) == 1)) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0, model_max_length=77
    )


def _build_family_preset(name: str, seed: int) -> Components:
    """``tiny-sdxl``: UNet (4, 8) with SDXL's text-time embedding (pooled 8 + 6 time ids x 4), CLIP (8-dim) +
    CLIP with projection (8-dim, pooled 8), concatenated cross-attention 16, SDXL's Euler scheduler config.
    ``tiny-sd3``: SD3Transformer2DModel (2 layers, patch 2), CLIP-L + CLIP-G with projections (pooled 8 + 8),
    a T5 encoder (32-dim) with an offline tokenizer, FlowMatchEulerDiscreteScheduler (shift 3, as SD3), a VAE with
    SD3's scaling and shift factors.
    ``tiny-sd35``: as ``tiny-sd3`` with SD3.5's transformer features: qk-norm (RMSNorm) and, as SD3.5 medium, a
    dual-attention first block; its scheduler uses resolution-dependent (dynamic) shifting to exercise that path.
    ``tiny-flux``: FluxTransformer2DModel (1 double + 1 single block, guidance embedding as FLUX.1-dev) on 2×2-packed
    latents, CLIP (pooled 32) + T5 (32-dim), FLUX.1-dev's scheduler config (dynamic shifting 0.5..1.15), a VAE
    without quant convs and FLUX's scaling and shift factors; its config records ``sample_size=8`` (FLUX
    transformers have none; real ones use the pipeline's 128), so the native size is 16 px as for the others.
    All: 8x8x4 latents, 16x16 images; same seed, same weights."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer = _load_shipped_tokenizer()
    tiny = _PRESET_CONFIGS["tiny"]

    def clip_config(projection: int = 8) -> Any:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=projection,
            **tiny["text"],
        )

    extra: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "tiny-sdxl":
            denoiser = UNet2DConditionModel(
                in_channels=4,
                out_channels=4,
                **{**tiny["unet"], "cross_attention_dim": 16},
                addition_embed_type="text_time",
                addition_time_embed_dim=4,
                projection_class_embeddings_input_dim=8 + 6 * 4,
            )
            text_encoder = CLIPTextModel(clip_config())
            extra = dict(text_encoder_2=freeze(CLIPTextModelWithProjection(clip_config())), tokenizer_2=tokenizer)
            vae_extra: dict[str, Any] = {"scaling_factor": 0.13025}
            scheduler: Any = EulerDiscreteScheduler(
                num_train_timesteps=1000,
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                steps_offset=1,
                timestep_spacing="leading",
                prediction_type="epsilon",
            )
            pipeline_class = "StableDiffusionXLPipeline"
        elif name == "tiny-flux":
            denoiser = FluxTransformer2DModel(
                patch_size=1,
                in_channels=16,  # 4 latent channels, 2x2-packed
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                axes_dims_rope=(4, 4, 8),
                guidance_embeds=True,
            )
            denoiser.register_to_config(sample_size=8)
            text_encoder = CLIPTextModel(CLIPTextConfig(**{**clip_config().to_dict(), "hidden_size": 32}))
            tokenizer_2 = _tiny_t5_tokenizer()
            t5 = T5EncoderModel(
                T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
            )
            extra = dict(text_encoder_2=freeze(t5), tokenizer_2=tokenizer_2)
            vae_extra = {
                "scaling_factor": 0.3611,
                "shift_factor": 0.1159,
                "use_quant_conv": False,
                "use_post_quant_conv": False,
            }
            scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000,
                shift=3.0,
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=256,
                max_image_seq_len=4096,
            )
            pipeline_class = "FluxPipeline"
        else:
            sd35 = name == "tiny-sd35"
            denoiser = SD3Transformer2DModel(
                sample_size=8,
                patch_size=2,
                in_channels=4,
                out_channels=4,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=2,
                joint_attention_dim=32,
                caption_projection_dim=16,
                pooled_projection_dim=16,
                pos_embed_max_size=16,
                **(dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {}),
            )
            text_encoder = CLIPTextModelWithProjection(clip_config())
            tokenizer_3 = _tiny_t5_tokenizer()
            t5 = T5EncoderModel(
                T5Config(vocab_size=len(tokenizer_3), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
            )
            extra = dict(
                text_encoder_2=freeze(CLIPTextModelWithProjection(clip_config())),
                tokenizer_2=tokenizer,
                text_encoder_3=freeze(t5),
                tokenizer_3=tokenizer_3,
            )
            vae_extra = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
            dynamic = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15) if sd35 else {}
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, **dynamic)
            pipeline_class = "StableDiffusion3Pipeline"
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            sample_size=16,
            **tiny["vae"],
            **vae_extra,
        )
    denoiser.eval()
    c = Components(denoiser, freeze(text_encoder), tokenizer, scheduler, freeze(vae), pipeline_class, None, **extra)
    check_compatible(c)
    return c


# Qwen3's chat template, reduced to what the pipelines use: user turns, the generation prompt, and the empty
# "thinking" block that `enable_thinking=False` adds (FLUX.2 klein); Z-Image passes enable_thinking=True.
_QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def _tiny_qwen3_tokenizer() -> Any:
    """A tokenizer built offline for a tiny Qwen3 text encoder (``tiny-zimage``): a Unigram model over letters and a
    few word pieces, Qwen's special tokens, right padding with ``<|endoftext|>`` and Qwen3's chat template."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    pieces = ["<unk>", "\u2581", "\n"] + list(string.ascii_lowercase + string.digits + ",.-'")
    pieces += ["\u2581" + ch for ch in string.ascii_lowercase]
    tok = Tokenizer(models.Unigram([(p, 0.0 if i == 0 else -float(len(p) == 1)) for i, p in enumerate(pieces)], 0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        padding_side="right",
        model_max_length=512,
        chat_template=_QWEN3_CHAT_TEMPLATE,
    )


def _tiny_qwen3(tokenizer: Any, *, layers: int = 2, hidden: int = 32, causal_lm: bool = False) -> Any:
    """A Qwen3 encoder for ``tokenizer``: 2 layers of 32-dim hidden states unless told (``Qwen3Model``, or
    ``Qwen3ForCausalLM`` with ``causal_lm`` as FLUX.2 klein's pipeline names it)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=hidden // 2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen3ForCausalLM(config) if causal_lm else Qwen3Model(config)


def _build_tiny_zimage(seed: int) -> Components:
    """``tiny-zimage``: ZImageTransformer2DModel (1 refiner + 1 main layer, 32-dim, patch 2, 4 latent channels) on a
    2-layer Qwen3 encoder (32-dim; the pipeline reads its second-to-last hidden state), FLUX.1's VAE layout with its
    scaling and shift factors, and Z-Image-Turbo's scheduler config (shift 3, no dynamic shifting). Its config
    records ``sample_size=8`` (Z-Image transformers have none; the pipeline's default is 1024 px), so the native size
    is 16 px as for the other tiny presets. Same seed, same weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

    tiny = _PRESET_CONFIGS["tiny"]
    tokenizer = _tiny_qwen3_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=4,
            dim=32,
            n_layers=1,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=32,
            axes_dims=[4, 6, 6],
            axes_lens=[512, 32, 32],
        )
        denoiser.register_to_config(sample_size=8)
        text_encoder = _tiny_qwen3(tokenizer)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            sample_size=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            **tiny["vae"],
        )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    denoiser.eval()
    c = Components(denoiser, freeze(text_encoder), tokenizer, scheduler, freeze(vae), "ZImagePipeline", None)
    check_compatible(c)
    return c


def _build_tiny_qwenimage(seed: int) -> Components:
    """``tiny-qwenimage``: QwenImageTransformer2DModel (2 blocks, 2×2-packed 4-channel latents) on a 2-layer
    Qwen2.5-VL (16-dim; the pipeline reads its last hidden state; its vision tower is built but unused) with the
    offline Qwen tokenizer, Qwen-Image's causal VAE (4 latent channels, one 2× downsampling, per-channel latent mean
    and std) and Qwen-Image's scheduler config (dynamic shifting 0.5..0.9 over 256..8192 tokens, exponential time
    shift, terminal σ 0.02). The transformer's config records ``sample_size=8`` (the pipeline's default is 1024 px),
    so the native size is 16 px as for the other tiny presets. Sizes follow diffusers' own QwenImagePipeline test.
    Same seed, same weights."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _tiny_qwen3_tokenizer()
    vocab = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=16,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
        )
        denoiser.register_to_config(sample_size=8)
        config = Qwen2_5_VLConfig(
            text_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                "rope_theta": 1000000.0,
                "vocab_size": vocab + 3,
                "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": None,
                "eos_token_id": tokenizer.eos_token_id,
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": 16,
            },
            hidden_size=16,
            vocab_size=vocab + 3,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            vision_start_token_id=vocab,
            vision_end_token_id=vocab + 1,
            vision_token_id=vocab + 2,
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
        vae = AutoencoderKLQwenImage(
            base_dim=24,
            z_dim=4,
            dim_mult=[1, 2],
            num_res_blocks=1,
            temperal_downsample=[False],
            latents_mean=[0.1, -0.2, 0.05, 0.0],
            latents_std=[1.5, 0.8, 1.2, 2.0],
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    denoiser.eval()
    c = Components(denoiser, freeze(text_encoder), tokenizer, scheduler, freeze(vae), "QwenImagePipeline", None)
    check_compatible(c)
    return c


def _build_tiny_flux2(seed: int) -> Components:
    """``tiny-flux2``: FLUX.2 [klein] (base, not step-distilled) at the tiny sizes. Flux2Transformer2DModel (1 double
    + 1 single block, 2 heads of 16, 4-axis RoPE, no guidance embedding as klein) on 16 channels: an
    AutoencoderKLFlux2 (4 latent channels, 8x8 latents of 16 px images) patchified 2x2 by the pipeline, 4x4 tokens.
    Its BatchNorm running mean and variance are seeded random numbers (a fresh VAE's 0 and 1 would hide the
    normalisation). The text encoder is a 27-layer Qwen3ForCausalLM (16-dim hidden states): the pipeline stacks
    hidden states 9, 18 and 27 by default, so the transformer takes 48-dim text; tokenizer with Qwen3's chat template.
    Scheduler: FLUX.2's FlowMatchEulerDiscreteScheduler config (dynamic shifting; the pipeline computes μ itself).
    Its config records ``sample_size=4`` (latent cells after the patchify; FLUX.2 transformers have none), so the
    native size is 16 px as for the other tiny presets. Same seed, same weights."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    tiny = _PRESET_CONFIGS["tiny"]
    tokenizer = _tiny_qwen3_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 VAE channels, 2x2-patchified
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=48,  # 3 stacked 16-dim Qwen3 hidden states
            timestep_guidance_channels=256,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=False,
        )
        denoiser.register_to_config(sample_size=4)
        text_encoder = _tiny_qwen3(tokenizer, layers=27, hidden=16, causal_lm=True)
        vae = AutoencoderKLFlux2(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            sample_size=16,
            **tiny["vae"],
        )
        vae.bn.running_mean.copy_(torch.randn(16) * 0.1)
        vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    denoiser.eval()
    c = Components(
        denoiser,
        freeze(text_encoder),
        tokenizer,
        scheduler,
        freeze(vae),
        "Flux2KleinPipeline",
        None,
        pipeline_config={"is_distilled": False},
    )
    check_compatible(c)
    return c
