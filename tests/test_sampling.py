"""sampling.py: seeds, determinism, batch-size invariance, trajectories, implied noise, sharded generation.

Everything runs the randomly initialised tiny preset (8x8x4 latents) on the CPU with random prompt embeddings.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spin_diffusion import (  # noqa: E402
    families,
    sampling,
)
from spin_diffusion.errors import SpinDiffusionError  # noqa: E402

LATENT_SHAPE = (4, 8, 8)
SEQ_LEN, EMBED_DIM = 16, 8  # tiny tokenizer model_max_length, tiny UNet cross_attention_dim


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sched_cfg(tiny) -> dict:
    return {k: v for k, v in tiny.scheduler.config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def embeds() -> tuple[torch.Tensor, torch.Tensor]:
    """Six random prompt embeddings [6, L, D] and one unconditional embedding [1, L, D]."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, SEQ_LEN, EMBED_DIM, generator=g), torch.randn(1, SEQ_LEN, EMBED_DIM, generator=g)


def _seeds(n: int, *, run_seed: int = 0, iteration: int = 0, start: int = 0) -> list[int]:
    return [sampling.sample_seed(run_seed, iteration, i) for i in range(start, start + n)]


def _sample(tiny, cfg, cond, neg, seeds, **kw):
    kw = {"num_steps": 4, "guidance_scale": 1.0, **kw}
    return sampling.sample(
        tiny.denoiser, families.make("sd", cfg), cond, neg, seeds=seeds, latent_shape=LATENT_SHAPE, **kw
    )


# ------------------------------------------------------------------ sample_seed


def test_sample_seed_is_deterministic_and_in_range():
    assert sampling.sample_seed(7, 2, 31) == sampling.sample_seed(7, 2, 31)
    for args in [(0, 0, 0), (1, 2, 3), (2**31, 7, 10**6), (123456789, 0, 99)]:
        s = sampling.sample_seed(*args)
        assert isinstance(s, int)
        assert 0 <= s < 2**63
    torch.Generator().manual_seed(sampling.sample_seed(1, 2, 3))  # a valid torch seed


def test_sample_seed_differs_across_run_seed_iteration_and_prompt_index():
    grid = [(r, k, i) for r in range(3) for k in range(3) for i in range(100)]
    seeds = {sampling.sample_seed(*args) for args in grid}
    assert len(seeds) == len(grid)
    # The arguments are not interchangeable.
    assert sampling.sample_seed(0, 1, 2) != sampling.sample_seed(0, 2, 1)
    assert sampling.sample_seed(1, 0, 2) != sampling.sample_seed(2, 0, 1)


# ------------------------------------------------------------------ sample()


def test_same_seeds_give_bit_identical_latents(tiny, sched_cfg, embeds):
    cond, neg = embeds
    a = _sample(tiny, sched_cfg, cond, neg, _seeds(6), guidance_scale=3.0, eta=0.5, return_trajectory=True)
    b = _sample(tiny, sched_cfg, cond, neg, _seeds(6), guidance_scale=3.0, eta=0.5, return_trajectory=True)
    assert torch.equal(a.latents, b.latents)
    assert torch.equal(a.trajectory, b.trajectory)
    assert torch.equal(a.timesteps, b.timesteps)


def test_different_prompt_index_seeds_give_different_latents(tiny, sched_cfg, embeds):
    cond = embeds[0][:1].expand(4, -1, -1)  # one prompt four times: only the seeds differ
    out = _sample(tiny, sched_cfg, cond, None, _seeds(4)).latents
    assert torch.isfinite(out).all()
    for i in range(4):
        for j in range(i + 1, 4):
            assert (out[i] - out[j]).abs().max() > 0.1, (i, j)
    # Another run seed (or iteration) changes the samples of the same prompt indices, too.
    other_run = _sample(tiny, sched_cfg, cond, None, _seeds(4, run_seed=1)).latents
    other_iter = _sample(tiny, sched_cfg, cond, None, _seeds(4, iteration=1)).latents
    assert (other_run - out).flatten(1).abs().amax(1).min() > 0.1
    assert (other_iter - out).flatten(1).abs().amax(1).min() > 0.1


