"""Model families (SD-1.x/2.x, SDXL, SD3/SD3.5, FLUX.1, Z-Image, FLUX.2 klein): conditioning, forward processes,
targets and the exact-objective inversion, checked by values; the sampler against the family's own diffusers
pipeline; and each family end to end through the CLI: 2 self-play iterations, export, reload with the plain diffusers
pipeline class, generate."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import _families
from spin_diffusion import encoding, export, families, models, presets, sampling
from spin_diffusion.cli import main
from spin_diffusion.data import sdxl_time_ids
from spin_diffusion.errors import SpinDiffusionError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def sdxl() -> models.Components:
    return presets.build_preset("tiny-sdxl")


@pytest.fixture(scope="module")
def sd3() -> models.Components:
    return presets.build_preset("tiny-sd3")


@pytest.fixture(scope="module")
def flux() -> models.Components:
    return presets.build_preset("tiny-flux")


@pytest.fixture(scope="module")
def sd35() -> models.Components:
    return presets.build_preset("tiny-sd35")


@pytest.fixture(scope="module")
def zimage() -> models.Components:
    return presets.build_preset("tiny-zimage")


@pytest.fixture(scope="module")
def qwenimage() -> models.Components:
    return presets.build_preset("tiny-qwenimage")


@pytest.fixture(scope="module")
def flux2() -> models.Components:
    return presets.build_preset("tiny-flux2")


# ---------------------------------------------------------------------------------------------------------------
# Forward processes and targets, by values


def test_ddpm_process_noises_and_targets_by_formula():
    tiny = presets.build_preset("tiny")
    for prediction in ("epsilon", "v_prediction"):
        process = families.make("sd", {**tiny.scheduler.config, "prediction_type": prediction}).process
        x0, eps = torch.full((2, 1, 1, 1), 0.5), torch.full((2, 1, 1, 1), -1.0)
        t = torch.tensor([10, 900])
        a = process.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        torch.testing.assert_close(process.noised(x0, eps, t), a.sqrt() * 0.5 - (1 - a).sqrt())
        want = eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        torch.testing.assert_close(process.target(x0, eps, t), want)
        assert torch.equal(process.model_timestep(t), t)
        # exact objective: a v-prediction maps to ε by ε = √ᾱ v + √(1-ᾱ) x_t
        x_t = process.noised(x0, eps, t)
        torch.testing.assert_close(process.exact_space(process.target(x0, eps, t), x_t, t), eps)


def test_flow_process_noises_and_targets_by_formula(sd3):
    process = sd3.family.process
    assert process.kind == "flow" and sd3.prediction_type == "flow"
    # SD3's shifted schedule: σ(u) = 3u / (1 + 2u) for u = i/1000, descending from σ = 1
    assert process.sigmas[0].item() == pytest.approx(1.0)
    u = 0.25
    assert process.sigmas[750].item() == pytest.approx(3 * u / (1 + 2 * u), abs=1e-6)
    x0 = torch.tensor([2.0, -1.0]).reshape(2, 1, 1, 1)
    eps = torch.tensor([0.5, 3.0]).reshape(2, 1, 1, 1)
    sigma = torch.tensor([0.25, 0.8])
    noised = process.noised(x0, eps, sigma).flatten()
    torch.testing.assert_close(noised, torch.tensor([0.75 * 2.0 + 0.25 * 0.5, 0.2 * -1.0 + 0.8 * 3.0]))
    torch.testing.assert_close(process.target(x0, eps, sigma).flatten(), torch.tensor([0.5 - 2.0, 3.0 + 1.0]))
    torch.testing.assert_close(process.model_timestep(sigma), torch.tensor([250.0, 800.0]))
    # σ is drawn from the logit-normal density: index ⌊sigmoid(N(0,1))·1000⌋ -> median index 500
    draws = process.draw_times(torch.Generator().manual_seed(0), 4000)
    assert ((draws > 0) & (draws <= 1)).all()
    assert draws.median().item() == pytest.approx(process.sigmas[500].item(), abs=0.02)
    a = process.draw_times(torch.Generator().manual_seed(3), 5)
    assert torch.equal(a, process.draw_times(torch.Generator().manual_seed(3), 5))


def test_implied_velocity_inverts_an_euler_step_by_values():
    x = torch.tensor([1.0, -2.0]).reshape(2, 1, 1, 1)
    v = torch.tensor([0.5, 4.0]).reshape(2, 1, 1, 1)
    sigma, sigma_next = torch.tensor([1.0, 0.6]), torch.tensor([0.75, 0.0])
    x_next = x + (sigma_next - sigma).reshape(2, 1, 1, 1) * v  # FlowMatchEulerDiscreteScheduler.step
    torch.testing.assert_close(sampling.implied_velocity(x, x_next, sigma, sigma_next), v)


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux", "tiny-flux2"])
def test_implied_velocity_is_the_velocity_prediction_along_a_real_trajectory(preset):
    """Without classifier-free guidance, (x_{i+1} - x_i)/(σ_{i+1} - σ_i) of a stored chain equals the transformer's
    output at x_i: the target of spin_exact on the opponent's samples (docs/FAMILIES.md). FLUX: on its own
    dynamically shifted σ, with the guidance embedding at 3.5, through the packing. FLUX.2: in its patchified,
    BN-normalised latents at the empirical μ."""
    c = presets.build_preset(preset)
    shape = (c.latent_channels, c.sample_size, c.sample_size)
    cond = encoding.encode(c, ["a red circle on the left", "a blue square"])
    flux = preset == "tiny-flux"
    out = sampling.sample(
        c.denoiser,
        c.family,
        cond,
        None,
        seeds=[1, 2],
        latent_shape=shape,
        num_steps=5,
        guidance_scale=3.5 if flux else 1.0,
        return_trajectory=True,
    )
    sched = sampling.make_scheduler("ddim", c.family)
    c.family.set_timesteps(sched, 5, shape)
    assert type(sched).__name__ == "FlowMatchEulerDiscreteScheduler"
    schedule = sampling.SamplerSchedule(out.timesteps, None, 0.0, 0.0, sched.sigmas.double())
    assert sampling.valid_exact_steps(schedule).tolist() == [0, 1, 2, 3, 4]
    for i in range(5):
        x_i, x_next = out.trajectory[:, i], out.trajectory[:, i + 1]
        implied = schedule.implied_target(x_i, x_next, torch.tensor([i, i]))
        with torch.no_grad():
            pred = c.family.predict(c.denoiser, x_i, out.timesteps[i], cond, guidance=3.5 if flux else None)
        torch.testing.assert_close(implied, pred, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Conditioning, by values


def test_sdxl_conditioning_is_both_penultimate_layers_and_the_second_pooled(sdxl):
    prompts = ["a red circle", "a green triangle at the top"]
    cond = encoding.encode(sdxl, prompts)
    tok = sdxl.tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        one = sdxl.text_encoder(tok.input_ids, output_hidden_states=True)
        two = sdxl.text_encoder_2(tok.input_ids, output_hidden_states=True)
    torch.testing.assert_close(cond.embeds, torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(cond.pooled, two.text_embeds)
    assert cond.embeds.shape == (2, 16, 16) and cond.pooled.shape == (2, 8)
    # the empty negative prompt is zeros, as StableDiffusionXLPipeline's force_zeros_for_empty_prompt
    negative = sdxl.family.negative(sdxl, "")
    assert not negative.embeds.any() and not negative.pooled.any()
    assert negative.embeds.shape == (1, 16, 16)
    assert sdxl.family.negative(sdxl, "blurry").embeds.any()


def test_sdxl_time_ids_record_original_size_and_crop():
    # a 40 (w) x 20 (h) image at 16 px: resized to 32 x 16, centre crop starts at x = 8
    assert sdxl_time_ids((40, 20), 16) == [20.0, 40.0, 0.0, 8.0, 16.0, 16.0]
    assert sdxl_time_ids((16, 16), 16) == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]
    fam = families.make("sdxl", presets.build_preset("tiny-sdxl").scheduler.config)
    assert fam.time_ids(2, 1024).tolist() == [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2


def test_sd3_conditioning_joins_clip_and_t5_as_the_pipeline_does(sd3):
    prompts = ["a red circle"]
    cond = encoding.encode(sd3, prompts)
    tok = sd3.tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        one = sd3.text_encoder(tok.input_ids, output_hidden_states=True)
        two = sd3.text_encoder_2(tok.input_ids, output_hidden_states=True)
        t5_tok = sd3.tokenizer_3(
            prompts,
            padding="max_length",
            max_length=families.SD3_MAX_SEQUENCE_LENGTH,
            truncation=True,
            return_tensors="pt",
        )
        t5 = sd3.text_encoder_3(t5_tok.input_ids)[0]
    clip = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)  # 8 + 8
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero-padded to T5's width
    torch.testing.assert_close(cond.embeds, torch.cat([clip, t5], dim=-2))
    torch.testing.assert_close(cond.pooled, torch.cat([one.text_embeds, two.text_embeds], dim=-1))


def test_family_is_told_by_the_pipeline_class(sdxl, sd3):
    assert presets.build_preset("tiny").family.name == "sd"
    assert sdxl.family.name == "sdxl" and sd3.family.name == "sd3"
    assert families.family_name("StableDiffusionXLPipeline", None) == "sdxl"
    assert families.family_name("MyPipeline", sd3.denoiser) == "sd3"
    assert families.family_name("MyPipeline", sdxl.denoiser) == "sdxl"
    assert families.family_name("ZImagePipeline", None) == "zimage"
    assert families.FAMILIES == ("sd", "sdxl", "sd3", "flux", "zimage", "qwenimage", "flux2")
    assert families.family_name("QwenImagePipeline", None) == "qwenimage"
    assert families.family_name("Flux2KleinPipeline", None) == "flux2"
    # a pipeline class no family names: the denoiser's class tells (every family's own tiny denoiser; FLUX.2's is
    # refused, test_flux2_dev_pipeline_is_refused_in_one_line), or one line
    for preset in [p for p in _families.ALL if p != "tiny-flux2"]:
        c = presets.build_preset(preset)
        assert families.family_name("MyPipeline", c.denoiser) == c.family.name
    with pytest.raises(SpinDiffusionError, match=r"^a MyPipeline with a Linear is not a model family .*UNet2DCond"):
        families.family_name("MyPipeline", torch.nn.Linear(2, 2))
    with pytest.raises(Exception, match="dpmsolver"):
        sampling.make_scheduler("dpmsolver++", sd3.family)


def test_zimage_conditioning_is_each_prompts_own_qwen3_tokens(zimage):
    """Z-Image's conditioning is ZImagePipeline.encode_prompt's: Qwen3's second-to-last hidden state over the chat
    template's tokens of each prompt, of their own lengths. A Cond keeps them padded to max_sequence_length with a
    mask that gives them back exactly, through indexing, concatenation, caption dropout's `where` and a bf16 cast."""
    prompts = ["a red circle", "a blue square on the left of a green triangle"]
    cond = encoding.encode(zimage, prompts)
    want, _ = zimage.family.pipeline(zimage).encode_prompt(list(prompts), do_classifier_free_guidance=False)
    assert cond.embeds.shape == (2, 512, 32) and cond.pooled is None
    assert [len(t) for t in want] == cond.mask.sum(1).tolist() and len(want[0]) < len(want[1])
    for got, expected in zip(cond.tokens(), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # the tokens are the chat template's: user turn, then the assistant's generation prompt
    text = zimage.tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    negative = zimage.family.negative(zimage, "")
    mixed = families.Cond.cat([cond, negative]).where(torch.tensor([False, True, False]), cond[:1])
    assert mixed.mask.sum(1).tolist() == [len(want[0])] * 2 + [int(negative.mask.sum())]
    torch.testing.assert_close(mixed.tokens()[1], want[0], rtol=0, atol=0)
    half = families.Cond.from_tensors(cond.to(torch.bfloat16).tensors())
    assert half.mask.dtype == torch.bfloat16 and [len(t) for t in half.tokens()] == [len(t) for t in want]


def test_qwenimage_conditioning_latents_and_sampler_are_qwenimage_pipelines(qwenimage):
    """Qwen-Image: the conditioning is QwenImagePipeline.encode_prompt's (Qwen2.5-VL's last hidden state over each
    prompt's own tokens, system template dropped); latents are its VAE's posterior mean normalised per channel; the
    sampler gives the pipeline's latents, guidance_scale being its true_cfg_scale with the negative prompt
    (`uncond + w (cond - uncond)` rescaled per packed token to the conditional norm)."""
    c = qwenimage
    prompts, seeds = ["a red circle", "a blue square on the left of a green triangle"], [3, 4]
    cond = encoding.encode(c, prompts)
    embeds, mask = c.family.pipeline(c).encode_prompt(list(prompts), max_sequence_length=1024)
    assert cond.embeds.shape == (2, 1024, 16) and cond.mask.sum(1).tolist() == mask.sum(1).tolist()
    for got, e, m in zip(cond.tokens(), embeds, mask, strict=True):
        torch.testing.assert_close(got, e[m.bool()], rtol=0, atol=0)
    # latents: (posterior mean - latents_mean) / latents_std, one frame of the causal VAE; and back
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = c.vae.encode(x.unsqueeze(2)).latent_dist.mean[:, :, 0]
    mean = torch.tensor(c.vae.config.latents_mean).view(1, 4, 1, 1)
    std = torch.tensor(c.vae.config.latents_std).view(1, 4, 1, 1)
    latents = encoding.encode_images(c, x)
    torch.testing.assert_close(latents, (posterior - mean) / std)
    with torch.no_grad():
        decoded = c.vae.decode((latents * std + mean).unsqueeze(2)).sample[:, :, 0]
    torch.testing.assert_close(encoding.decode_latents(c, latents), (decoded / 2 + 0.5).clamp(0, 1))
    assert (c.latent_channels, c.vae_scale_factor, c.resolution) == (4, 2, 16)
    # the sampler
    negative = c.family.negative(c, "")
    shape = (c.latent_channels, c.sample_size, c.sample_size)
    results = []
    for scale in (1.0, 4.0):
        ours = sampling.sample(
            c.denoiser, c.family, cond, negative, seeds=seeds, latent_shape=shape, num_steps=4, guidance_scale=scale
        ).latents
        call = sampling.pipeline_kwargs(c.family, scale, sampling.Guidance(), "")
        assert ("negative_prompt" in call) == (scale != 1.0) and call.get("true_cfg_scale", 4.0) == scale
        want = _pipeline_latents(c, prompts, seeds, steps=4, **call)
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
        results.append(ours)
    assert not torch.allclose(*results)  # guidance acted


def test_zimage_sampler_is_zimage_pipeline(zimage):
    """The opponent's sampler gives ZImagePipeline's latents: σ = linspace(1, 1/n, n) on shift 3, the transformer's
    time 1 - σ and its negated velocity, and guidance_scale g as `cond + g (cond - uncond)` (classifier-free
    guidance of scale 1 + g; none at g = 0, as Z-Image-Turbo samples)."""
    assert zimage.family.name == "zimage" and zimage.family.cfg_scale(0.0) == 1.0
    prompts, seeds = ["a red circle", "a blue square on the left"], [3, 4]
    cond, negative = encoding.encode(zimage, prompts), zimage.family.negative(zimage, "")
    shape = (zimage.latent_channels, zimage.sample_size, zimage.sample_size)
    results = []
    for scale in (0.0, 3.0):
        ours = sampling.sample(
            zimage.denoiser, zimage.family, cond, negative, seeds=seeds, latent_shape=shape, num_steps=4,
            guidance_scale=scale,
        ).latents  # fmt: skip
        call = sampling.pipeline_kwargs(zimage.family, scale, sampling.Guidance(), "")
        assert call == {"max_sequence_length": 512, "guidance_scale": scale}  # ZImagePipeline's default is 5.0
        want = _pipeline_latents(zimage, prompts, seeds, steps=4, **call)
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
        results.append(ours)
    assert not torch.allclose(*results)  # guidance acted
    # the network output is the velocity ε - x₀ the flow process trains on: the transformer's, negated
    x = torch.randn(2, *shape)
    with torch.no_grad():
        raw = zimage.denoiser(list(x.unsqueeze(2).unbind(0)), torch.tensor([0.25, 0.25]), cond.tokens()).sample
        pred = zimage.family.predict(zimage.denoiser, x, torch.tensor(750.0), cond)
    torch.testing.assert_close(pred, -torch.stack(raw).squeeze(2), rtol=0, atol=0)


def test_flux2_conditioning_is_the_pipelines_stacked_qwen3_layers(flux2):
    """FLUX.2 klein's conditioning is Flux2KleinPipeline.encode_prompt's: Qwen3's hidden states 9, 18 and 27 of each
    prompt's chat template (enable_thinking=False: an empty thinking block), padded to max_sequence_length (512),
    concatenated per token (3 x 16 = 48 dims). No pooled embedding and no mask: the transformer attends to the
    padding, as in the pipeline. The negative prompt is always the empty one."""
    prompts = ["a red circle", "a blue square on the left of a green triangle"]
    cond = encoding.encode(flux2, prompts)
    want, text_ids = flux2.family.pipeline(flux2).encode_prompt(list(prompts), max_sequence_length=512)
    assert cond.embeds.shape == (2, 512, 48) and cond.pooled is None and cond.mask is None
    torch.testing.assert_close(cond.embeds, want, rtol=0, atol=0)
    assert text_ids.shape == (2, 512, 4) and text_ids[0, 5].tolist() == [0, 0, 0, 5]  # (t, h, w, l)
    # by hand: the chat template, right-padded, through the 27-layer encoder
    text = flux2.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompts[0]}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    tok = flux2.tokenizer(text, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = flux2.text_encoder(**tok, output_hidden_states=True, use_cache=False).hidden_states
    assert len(hidden) == 28
    torch.testing.assert_close(cond.embeds[0], torch.cat([hidden[k][0] for k in (9, 18, 27)], dim=-1))
    negative = flux2.family.negative(flux2, "")
    torch.testing.assert_close(negative.embeds, flux2.family.pipeline(flux2).encode_prompt("")[0], rtol=0, atol=0)
    with pytest.raises(SpinDiffusionError, match="empty prompt"):
        flux2.family.negative(flux2, "blurry")


def _flux2_pipeline_latents(c, prompts, seeds, *, steps, **call):
    """Flux2KleinPipeline's final latents in its own sampling space (patchified, BN-normalised, before its decode
    step), read at its last step, from the noise `sampling.sample` starts from; and its output_type="latent"."""
    shape = (c.latent_channels, c.sample_size, c.sample_size)
    seen = {}

    def last(pipe, i, t, tensors):
        seen["latents"] = tensors["latents"]
        return tensors

    out = c.family.pipeline(c)(
        prompt=list(prompts),
        latents=sampling.initial_noise(seeds, shape),
        num_inference_steps=steps,
        height=c.resolution,
        width=c.resolution,
        output_type="latent",
        callback_on_step_end=last,
        **call,
    ).images
    packed = seen["latents"]  # [B, h·w, C], tokens in row-major order
    return packed.permute(0, 2, 1).reshape(len(seeds), *shape), out


def test_flux2_sampler_is_flux2_klein_pipeline(flux2):
    """The opponent's sampler gives Flux2KleinPipeline's latents: σ = linspace(1, 1/n, n) at the empirical μ of the
    token count and step count, the transformer on row-major tokens with 4-D ids, and classifier-free guidance with
    the empty prompt at guidance_scale when it is > 1 (none at <= 1). The pipeline's output_type="latent" is our
    latents through decode_latents (BN de-normalised, unpatchified). A step-distilled klein (is_distilled) never
    guides, whatever guidance_scale says."""
    prompts, seeds = ["a red circle", "a blue square on the left"], [3, 4]
    cond, negative = encoding.encode(flux2, prompts), flux2.family.negative(flux2, "")
    shape = (flux2.latent_channels, flux2.sample_size, flux2.sample_size)
    assert shape == (16, 4, 4) and flux2.family.cfg_scale(0.5) == 1.0 and flux2.family.cfg_scale(4.0) == 4.0
    results = []
    for scale in (1.0, 4.0):
        ours = sampling.sample(
            flux2.denoiser, flux2.family, cond, negative, seeds=seeds, latent_shape=shape, num_steps=4,
            guidance_scale=scale,
        ).latents  # fmt: skip
        call = sampling.pipeline_kwargs(flux2.family, scale, sampling.Guidance(), "")
        assert call == {"max_sequence_length": 512, **({"guidance_scale": 1.0} if scale == 1.0 else {})}
        want, out = _flux2_pipeline_latents(flux2, prompts, seeds, steps=4, **call)
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
        bn_mean, bn_std = flux2.family._bn(flux2, ours)  # the pipeline's latent output: de-normalised, unpatchified
        raw = flux2.family.pipeline(flux2)._unpatchify_latents(ours * bn_std + bn_mean)
        torch.testing.assert_close(raw, out, rtol=1e-5, atol=1e-5)
        results.append(ours)
    assert not torch.allclose(*results)  # guidance acted
    # the schedule: the pipeline's, at μ = compute_empirical_mu(16 tokens, 4 steps)
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    sched = sampling.make_scheduler("ddim", flux2.family)
    flux2.family.set_timesteps(sched, 4, shape)
    mu = compute_empirical_mu(16, 4)
    base = torch.linspace(1, 0.25, 4, dtype=torch.float64)
    want_sigmas = math.exp(mu) / (math.exp(mu) + 1 / base - 1)
    torch.testing.assert_close(sched.sigmas[:4].double(), want_sigmas, rtol=1e-5, atol=1e-6)
    # step-distilled: no guidance in the pipeline, none in the sampler
    distilled = dataclasses.replace(flux2, pipeline_config={"is_distilled": True})
    assert distilled.family.is_distilled and distilled.family.cfg_scale(4.0) == 1.0
    ours = sampling.sample(
        flux2.denoiser, distilled.family, cond, negative, seeds=seeds, latent_shape=shape, num_steps=4,
        guidance_scale=4.0,
    ).latents  # fmt: skip
    want, _ = _flux2_pipeline_latents(distilled, prompts, seeds, steps=4, guidance_scale=4.0)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, results[0], rtol=0, atol=0)