@pytest.mark.parametrize(("guidance_scale", "eta"), [(3.0, 0.0), (1.0, 0.5), (3.0, 0.5)])
def test_batch_size_invariance(tiny, sched_cfg, embeds, guidance_scale, eta):
    """6 prompts in one batch == batches of 2 == batches of 1 + 5: sample i depends on seeds[i] only."""
    cond, neg = embeds
    seeds = _seeds(6)
    kw = {"guidance_scale": guidance_scale, "eta": eta, "return_trajectory": True}
    full = _sample(tiny, sched_cfg, cond, neg, seeds, **kw)
    for splits in ([(0, 2), (2, 4), (4, 6)], [(0, 1), (1, 6)]):
        parts = [_sample(tiny, sched_cfg, cond[lo:hi], neg, seeds[lo:hi], **kw) for lo, hi in splits]
        torch.testing.assert_close(torch.cat([p.latents for p in parts]), full.latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat([p.trajectory for p in parts]), full.trajectory, atol=1e-5, rtol=1e-5)
    # The setting matters: guidance and eta really change the samples (so the invariance is not vacuous).
    plain = _sample(tiny, sched_cfg, cond, neg, seeds)
    assert (plain.latents - full.latents).abs().max() > 1e-2


def test_trajectory_shape_and_endpoints(tiny, sched_cfg, embeds):
    cond, neg = embeds
    seeds = _seeds(3, start=10)
    out = _sample(tiny, sched_cfg, cond[:3], neg, seeds, num_steps=5, guidance_scale=2.0, return_trajectory=True)
    assert out.latents.shape == (3, *LATENT_SHAPE)
    assert out.trajectory.shape == (3, 6, *LATENT_SHAPE)
    assert out.timesteps.shape == (5,)
    assert (out.timesteps[:-1] > out.timesteps[1:]).all()  # sampling order: descending
    sigma = sampling.ddim_scheduler(sched_cfg).init_noise_sigma
    assert torch.equal(out.trajectory[:, 0], sampling.initial_noise(seeds, LATENT_SHAPE) * sigma)
    assert torch.equal(out.trajectory[:, -1], out.latents)
    # Without return_trajectory: same latents, no trajectory.
    again = _sample(tiny, sched_cfg, cond[:3], neg, seeds, num_steps=5, guidance_scale=2.0)
    assert again.trajectory is None
    assert torch.equal(again.latents, out.latents)


def test_sample_argument_errors(tiny, sched_cfg, embeds):
    cond, _ = embeds
    with pytest.raises(ValueError, match="seeds"):
        _sample(tiny, sched_cfg, cond[:2], None, _seeds(3))
    with pytest.raises(ValueError, match="negative conditioning"):
        _sample(tiny, sched_cfg, cond[:2], None, _seeds(2), guidance_scale=3.0)


# ------------------------------------------------------------------ ddim_coefficients + implied_noise


def _coefficients(cfg: dict, timesteps: torch.Tensor, i: int, batch: int, eta: float = 0.0):
    sched = sampling.ddim_scheduler(cfg)
    return sampling.ddim_coefficients(
        timesteps, torch.full((batch,), i), sched.alphas_cumprod.double(), float(sched.final_alpha_cumprod), eta
    )


def _assert_noise_close(implied: torch.Tensor, expected: torch.Tensor, coef_b: torch.Tensor) -> None:
    """ε̃ = (x_prev - A x_t) / B amplifies the float32 rounding of the stored latents by 1/|B| (|B| ≈ 0.01 on the
    last step of an SD schedule), so the tolerance is 2e-5 in x-space; a wrong A or B is off by 1e-2 or more."""
    atol = 2e-5 / coef_b.abs().min().item()
    torch.testing.assert_close(implied, expected, atol=atol, rtol=0)


@pytest.mark.parametrize(("spacing", "num_steps"), [("leading", 10), ("leading", 7), ("trailing", 7), ("linspace", 6)])
def test_implied_noise_is_the_epsilon_prediction_without_guidance(tiny, sched_cfg, embeds, spacing, num_steps):
    """η = 0, guidance 1: every step of the stored trajectory gives back the UNet's ε-prediction at x_t.

    "trailing" with 7 steps and "linspace" are unevenly spaced: DDIM steps from t to t - T // S, which is not
    the next sampling timestep, and ddim_coefficients must follow the sampler, not the timestep list.
    """
    cfg = {**sched_cfg, "timestep_spacing": spacing}
    cond = embeds[0][:3]
    out = _sample(tiny, cfg, cond, None, _seeds(3), num_steps=num_steps, return_trajectory=True)
    assert len(out.timesteps) == num_steps
    for i, t in enumerate(out.timesteps):
        coef_a, coef_b = _coefficients(cfg, out.timesteps, i, 3)
        if spacing == "linspace" and i == num_steps - 1:
            # Its last step goes from t=0 to ᾱ_final = ᾱ_0 (set_alpha_to_one=False): x_prev == x_t, B = 0, no ε.
            assert t == 0 and coef_b.abs().max() < 1e-12
            continue
        x_t, x_prev = out.trajectory[:, i], out.trajectory[:, i + 1]
        implied = sampling.implied_noise(x_t, x_prev, coef_a, coef_b)
        with torch.no_grad():
            eps = tiny.denoiser(x_t, t, encoder_hidden_states=cond).sample
        _assert_noise_close(implied, eps, coef_b)