def test_flux2_vae_latents_are_the_pipelines_patchified_batch_normalised_ones(flux2):
    """encode_images gives Flux2KleinPipeline._encode_vae_image's latents (the posterior mode, patchified 2x2,
    (x - BN running mean) / √(running var + eps)); decode_latents decodes as the pipeline's __call__ does. The tiny
    VAE's BN statistics are not 0 / 1, so the normalisation shows."""
    assert flux2.latent_channels == 16 and flux2.vae_scale_factor == 4 and flux2.resolution == 16
    bn = flux2.vae.bn
    assert bn.running_mean.abs().max() > 0.01 and (bn.running_var - 1).abs().max() > 0.01
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = encoding.encode_images(flux2, x)
    pipe = flux2.family.pipeline(flux2)
    with torch.no_grad():
        want = pipe._encode_vae_image(x, generator=None)
    assert latents.shape == (2, 16, 4, 4)
    torch.testing.assert_close(latents, want, rtol=0, atol=0)
    # decoding, as Flux2KleinPipeline.__call__ after its denoising loop
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + flux2.vae.config.batch_norm_eps)
    raw = pipe._unpatchify_latents(latents * std + bn.running_mean.view(1, -1, 1, 1))
    with torch.no_grad():
        image = flux2.vae.decode(raw, return_dict=False)[0]
    torch.testing.assert_close(encoding.decode_latents(flux2, latents), (image / 2 + 0.5).clamp(0, 1))


def test_flux2_trains_on_uniform_unshifted_sigma(flux2):
    """Training σ as diffusers' FLUX.2 klein script (weighting_scheme "none"): u ~ U(0, 1), σ = the scheduler's
    unshifted σ[⌊u·1000⌋] whatever the image size, the velocity ε - x₀ as target; the network takes σ·1000 and
    the transformer σ."""
    process = flux2.family.process
    draws = process.draw_times(torch.Generator().manual_seed(0), 4000, (16, 4, 4))
    assert torch.isin(draws, process.sigmas).all() and ((draws > 0) & (draws <= 1)).all()
    assert draws.mean().item() == pytest.approx(0.5, abs=0.02)
    assert (draws < 0.25).float().mean().item() == pytest.approx(0.25, abs=0.03)
    torch.testing.assert_close(process.sigmas[[0, 999]], torch.tensor([1.0, 0.001]))
    big = process.draw_times(torch.Generator().manual_seed(0), 4000, (16, 64, 64))
    assert torch.equal(draws, big)
    from diffusers import Flux2KleinPipeline

    x = torch.randn(2, 16, 4, 4)
    cond = encoding.encode(flux2, ["a red circle", "a blue square"])
    with torch.no_grad():
        pred = flux2.family.predict(flux2.denoiser, x, torch.tensor(250.0), cond)
        raw = flux2.denoiser(
            hidden_states=x.flatten(2).transpose(1, 2),
            timestep=torch.tensor([0.25, 0.25]),
            encoder_hidden_states=cond.embeds,
            txt_ids=Flux2KleinPipeline._prepare_text_ids(cond.embeds),
            img_ids=Flux2KleinPipeline._prepare_latent_ids(x),
        ).sample
    torch.testing.assert_close(pred, raw.transpose(1, 2).reshape(2, 16, 4, 4), rtol=0, atol=0)