def test_implied_noise_is_the_guided_epsilon_with_guidance(tiny, sched_cfg, embeds):
    cond, neg = embeds[0][:3], embeds[1]
    scale = 3.0
    out = _sample(tiny, sched_cfg, cond, neg, _seeds(3), num_steps=6, guidance_scale=scale, return_trajectory=True)
    for i, t in enumerate(out.timesteps):
        x_t, x_prev = out.trajectory[:, i], out.trajectory[:, i + 1]
        with torch.no_grad():
            eps_c = tiny.denoiser(x_t, t, encoder_hidden_states=cond).sample
            eps_u = tiny.denoiser(x_t, t, encoder_hidden_states=neg.expand(3, -1, -1)).sample
        guided = eps_u + scale * (eps_c - eps_u)
        coef_a, coef_b = _coefficients(sched_cfg, out.timesteps, i, 3)
        implied = sampling.implied_noise(x_t, x_prev, coef_a, coef_b)
        _assert_noise_close(implied, guided, coef_b)
        assert (guided - eps_c).abs().max() > 1e-2  # guidance is not a no-op here


def test_implied_noise_with_eta_adds_unit_gaussian_noise(tiny, sched_cfg, embeds):
    """η > 0: ε̃ - ε_θ = σ_t z / B_t with z ~ N(0, I); recover z and check it is standard normal."""
    cond = embeds[0]
    eta = 1.0
    out = _sample(tiny, sched_cfg, cond, None, _seeds(6), num_steps=4, eta=eta, return_trajectory=True)
    sched = sampling.ddim_scheduler(sched_cfg)
    ac = sched.alphas_cumprod.double()
    zs = []
    for i, t in enumerate(out.timesteps):
        coef_a, coef_b = _coefficients(sched_cfg, out.timesteps, i, 6, eta=eta)
        x_t, x_prev = out.trajectory[:, i], out.trajectory[:, i + 1]
        implied = sampling.implied_noise(x_t, x_prev, coef_a, coef_b).double()
        with torch.no_grad():
            eps = tiny.denoiser(x_t, t, encoder_hidden_states=cond).sample.double()
        a_t = ac[t]
        a_prev = ac[t - 1000 // 4] if t >= 1000 // 4 else torch.tensor(float(sched.final_alpha_cumprod))
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        zs.append((implied - eps) * coef_b[0] / sigma)
    z = torch.stack(zs)
    assert abs(z.mean().item()) < 0.1
    assert 0.9 < z.std().item() < 1.1


# ------------------------------------------------------------------ generate_shards / load_generated


def _spec(**kw) -> sampling.GenerationSpec:
    base = dict(
        run_seed=3,
        iteration=1,
        num_prompts=5,
        num_steps=3,
        guidance_scale=2.0,
        eta=0.0,
        latent_shape=LATENT_SHAPE,
        store_trajectory=True,
        shard_size=2,
    )
    return sampling.GenerationSpec(**{**base, **kw})


def _generate(tiny, cfg, embeds, out_dir, spec, **kw):
    cond, neg = embeds
    kw = {"batch_size": 2, "progress": False, **kw}
    sampling.generate_shards(
        tiny.denoiser, families.make("sd", cfg), cond[: spec.num_prompts], neg, out_dir, spec, **kw
    )


def _complete(out: Path, spec: sampling.GenerationSpec) -> bool:
    """meta.json and every shard of `spec` are in `out`."""
    shards = [out / f"shard_{s:05d}.safetensors" for s in range(math.ceil(spec.num_prompts / spec.shard_size))]
    return (out / "meta.json").exists() and all(p.exists() for p in shards)


def test_generate_shards_matches_direct_sampling(tiny, sched_cfg, embeds, tmp_path):
    spec = _spec()
    _generate(tiny, sched_cfg, embeds, tmp_path, spec)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["meta.json", "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["spec"] == spec.to_json()
    assert _complete(tmp_path, spec)

    got = sampling.load_generated(tmp_path)
    cond, neg = embeds
    direct = _sample(
        tiny,
        sched_cfg,
        cond[:5],
        neg,
        _seeds(5, run_seed=3, iteration=1),
        num_steps=3,
        guidance_scale=2.0,
        return_trajectory=True,
    )
    torch.testing.assert_close(got.latents[:], direct.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.trajectory[:], direct.trajectory, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.timesteps, direct.timesteps)
    sched = sampling.ddim_scheduler(sched_cfg)
    torch.testing.assert_close(got.alphas_cumprod, sched.alphas_cumprod.double())
    assert got.final_alpha_cumprod == pytest.approx(float(sched.final_alpha_cumprod))
    assert got.eta == 0.0

    # Without store_trajectory there is no trajectory, and the latents are the same.
    _generate(tiny, sched_cfg, embeds, tmp_path / "no_traj", replace(spec, store_trajectory=False))
    plain = sampling.load_generated(tmp_path / "no_traj")
    assert plain.trajectory is None
    assert torch.equal(plain.latents[:], got.latents[:])


def test_generate_shards_resumes_only_missing_shards(tiny, sched_cfg, embeds, tmp_path, monkeypatch):
    spec = _spec()
    _generate(tiny, sched_cfg, embeds, tmp_path, spec)
    before = sampling.load_generated(tmp_path)
    files = ["meta.json", "shard_00000.safetensors", "shard_00002.safetensors"]
    mtimes = {name: (tmp_path / name).stat().st_mtime_ns for name in files}
    (tmp_path / "shard_00001.safetensors").unlink()
    assert not _complete(tmp_path, spec)

    sampled: list[int] = []
    real_sample = sampling.sample

    def counting_sample(*args, **kwargs):
        sampled.extend(kwargs["seeds"])
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample", counting_sample)
    _generate(tiny, sched_cfg, embeds, tmp_path, spec)
    assert sampled == _seeds(2, run_seed=3, iteration=1, start=2)  # prompts 2 and 3 = shard 1, nothing else
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in files} == mtimes
    after = sampling.load_generated(tmp_path)
    assert torch.equal(after.latents[:], before.latents[:])
    assert torch.equal(after.trajectory[:], before.trajectory[:])

    # A complete folder: nothing to do.
    sampled.clear()
    _generate(tiny, sched_cfg, embeds, tmp_path, spec)
    assert sampled == []


@pytest.mark.parametrize("rank", [0, 1])
def test_generate_shards_refuses_other_settings(tiny, sched_cfg, embeds, tmp_path, rank):
    spec = _spec()
    _generate(tiny, sched_cfg, embeds, tmp_path, spec)
    (tmp_path / "shard_00001.safetensors").unlink()
    meta = (tmp_path / "meta.json").read_text()
    with pytest.raises(SpinDiffusionError, match="other settings"):
        _generate(tiny, sched_cfg, embeds, tmp_path, replace(spec, num_steps=4), rank=rank, world_size=2)
    # Nothing was written with the wrong settings.
    assert not (tmp_path / "shard_00001.safetensors").exists()
    assert (tmp_path / "meta.json").read_text() == meta


def test_load_generated_errors(tiny, sched_cfg, embeds, tmp_path):
    with pytest.raises(SpinDiffusionError, match="meta.json"):
        sampling.load_generated(tmp_path)
    spec = _spec(store_trajectory=False)
    _generate(tiny, sched_cfg, embeds, tmp_path, spec)
    (tmp_path / "shard_00002.safetensors").unlink()
    with pytest.raises(SpinDiffusionError, match="incomplete"):
        sampling.load_generated(tmp_path)


def test_generate_shards_two_ranks_equal_one(tiny, sched_cfg, embeds, tmp_path):
    spec = _spec(num_prompts=6, store_trajectory=False)
    _generate(tiny, sched_cfg, embeds, tmp_path / "one", spec)
    # Rank 1 first (it must not need rank 0's meta.json), then rank 0.
    _generate(tiny, sched_cfg, embeds, tmp_path / "two", spec, rank=1, world_size=2)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["shard_00001.safetensors"]
    _generate(tiny, sched_cfg, embeds, tmp_path / "two", spec, rank=0, world_size=2)
    one, two = sampling.load_generated(tmp_path / "one"), sampling.load_generated(tmp_path / "two")
    assert torch.equal(two.latents[:], one.latents[:])
    assert torch.equal(two.timesteps, one.timesteps)


@pytest.mark.parametrize("store_dtype", ["fp16", "bf16"])
def test_generate_shards_store_dtype_and_lazy_embeddings(tiny, sched_cfg, embeds, tmp_path, store_dtype):
    """Half-precision shards read back as float32 close to the fp32 ones; prompt embeddings may be a RowStore."""
    from spin_diffusion.cache import RowStore, read_header, write_shard

    spec = _spec()
    _generate(tiny, sched_cfg, embeds, tmp_path / "fp32", spec)
    cond, neg = embeds
    write_shard(tmp_path / "emb.safetensors", {"prompt_embeds": cond[:5]}, {})
    lazy = RowStore.open([tmp_path / "emb.safetensors"], "prompt_embeds")
    half = replace(spec, store_dtype=store_dtype)
    sampling.generate_shards(
        tiny.denoiser, families.make("sd", sched_cfg), lazy, neg, tmp_path / "half", half, batch_size=2, progress=False
    )
    header = read_header(tmp_path / "half" / "shard_00000.safetensors")[0]
    assert (
        header["latents"]["dtype"] == {"fp16": "F16", "bf16": "BF16"}[store_dtype]
        and header["indices"]["dtype"] == "I64"
    )
    full, got = sampling.load_generated(tmp_path / "fp32"), sampling.load_generated(tmp_path / "half")
    assert got.latents.shape == full.latents.shape and got.trajectory.shape == full.trajectory.shape
    idx = torch.tensor([4, 0, 0, 3])
    assert got.latents[idx].dtype == torch.float32
    torch.testing.assert_close(got.latents[idx], full.latents[idx], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.trajectory[idx], full.trajectory[idx], atol=2e-2, rtol=2e-2)


def test_generation_folder_from_before_store_dtype_resumes(tiny, sched_cfg, embeds, tmp_path):
    spec = _spec()
    _generate(tiny, sched_cfg, embeds, tmp_path, spec)
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["spec"]["store_dtype"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "shard_00001.safetensors").unlink()
    _generate(tiny, sched_cfg, embeds, tmp_path, spec)  # no "other settings" error
    assert _complete(tmp_path, spec)


# ------------------------------------------------------------------ partial generation, samplers, dtypes


def test_generate_shards_only_the_given_prompts_in_their_order(tiny, sched_cfg, embeds, tmp_path, monkeypatch):
    """spec.prompts: shards hold those prompts in that order, rows stay indexed by prompt, the others are absent."""
    order = (4, 1, 5)
    spec = _spec(num_prompts=6, prompts=order)
    sampled: list[int] = []
    real_sample = sampling.sample

    def counting_sample(*args, **kwargs):
        sampled.extend(kwargs["seeds"])
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample", counting_sample)
    _generate(tiny, sched_cfg, embeds, tmp_path, spec)
    assert sampled == [sampling.sample_seed(3, 1, i) for i in order]  # nothing else was sampled
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta.json",
        "shard_00000.safetensors",
        "shard_00001.safetensors",
    ]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["prompts"] == list(order) and meta["num_generated"] == 3
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "shard_00000.safetensors"))["indices"].tolist() == [4, 1]

    full = tmp_path / "full"
    _generate(tiny, sched_cfg, embeds, full, _spec(num_prompts=6))
    got, ref = sampling.load_generated(tmp_path), sampling.load_generated(full)
    assert got.latents.shape == ref.latents.shape and got.prompts.tolist() == list(order) and ref.prompts is None
    idx = torch.tensor([5, 4, 4, 1])
    # same per-prompt seeds: the same samples (up to float rounding: the batches hold other prompts)
    torch.testing.assert_close(got.latents[idx], ref.latents[idx], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.trajectory[idx], ref.trajectory[idx], atol=1e-5, rtol=1e-5)
    with pytest.raises(IndexError, match="not stored"):
        got.latents[[0]]

    # Resume: only the missing shard; another set of prompts is refused.
    (tmp_path / "shard_00001.safetensors").unlink()
    sampled.clear()
    _generate(tiny, sched_cfg, embeds, tmp_path, spec)
    assert sampled == [sampling.sample_seed(3, 1, 5)]
    assert torch.equal(sampling.load_generated(tmp_path).latents[idx], got.latents[idx])  # resume: bit-identical
    with pytest.raises(SpinDiffusionError, match="other prompts"):
        _generate(tiny, sched_cfg, embeds, tmp_path, replace(spec, prompts=(4, 1, 0)))
    with pytest.raises(SpinDiffusionError, match="other prompts"):
        _generate(tiny, sched_cfg, embeds, tmp_path, replace(spec, prompts=None))