def test_flux2_dev_pipeline_is_refused_in_one_line(flux2):
    """FLUX.2 [dev] (Flux2Pipeline) is not FLUX.2 klein: refused by its class, or by its transformer's class under
    a pipeline class no family names."""
    with pytest.raises(SpinDiffusionError, match=r"a Flux2Pipeline \(FLUX.2 \[dev\]\) is not supported"):
        families.family_name("Flux2Pipeline", flux2.denoiser)
    with pytest.raises(SpinDiffusionError, match="only the klein models"):
        families.family_name("MyPipeline", flux2.denoiser)


def test_flux_is_its_own_family_with_packed_latents(flux):
    assert flux.family.name == "flux" and families.family_name("MyPipeline", flux.denoiser) == "flux"
    assert flux.latent_channels == 4 and flux.denoiser.config.in_channels == 16  # 2x2-packed
    x = torch.randn(2, 4, 8, 6)
    packed = families.pack_latents(x)
    assert packed.shape == (2, 4 * 3, 16)
    # token (row 1, column 2) holds latent cells (2..3, 4..5), channel-major as FluxPipeline._pack_latents
    torch.testing.assert_close(packed[0, 1 * 3 + 2].reshape(4, 2, 2), x[0, :, 2:4, 4:6])
    assert torch.equal(families.unpack_latents(packed, 8, 6), x)
    ids = families.latent_image_ids(8, 6, "cpu", torch.float32)
    assert ids[1 * 3 + 2].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(Exception, match="dpmsolver"):
        sampling.make_scheduler("dpmsolver++", flux.family)