@pytest.mark.parametrize(("scheduler", "dtype"), [("dpmsolver++", None), ("ddim", "bf16"), ("dpmsolver++", "bf16")])
def test_other_samplers_and_dtypes_are_seeded_and_batch_invariant(tiny, sched_cfg, embeds, scheduler, dtype):
    cond, neg = embeds
    kw = dict(num_steps=4, guidance_scale=2.0, scheduler=scheduler, dtype=dtype)
    whole = _sample(tiny, sched_cfg, cond[:4], neg, _seeds(4), **kw)
    again = _sample(tiny, sched_cfg, cond[:4], neg, _seeds(4), **kw)
    assert torch.equal(whole.latents, again.latents)
    parts = torch.cat(
        [_sample(tiny, sched_cfg, cond[i : i + 2], neg, _seeds(2, start=i), **kw).latents for i in (0, 2)]
    )
    torch.testing.assert_close(parts, whole.latents, atol=1e-2 if dtype else 1e-5, rtol=1e-2 if dtype else 1e-5)
    assert next(tiny.denoiser.parameters()).dtype == torch.float32  # autocast leaves the module as it was
    base = _sample(tiny, sched_cfg, cond[:4], neg, _seeds(4), num_steps=4, guidance_scale=2.0)
    assert not torch.equal(whole.latents, base.latents)
    assert torch.isfinite(whole.latents).all()
    if scheduler == "ddim":  # bf16 autocast: close to the fp32 samples
        torch.testing.assert_close(whole.latents, base.latents, atol=0.1, rtol=0.1)