def test_dynamic_shift_follows_the_token_count(flux, sd35):
    """With use_dynamic_shifting, training σ are the scheduler's σ shifted at μ of the training resolution:
    σ' = e^μ / (e^μ + 1/σ - 1), μ linear in the image tokens ((h/2)·(w/2)) from base_shift at 256 tokens to
    max_shift at 4096: more tokens, more noise."""
    for c in (flux, sd35):
        process = c.family.process
        assert process.dynamic
        base = process.sigmas  # unshifted: (1000 … 1) / 1000
        torch.testing.assert_close(base[[0, 999]], torch.tensor([1.0, 0.001]))
        for side, tokens in ((8, 16), (128, 4096)):
            mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
            assert process.mu((4, side, side)) == pytest.approx(mu)
            want = math.exp(mu) / (math.exp(mu) + 1 / base.double() - 1)
            torch.testing.assert_close(process.training_sigmas((4, side, side)).double(), want, rtol=1e-5, atol=1e-6)
        low = process.draw_times(torch.Generator().manual_seed(0), 64, (4, 8, 8))
        high = process.draw_times(torch.Generator().manual_seed(0), 64, (4, 128, 128))
        assert (high > low).all()
    with pytest.raises(ValueError, match="latent shape"):
        flux.family.process.draw_times(torch.Generator(), 1)


def _pipeline_latents(c, prompts, seeds, *, steps, **call):
    """The family pipeline's final latents (unpacked) from the noise `sampling.sample` starts from."""
    shape = (c.latent_channels, c.sample_size, c.sample_size)
    x = sampling.initial_noise(seeds, shape)
    flux = c.family.name in ("flux", "qwenimage")  # packed 2×2 latents
    out = c.family.pipeline(c)(
        list(prompts),  # a copy: ZImagePipeline writes the chat template into the caller's list
        latents=families.pack_latents(x) if flux else x,
        num_inference_steps=steps,
        height=c.resolution,
        width=c.resolution,
        output_type="latent",
        **call,
    ).images
    return families.unpack_latents(out, *shape[1:]) if flux else out


def test_flux_sampler_is_flux_pipeline(flux):
    """The opponent's sampler gives FluxPipeline's latents: the guidance embedding at guidance_scale, σ =
    linspace(1, 1/n, n) shifted at the image's μ, and true CFG with the negative prompt when true_cfg_scale > 1."""
    prompts, seeds = ["a red circle", "a blue square on the left"], [3, 4]
    cond, negative = encoding.encode(flux, prompts), flux.family.negative(flux, "a dog")
    shape = (flux.latent_channels, flux.sample_size, flux.sample_size)
    for guidance in (sampling.Guidance(), sampling.Guidance(true_cfg_scale=3.0)):
        ours = sampling.sample(
            flux.denoiser, flux.family, cond, negative, seeds=seeds, latent_shape=shape, num_steps=4,
            guidance_scale=3.5, guidance=guidance,
        ).latents  # fmt: skip
        call = sampling.pipeline_kwargs(flux.family, 3.5, guidance, "a dog")
        assert call["max_sequence_length"] == 512 and call["guidance_scale"] == 3.5
        want = _pipeline_latents(flux, prompts, seeds, steps=4, **call)
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    # the embedding changes the prediction: a guidance value is conditioning
    other = sampling.sample(
        flux.denoiser, flux.family, cond, None, seeds=seeds, latent_shape=shape, num_steps=4, guidance_scale=1.0
    ).latents
    assert not torch.allclose(ours, other)


def test_sd35_sampler_is_sd3_pipeline_with_dynamic_shift_and_skip_layer_guidance(sd35):
    """SD3.5 (qk-norm, a dual-attention block) samples as StableDiffusion3Pipeline: μ from the token count with
    dynamic shifting, CFG, and skip-layer guidance on block 1 for the steps in (start, stop)."""
    assert sd35.denoiser.config.qk_norm == "rms_norm" and sd35.family.skip_layer_guidance
    prompts, seeds = ["a red circle", "a blue square on the left"], [5, 6]
    cond, negative = encoding.encode(sd35, prompts), sd35.family.negative(sd35, "")
    shape = (sd35.latent_channels, sd35.sample_size, sd35.sample_size)
    slg = sampling.Guidance(skip_layers=(1,), skip_layer_stop=0.5)
    results = []
    for guidance in (sampling.Guidance(), slg):
        ours = sampling.sample(
            sd35.denoiser, sd35.family, cond, negative, seeds=seeds, latent_shape=shape, num_steps=10,
            guidance_scale=4.0, guidance=guidance,
        ).latents  # fmt: skip
        call = sampling.pipeline_kwargs(sd35.family, 4.0, guidance, "")
        assert call["guidance_scale"] == 4.0  # not StableDiffusion3Pipeline's default (7.0)
        want = _pipeline_latents(sd35, prompts, seeds, steps=10, **call)
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)
        results.append(ours)
    assert not torch.allclose(*results)  # skip-layer guidance acted