def test_sampler_and_dtype_errors(tiny, sched_cfg, embeds):
    from spin_diffusion.config import load_config

    cond, neg = embeds
    with pytest.raises(ValueError, match="eta > 0"):
        _sample(tiny, sched_cfg, cond[:1], neg, _seeds(1), scheduler="dpmsolver++", eta=0.5)
    with pytest.raises(SpinDiffusionError, match="spin_exact needs sample.scheduler=ddim"):
        load_config(None, ["loss.objective=spin_exact", "sample.scheduler=dpmsolver++"])
    with pytest.raises(SpinDiffusionError, match="sample.eta"):
        load_config(None, ["sample.eta=0.5", "sample.scheduler=dpmsolver++"])
    assert sampling.resolve_dtype("auto", "cpu") == "fp32" and sampling.resolve_dtype("auto", "cuda") == "bf16"
    assert sampling.resolve_dtype("fp16", "cpu") == "fp16"


# ---------------------------------------------------------------------------------------------------------------
# Which prompts the opponent samples (sample.per_caption)


def test_opponent_prompts_every_row_is_the_identity():
    visited = torch.tensor([3, 0, 2])
    plan = sampling.opponent_prompts(["a", "b", "a", "c"], visited, "every_row")
    assert plan.num_prompts == 4 and torch.equal(plan.visited, visited) and plan.prompts == (3, 0, 2)
    assert plan.first_row is None and plan.row_prompt is None
    everything = sampling.opponent_prompts(["a", "b"], torch.tensor([1, 0]), "every_row")
    assert everything.prompts is None  # every prompt visited: sampled in prompt order


def test_opponent_prompts_one_per_caption_in_first_visit_order():
    captions = ["a", "b", "a", "c", "b", "a"]  # distinct captions in order of appearance: a=0, b=1, c=2
    plan = sampling.opponent_prompts(captions, torch.tensor([4, 0, 2, 1]), "one")
    assert plan.num_prompts == 3
    assert plan.visited.tolist() == [1, 0]  # rows 4 (b), 0 (a), 2 (a again), 1 (b again): c is never visited
    assert plan.prompts == (1, 0)
    assert plan.first_row.tolist() == [0, 1, 3] and plan.row_prompt.tolist() == [0, 1, 0, 2, 1, 0]
    embeds = torch.arange(6.0).reshape(6, 1, 1)  # row i's conditioning is i
    cond = plan.conditioning(families.Cond(embeds))
    assert cond.embeds.flatten().tolist() == [0.0, 1.0, 3.0]
    assert sampling.opponent_prompts(captions, torch.arange(6), "one").prompts is None
    with pytest.raises(SpinDiffusionError, match="sample.per_caption must be one of 'every_row', 'one'; got 'some'"):
        sampling.opponent_prompts(captions, torch.arange(6), "some")