def test_sd3_vae_latents_are_shifted_then_scaled(sd3):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = sd3.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(encoding.encode_images(sd3, x), (mean - 0.0609) * 1.5305)


# ---------------------------------------------------------------------------------------------------------------
# End to end: each family through the CLI, export, plain-diffusers reload


def _spin(run_dir: Path, *overrides: str) -> None:
    args = ["spin", "--config", str(TINY), "--run-dir", str(run_dir)]
    for o in ("eval.num_prompts=4", *overrides):
        args += ["--set", o]
    assert main(args) == 0


# FLUX runs with 32 T5 tokens (model.max_sequence_length): the card must say so, and the pipeline is called with it
_T5 = {"tiny-sd3": 77, "tiny-sd35": 77, "tiny-flux": 32, "tiny-zimage": 512, "tiny-qwenimage": 192, "tiny-flux2": 512}


@pytest.mark.heavy
@pytest.mark.parametrize(("preset", "pipeline_class"), list(_families.PIPELINES.items()))
@pytest.mark.parametrize("objective", ["spin_approx", "spin_exact"])
def test_family_runs_two_iterations_and_exports_a_plain_pipeline(tmp_path, preset, pipeline_class, objective):
    import diffusers

    run_dir = tmp_path / "run"
    _spin(run_dir, *_families.settings(preset), f"loss.objective={objective}")
    state = json.loads((run_dir / "state.json").read_text())
    assert {"train:1", "train:2", "eval:2"} <= set(state["completed"])
    log = [json.loads(line) for line in (run_dir / "iter_02" / "train" / "train_log.jsonl").open()]
    assert all(math.isfinite(r["loss"]) for r in log)
    model_dir = run_dir / "iter_02" / "model"
    assert json.loads((model_dir / "model_index.json").read_text())["_class_name"] == pipeline_class
    card = (model_dir / "README.md").read_text()
    assert (f"max_sequence_length={_T5.get(preset)}," in card) == (preset in _T5)
    assert ("guidance_scale=3.5," in card) == (preset == "tiny-flux")
    # configs/tiny.yaml's guidance, not the pipeline's default (Qwen-Image's is true CFG with the negative prompt)
    assert {"tiny-flux": True, "tiny-qwenimage": "true_cfg_scale=2.0," in card}.get(
        preset, "guidance_scale=2.0," in card
    )
    assert ("stable-diffusion-xl" in card) == (preset == "tiny-sdxl")
    assert ("Only the transformer was trained" in card) == (preset != "tiny-sdxl")
    pipe = getattr(diffusers, pipeline_class).from_pretrained(model_dir, local_files_only=True)
    auto = diffusers.DiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    assert type(auto).__name__ == pipeline_class
    kwargs = {"max_sequence_length": _T5[preset]} if preset in _T5 else {}
    if preset in ("tiny-flux", "tiny-zimage", "tiny-qwenimage", "tiny-flux2"):  # their pipelines' default: 1024 px
        kwargs |= {"height": 16, "width": 16}
        kwargs |= {"tiny-flux": {"guidance_scale": 3.5}, "tiny-qwenimage": {}}.get(preset, {"guidance_scale": 2.0})
    image = pipe(  # prompt= by name: Flux2KleinPipeline's first argument is an input image
        prompt="a red circle",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    ).images[0]
    assert image.shape == (16, 16, 3) and float(image.std()) > 0
    # the trained weights are the exported ones: they differ from the preset's
    base = presets.build_preset(preset).denoiser.state_dict()
    assert any(
        not torch.equal(base[k], v)
        for k, v in pipe.components["unet" if preset == "tiny-sdxl" else "transformer"].state_dict().items()
    )
    # spin-diffusion reads its own export back as the same family
    assert models.load_components(model_dir).family.name == presets.build_preset(preset).family.name


@pytest.mark.parametrize("preset", _families.ALL)
def test_family_lora_targets_adapt_every_block(preset):
    """The family's default LoRA targets reach every transformer/UNet block (FLUX.2's single blocks have no to_q: the
    four attention names alone adapted 1 of the tiny preset's 2 blocks, 5 of klein 4B's 25)."""
    from spin_diffusion import lora

    denoiser = presets.build_preset(preset).denoiser
    family = presets.build_preset(preset).family
    lora.add_lora(denoiser, rank=2, alpha=2.0, target_modules=family.lora_target_modules(denoiser))
    adapted = {name for name, m in denoiser.named_modules() if hasattr(m, "lora_A")}
    blocks = [
        f"{list_name}.{i}"
        for list_name, blocks in denoiser.named_children()
        if isinstance(blocks, torch.nn.ModuleList) and list_name.endswith(("blocks", "layers", "refiner"))
        for i in range(len(blocks))
    ]
    if hasattr(denoiser, "down_blocks"):  # a UNet: its attention lives in some down/mid/up blocks' transformers
        blocks = [n for n, m in denoiser.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks
    assert [b for b in blocks if not any(a.startswith(b + ".") for a in adapted)] == []
    if preset == "tiny-flux2":
        assert {n.split(".", 2)[-1] for n in adapted if n.startswith("single_transformer_blocks")} == {
            "attn.to_qkv_mlp_proj", "attn.to_out"
        }  # fmt: skip


@pytest.mark.parametrize("preset", _families.ALL)
def test_saved_lora_loads_every_trained_weight_into_the_familys_pipeline(tmp_path, preset):
    """lora.save_lora writes what the family's pipeline loads: after its load_lora_weights, every module the run
    adapted carries the trained A and B and alpha (FLUX.2's loader silently dropped the double blocks' attention
    adapters when they were saved in the UNet layout's renamed keys)."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    from spin_diffusion import lora

    c = presets.build_preset(preset)
    export.save_pipeline(c, tmp_path / "model")
    denoiser = models.frozen_copy(c.denoiser)
    lora.add_lora(denoiser, rank=2, alpha=4.0, target_modules=c.family.lora_target_modules(denoiser))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:  # a trained adapter's B is not zero
                p.copy_(torch.randn(p.shape, generator=generator))
    trained = get_peft_model_state_dict(denoiser)
    lora.save_lora(denoiser, tmp_path / "lora", c)

    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "model", local_files_only=True)
    pipe.load_lora_weights(tmp_path / "lora")
    loaded = getattr(pipe, "transformer", None) or pipe.unet
    (adapter,) = pipe.get_active_adapters()
    got = get_peft_model_state_dict(loaded, adapter_name=adapter)
    assert sorted(got) == sorted(trained)
    for key, value in trained.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    assert loaded.peft_config[adapter].lora_alpha == 4.0


@pytest.mark.heavy
@pytest.mark.parametrize("preset", [p for p in _families.PIPELINES if p != "tiny-sd35"])
def test_family_lora_sft_and_dpo(tmp_path, preset):
    import diffusers

    from spin_diffusion import world

    # LoRA self-play: the adapter loads into the family's pipeline with load_lora_weights
    _spin(tmp_path / "lora", *_families.settings(preset), "model.lora_rank=2", "num_iterations=1",
          "eval.enabled=false")  # fmt: skip
    lora_dir = tmp_path / "lora" / "iter_01" / "lora"
    model_dir = tmp_path / "lora" / "iter_01" / "model"
    pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.load_lora_weights(lora_dir)
    assert pipe.get_active_adapters()  # every weight: test_saved_lora_loads_every_trained_weight_into_the_…
    # SFT
    assert main(["sft", "--config", str(TINY), "--run-dir", str(tmp_path / "sft"),
                 "--set", f"model.preset={preset}", "--set", "eval.enabled=false"]) == 0  # fmt: skip
    assert (tmp_path / "sft" / "iter_01" / "model" / "model_index.json").exists()
    # Diffusion-DPO on (winner, loser) pairs of different sizes: SDXL records each image's own time ids
    root = tmp_path / "pairs"
    root.mkdir()
    rows = []
    for i, (img, caption) in enumerate(world.make_examples(8, seed=0)):
        img.resize((48, 32)).save(root / f"w{i}.png")
        img.convert("L").convert("RGB").save(root / f"l{i}.png")
        rows.append({"winner": f"w{i}.png", "loser": f"l{i}.png", "text": caption})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["dpo", "--config", str(TINY), "--run-dir", str(tmp_path / "dpo"),
                 "--set", f"model.preset={preset}", "--set", "data.builtin=null", "--set", f"data.path={root}",
                 "--set", "eval.enabled=false"]) == 0  # fmt: skip
    log = [json.loads(line) for line in (tmp_path / "dpo" / "iter_01" / "train" / "train_log.jsonl").open()]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at the first step
    if preset == "tiny-sdxl":
        from spin_diffusion.cache import RowStore

        shards = sorted((tmp_path / "dpo" / "cache" / "pairs").glob("pairs-images-*.safetensors"))
        ids = RowStore.open(shards, "winner_latents_time_ids")[:]
        # a 48 x 32 winner is resized to 24 x 16 and cropped at x = 4; the 32 x 32 loser is only resized
        assert ids[0].tolist() == [32.0, 48.0, 0.0, 4.0, 16.0, 16.0]
        loser_ids = RowStore.open(shards, "loser_latents_time_ids")[:]
        assert loser_ids[0].tolist() == [32.0, 32.0, 0.0, 0.0, 16.0, 16.0]


@pytest.mark.heavy
def test_sd2_v_prediction_model_runs_end_to_end(tmp_path):
    """An SD-2.x-style model (v-prediction, as stabilityai/stable-diffusion-2-1) from a local folder: 2 iterations,
    export, plain StableDiffusionPipeline reload and generation."""
    import diffusers

    c = presets.build_preset("tiny")
    c.scheduler = diffusers.DDIMScheduler.from_config(c.scheduler.config, prediction_type="v_prediction")
    export.save_pipeline(c, tmp_path / "sd2")
    run_dir = tmp_path / "run"
    _spin(run_dir, f"model.path={tmp_path / 'sd2'}")
    model_dir = run_dir / "iter_02" / "model"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (16, 16, 3)
    assert models.load_components(model_dir).prediction_type == "v_prediction"


def test_fp16_sdxl_vae_is_upcast_unless_it_says_otherwise(tmp_path, sdxl):
    """An fp16 load keeps an SDXL VAE with force_upcast (its default) in fp32, as diffusers' pipelines decode and its
    training scripts encode; the fp16-fix VAE (force_upcast=False) stays fp16."""
    export.save_pipeline(sdxl, tmp_path / "xl")
    c = models.load_components(tmp_path / "xl", dtype=torch.float16)
    assert c.denoiser.dtype == torch.float16 and c.vae.dtype == torch.float32
    config = tmp_path / "xl" / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "force_upcast": False}))
    assert models.load_components(tmp_path / "xl", dtype=torch.float16).vae.dtype == torch.float16
