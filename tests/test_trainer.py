"""trainer.py on the tiny UNet: first loss = log 2, what trains and what stays frozen, LoRA, overfitting,
determinism, gradient accumulation, checkpoint resume, argument errors and step arithmetic.

Every train() call writes to its own tmp dir; the data are random latents and embeddings from a seeded generator.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spin_diffusion import (  # noqa: E402
    encoding,  # noqa: E402
    families,
    losses,
    models,
    sampling,
    trainer,
)
from spin_diffusion.config import LossConfig, TrainConfig  # noqa: E402
from spin_diffusion.errors import SpinDiffusionError  # noqa: E402
from spin_diffusion.lora import (
    adapters_disabled,  # noqa: E402
    add_lora,  # noqa: E402
)

LOG2 = math.log(2)
LATENT_SHAPE = (4, 8, 8)
SEQ_LEN, EMBED_DIM = 16, 8
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, scope="module")
def _fresh_accelerate_state():
    """accelerate's state is a per-process singleton: start from a clean one whatever earlier test modules set
    (every train() here uses mixed_precision="no"), and leave a clean one behind."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _pairs(n: int = 8, seed: int = 0) -> trainer.TrainData:
    g = torch.Generator().manual_seed(seed)
    return trainer.TrainData(
        winner=torch.randn(n, *LATENT_SHAPE, generator=g),
        prompt_embeds=torch.randn(n, SEQ_LEN, EMBED_DIM, generator=g),
        loser=torch.randn(n, *LATENT_SHAPE, generator=g),
    )


def _with_opponent_samples(data: trainer.TrainData, unet, family, out: Path) -> trainer.TrainData:
    """`data` with losers, trajectories and sampler made the way self_play makes them: generate_shards (η = 0, no
    guidance, 4 DDIM steps) -> load_generated."""
    spec = sampling.GenerationSpec(
        run_seed=0,
        iteration=0,
        num_prompts=len(data),
        num_steps=4,
        guidance_scale=1.0,
        eta=0.0,
        latent_shape=LATENT_SHAPE,
        store_trajectory=True,
        shard_size=4,
    )
    sampling.generate_shards(unet, family, data.prompt_embeds, None, out, spec, batch_size=4, progress=False)
    gen = sampling.load_generated(out)
    data.loser, data.loser_trajectory = gen.latents, gen.trajectory
    data.sampler = sampling.SamplerSchedule.of(gen)
    return data


@pytest.fixture(scope="module")
def exact_pairs(tiny, tmp_path_factory) -> trainer.TrainData:
    """spin_exact data made the way self_play makes it (`_with_opponent_samples`)."""
    return _with_opponent_samples(_pairs(8), tiny.denoiser, tiny.family, tmp_path_factory.mktemp("generated"))


def _cfg(**kw) -> TrainConfig:
    base = dict(
        learning_rate=1e-3, batch_size=2, max_steps=2, log_every=1, checkpoint_every=0, lr_scheduler="constant"
    )
    return TrainConfig(**{**base, **kw})


def _train(
    tiny,
    policy,
    ref,
    data,
    out_dir: Path,
    objective: str,
    *,
    seed: int = 0,
    beta: float = 5000.0,
    timesteps_per_pair: int = 1,
    sft_weight: float = 0.0,
    loser_guard: float | None = None,
    dpop_lambda: float = 0.0,
    validation=None,
    **train_kw,
) -> tuple[trainer.TrainResult, list[dict]]:
    result = trainer.train(
        policy,
        ref,
        data,
        objective=objective,
        loss_cfg=LossConfig(
            objective=objective,
            beta=beta,
            timesteps_per_pair=timesteps_per_pair,
            sft_weight=sft_weight,
            loser_guard=loser_guard,
            dpop_lambda=dpop_lambda,
        ),
        train_cfg=_cfg(**train_kw),
        family=tiny.family,
        out_dir=out_dir,
        seed=seed,
        progress=False,
        validation=validation,
    )
    return result, _log(result.log_path)


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    after = module.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


# ------------------------------------------------------------------ first loss, what trains


@pytest.mark.parametrize("objective", ["dpo", "spin_approx", "spin_exact"])
def test_first_loss_is_log2_and_only_the_policy_trains(tiny, exact_pairs, tmp_path, objective):
    """Policy == ref at step 1, with (t, ε) shared by winner/loser and policy/ref, so every margin is 0."""
    data = exact_pairs if objective == "spin_exact" else _pairs()
    policy = copy.deepcopy(tiny.denoiser)
    ref = models.frozen_copy(tiny.denoiser)
    policy_before, ref_before = _snapshot(policy), _snapshot(ref)

    result, log = _train(tiny, policy, ref, data, tmp_path, objective, max_steps=3)

    assert [r["step"] for r in log] == [1, 2, 3]
    assert result.steps == 3 and result.resumed_from == 0
    assert log[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert log[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    # After the first update policy != ref, so the loss moves away from log 2 (the ref really is separate).
    assert any(abs(r["loss"] - LOG2) > 1e-3 for r in log[1:])
    assert all(math.isfinite(r["loss"]) for r in log)
    assert result.final_loss == pytest.approx(log[-1]["loss"])
    # Policy weights moved; the reference is bit-for-bit what it was, still frozen and in eval mode.
    changed = _changed(policy_before, policy)
    weights = [k for k, _ in policy.named_parameters()]
    assert len(changed & set(weights)) > 0.9 * len(weights)
    torch.testing.assert_close(ref.state_dict(), ref_before, rtol=0, atol=0)
    assert not any(p.requires_grad for p in ref.parameters())
    assert not ref.training
    assert not policy.training  # train() hands the policy back in eval mode
    assert (tmp_path / "train_log.jsonl").exists() and (tmp_path / "tensorboard").is_dir()


def test_spin_exact_loser_target_is_the_opponents_own_prediction(tiny, exact_pairs, tmp_path):
    """η = 0, no guidance, policy == opponent: ε̃' from the stored trajectory equals the policy's ε-prediction on
    the stored x'_t, so the first loser error is ~0 while the winner error is O(1). This pins the trajectory
    indexing (x'_t, x'_{t-1}), the timestep passed with x'_t and the DDIM coefficients."""
    _, log = _train(
        tiny,
        copy.deepcopy(tiny.denoiser),
        models.frozen_copy(tiny.denoiser),
        exact_pairs,
        tmp_path,
        "spin_exact",
        max_steps=1,
        timesteps_per_pair=4,
    )
    assert log[0]["policy_error_loser"] < 1e-6
    assert log[0]["policy_error_winner"] > 0.1
    assert log[0]["loss"] == pytest.approx(LOG2, abs=1e-6)


def test_lora_policy_without_ref(tiny, tmp_path):
    policy = copy.deepcopy(tiny.denoiser)
    add_lora(policy, rank=2, alpha=2.0, target_modules=LORA_TARGETS)
    before = _snapshot(policy)
    lora_keys = {k for k in before if "lora_" in k}
    assert lora_keys

    _, log = _train(tiny, policy, None, _pairs(), tmp_path, "spin_approx", max_steps=3, learning_rate=1e-2)

    assert log[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    # With the adapters disabled the reference is the base model, not the adapted policy: the loss moves.
    assert any(abs(r["loss"] - LOG2) > 1e-3 for r in log[1:])
    changed = _changed(before, policy)
    assert changed <= lora_keys
    assert any("lora_B" in k for k in changed)  # B starts at 0 and must have moved
    # The base weights equal the original UNet's, under peft's `base_layer` names.
    original = tiny.denoiser.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in policy.state_dict().items() if "lora_" not in k}
    assert base.keys() == original.keys()
    torch.testing.assert_close(base, original, rtol=0, atol=0)
    # Adapters are enabled again after training: the policy differs from the base model.
    x = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    ctx = _pairs(2).prompt_embeds.embeds
    t = torch.tensor([100, 700])
    with torch.no_grad():
        out_policy = policy(x, t, encoder_hidden_states=ctx).sample
        with adapters_disabled(policy):
            out_base = policy(x, t, encoder_hidden_states=ctx).sample
        out_orig = tiny.denoiser(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(out_base, out_orig)
    assert (out_policy - out_orig).abs().max() > 1e-4


# ------------------------------------------------------------------ learning


@torch.no_grad()
def _eval_errors(tiny, unet, data: trainer.TrainData, draws: int = 64) -> losses.DenoiseErrors:
    """Errors [N, draws] on forward-noised winner and loser with fixed (t, ε) draws, independent of training."""
    g = torch.Generator().manual_seed(12345)
    n = len(data)
    rows = torch.arange(n).repeat_interleave(draws)
    eps = torch.randn(len(rows), *LATENT_SHAPE, generator=g)
    t = torch.randint(0, 1000, (len(rows),), generator=g)
    ns = tiny.noise_scheduler()
    ctx = data.prompt_embeds[rows].embeds

    def err(x0):
        pred = unet(ns.add_noise(x0[rows], eps, t), t, encoder_hidden_states=ctx).sample
        return losses.denoise_error(pred, eps).reshape(n, draws)

    return losses.DenoiseErrors(err(data.winner), err(data.loser))


def test_sft_loss_decreases_when_overfitting_two_examples(tiny, tmp_path):
    data = _pairs(2)  # sft ignores the losers
    policy = copy.deepcopy(tiny.denoiser)
    before = _eval_errors(tiny, policy, data).winner.mean().item()

    _, log = _train(tiny, policy, None, data, tmp_path, "sft", max_steps=30, timesteps_per_pair=8)

    after = _eval_errors(tiny, policy, data).winner.mean().item()
    assert after < 0.9 * before
    losses_ = [r["loss"] for r in log]
    assert sum(losses_[-5:]) / 5 < sum(losses_[:5]) / 5


def test_spin_approx_overfits_two_pairs(tiny, tmp_path):
    data = _pairs(2)
    policy, ref = copy.deepcopy(tiny.denoiser), models.frozen_copy(tiny.denoiser)
    beta = 500.0

    _, log = _train(tiny, policy, ref, data, tmp_path, "spin_approx", max_steps=30, beta=beta, timesteps_per_pair=8)

    losses_ = [r["loss"] for r in log]
    assert losses_[0] == pytest.approx(LOG2, abs=1e-6)
    assert sum(losses_[-5:]) / 5 < 0.5
    # On fresh (t, ε) draws, too: the policy prefers the real images over the generated ones.
    held_out, _ = losses.spin_approx_loss(_eval_errors(tiny, policy, data), _eval_errors(tiny, ref, data), beta)
    assert held_out.mean().item() < 0.5


def test_sft_weight_adds_the_winner_error_and_lowers_it(tiny, tmp_path):
    """loss.sft_weight = λ adds λ·(policy's winner error) to the spin loss: the first step (policy == θ_k) logs
    loss = log 2 + sft_term with sft_term = λ·policy_error_winner, the trained weights differ from a λ = 0 run with
    the same seed, and on fresh (t, ε) draws the winner error ends lower. On these random latents a λ = 0 run
    leaves the winner error where it was (within 1 %) while λ = β/4 lowers it by about 5 % in 5 steps (checked on
    three data seeds); the assertion asks for 2 %."""
    data = _pairs(8)
    beta = 500.0
    before = _eval_errors(tiny, tiny.denoiser, data).winner.mean().item()
    runs = {}
    for name, weight in [("plain", 0.0), ("sft", beta / 4)]:
        policy = copy.deepcopy(tiny.denoiser)
        _, log = _train(
            tiny,
            policy,
            models.frozen_copy(tiny.denoiser),
            data,
            tmp_path / name,
            "spin_approx",
            beta=beta,
            timesteps_per_pair=4,
            sft_weight=weight,
            max_steps=5,
        )
        runs[name] = (policy, log)

    plain_log, sft_log = runs["plain"][1], runs["sft"][1]
    assert "sft_term" not in plain_log[0]
    assert sft_log[0]["sft_term"] == pytest.approx(beta / 4 * sft_log[0]["policy_error_winner"], rel=1e-5)
    assert sft_log[0]["loss"] == pytest.approx(LOG2 + sft_log[0]["sft_term"], rel=1e-5)
    assert sft_log[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    plain_w, sft_w = runs["plain"][0].state_dict(), runs["sft"][0].state_dict()
    assert any(not torch.equal(plain_w[k], sft_w[k]) for k in plain_w)
    after_plain = _eval_errors(tiny, runs["plain"][0], data).winner.mean().item()
    after_sft = _eval_errors(tiny, runs["sft"][0], data).winner.mean().item()
    assert after_sft < 0.98 * after_plain
    assert after_sft < 0.98 * before


# ------------------------------------------------------------------ determinism, accumulation


def test_same_seed_same_weights_other_seed_other_weights(tiny, tmp_path):
    data = _pairs()
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        policy = copy.deepcopy(tiny.denoiser)
        _train(tiny, policy, models.frozen_copy(tiny.denoiser), data, tmp_path / name, "spin_approx", seed=seed)
        runs[name] = policy.state_dict()
    torch.testing.assert_close(runs["a"], runs["b"], rtol=0, atol=0)
    assert any(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def _recording(monkeypatch) -> list[torch.Tensor]:
    """Record the pair indices of every micro-step train() takes."""
    seen: list[torch.Tensor] = []
    real = trainer._micro_step_loss

    def record(policy, ref, batch, **kw):
        seen.append(batch["idx"].clone())
        return real(policy, ref, batch, **kw)

    monkeypatch.setattr(trainer, "_micro_step_loss", record)
    return seen


def test_accumulation_visits_the_same_pairs(tiny, tmp_path, monkeypatch):
    """batch 4 x accumulation 1 and batch 2 x accumulation 2 see the same 4 pairs in every optimizer step
    (3 steps over 8 pairs: the third step starts the second epoch's permutation)."""
    stream = trainer._IndexStream(8, seed=0)
    for start in range(0, 24, 4):
        assert torch.equal(stream.take(start, 4), torch.cat([stream.take(start, 2), stream.take(start + 2, 2)]))
    assert sorted(stream.take(0, 8).tolist()) == list(range(8))  # an epoch is a permutation
    assert sorted(stream.take(8, 8).tolist()) == list(range(8))
    assert not torch.equal(stream.take(0, 8), stream.take(8, 8))  # a new permutation each epoch

    data = _pairs()
    seen_a = _recording(monkeypatch)
    _train(tiny, copy.deepcopy(tiny.denoiser), None, data, tmp_path / "a", "sft", max_steps=3, batch_size=4)
    monkeypatch.undo()
    seen_b = _recording(monkeypatch)
    _train(
        tiny,
        copy.deepcopy(tiny.denoiser),
        None,
        data,
        tmp_path / "b",
        "sft",
        max_steps=3,
        batch_size=2,
        gradient_accumulation_steps=2,
    )
    assert len(seen_a) == 3 and len(seen_b) == 6
    for step in range(3):
        assert torch.equal(seen_a[step], torch.cat(seen_b[2 * step : 2 * step + 2]))


@pytest.mark.parametrize(
    ("objective", "remedies"),
    [("sft", {}), ("spin_approx", {}), ("spin_approx", {"loser_guard": 0.5, "dpop_lambda": 5.0})],
)
def test_accumulation_matches_full_batch(tiny, tmp_path, objective, remedies):
    """batch 2 x accumulation 2 == batch 4 x accumulation 1 (TRL's invariant equivalence classes).

    Each pair's (t, ε) is keyed by its position in the pair stream, not by the micro-step, so both runs draw the
    same noise for the same pair; the accumulated gradient must then be the mean of the micro-batch gradients
    (not the sum) and the optimizer must step once per 2 micro-steps. AdamW with a huge ε is plain SGD (update =
    lr g / ε), so a wrong gradient scale would show.
    """
    seed = 3
    sgd_like = dict(learning_rate=10.0, adam_epsilon=1e3, weight_decay=0.0, max_grad_norm=0.0, max_steps=2)
    data = _pairs()
    init = _snapshot(tiny.denoiser)
    ref = None if objective == "sft" else models.frozen_copy(tiny.denoiser)

    policy_b = copy.deepcopy(tiny.denoiser)
    _, log_b = _train(
        tiny,
        policy_b,
        ref,
        data,
        tmp_path / "b",
        objective,
        seed=seed,
        batch_size=2,
        gradient_accumulation_steps=2,
        **remedies,
        **sgd_like,
    )
    policy_a = copy.deepcopy(tiny.denoiser)
    _, log_a = _train(
        tiny, policy_a, ref, data, tmp_path / "a", objective, seed=seed, batch_size=4, **remedies, **sgd_like
    )

    for ra, rb in zip(log_a, log_b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-6)
    delta_a = {k: policy_a.state_dict()[k] - v for k, v in init.items()}
    delta_b = {k: policy_b.state_dict()[k] - v for k, v in init.items()}
    scale = max(d.abs().max().item() for d in delta_b.values())
    assert scale > 1e-4  # the step did something
    torch.testing.assert_close(delta_a, delta_b, rtol=1e-3, atol=1e-3 * scale)


# ------------------------------------------------------------------ resume


class _Killed(Exception):
    pass


def test_resume_after_kill_gives_the_same_weights_and_log(tiny, tmp_path, monkeypatch):
    """Full run (4 steps, checkpoint at 2) vs a run killed during step 4 and resumed from step 2.

    Warm-up + linear decay and AdamW make the result depend on the restored optimizer and LR-scheduler state;
    the killed run already logged step 3, so the resume must drop that line and write it again.
    """
    data = _pairs()
    kw = dict(max_steps=4, checkpoint_every=2, warmup_steps=2, lr_scheduler="linear", seed=5)

    full = copy.deepcopy(tiny.denoiser)
    _train(tiny, full, models.frozen_copy(tiny.denoiser), data, tmp_path / "full", "spin_approx", **kw)

    real = trainer._micro_step_loss
    calls = itertools.count()

    def dies_in_step_4(*args, **kwargs):
        if next(calls) == 3:
            raise _Killed
        return real(*args, **kwargs)

    out = tmp_path / "killed"
    monkeypatch.setattr(trainer, "_micro_step_loss", dies_in_step_4)
    with pytest.raises(_Killed):
        _train(tiny, copy.deepcopy(tiny.denoiser), models.frozen_copy(tiny.denoiser), data, out, "spin_approx", **kw)
    monkeypatch.undo()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002"]
    assert [r["step"] for r in _log(out / "train_log.jsonl")] == [1, 2, 3]

    resumed = copy.deepcopy(tiny.denoiser)  # fresh weights: everything must come from the checkpoint
    result, log = _train(tiny, resumed, models.frozen_copy(tiny.denoiser), data, out, "spin_approx", **kw)
    assert result.resumed_from == 2 and result.steps == 4
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    full_log = _log(tmp_path / "full" / "train_log.jsonl")
    for r, f in zip(log, full_log, strict=True):
        assert r["loss"] == pytest.approx(f["loss"], rel=1e-5, abs=1e-7)
        assert r["lr"] == pytest.approx(f["lr"])
    torch.testing.assert_close(resumed.state_dict(), full.state_dict())

    # Nothing left to do: a second resume takes no step and keeps the weights and the log.
    again = copy.deepcopy(tiny.denoiser)
    result, log2 = _train(tiny, again, models.frozen_copy(tiny.denoiser), data, out, "spin_approx", **kw)
    assert result.resumed_from == 2 and [r["step"] for r in log2] == [1, 2, 3, 4]


# ------------------------------------------------------------------ errors, arithmetic


@pytest.mark.parametrize("objective", ["dpo", "spin_approx", "spin_exact"])
def test_objectives_with_a_reference_need_one(tiny, exact_pairs, tmp_path, objective):
    data = exact_pairs if objective == "spin_exact" else _pairs()
    policy = copy.deepcopy(tiny.denoiser)
    with pytest.raises(ValueError, match="reference"):
        _train(tiny, policy, None, data, tmp_path, objective)
    with pytest.raises(ValueError, match="different objects"):
        _train(tiny, policy, policy, data, tmp_path, objective)


def test_an_unresolved_schedule_is_refused(tiny, tmp_path):
    """The trainer knows no iterations: a list-valued β or learning rate must be resolved by the caller."""
    policy, ref = copy.deepcopy(tiny.denoiser), models.frozen_copy(tiny.denoiser)
    with pytest.raises(ValueError, match="config.for_iteration"):
        _train(tiny, policy, ref, _pairs(), tmp_path, "spin_approx", beta=(5000.0, 2500.0))
    with pytest.raises(ValueError, match="config.for_iteration"):
        _train(tiny, policy, ref, _pairs(), tmp_path, "spin_approx", learning_rate=(1e-4, 5e-5))


def test_an_unresolved_total_batch_is_refused(tiny, tmp_path):
    """train.total_batch_size / scale_lr depend on the process count: config.for_world resolves them first."""
    policy, ref = copy.deepcopy(tiny.denoiser), models.frozen_copy(tiny.denoiser)
    with pytest.raises(ValueError, match="config.for_world"):
        _train(tiny, policy, ref, _pairs(), tmp_path, "spin_approx", total_batch_size=4)
    with pytest.raises(ValueError, match="config.for_world"):
        _train(tiny, policy, ref, _pairs(), tmp_path, "spin_approx", scale_lr=True)


# ------------------------------------------------------------------ loser guard and DPO-Positive hinge


@pytest.mark.parametrize("objective", ["dpo", "spin_approx", "spin_exact"])
@pytest.mark.parametrize("lora", [False, True])
def test_guard_and_hinge_train_every_preference_objective(tiny, exact_pairs, tmp_path, objective, lora):
    """Full and LoRA, every preference objective: the guard's λ (in [0, 1]) and the hinge's term (≤ 0) are logged;
    the guard keeps the loss's value (same first loss as without it) and changes the update."""
    data = exact_pairs if objective == "spin_exact" else _pairs()

    def policy_and_ref():
        policy = copy.deepcopy(tiny.denoiser)
        if not lora:
            return policy, models.frozen_copy(tiny.denoiser)
        policy.requires_grad_(False)
        add_lora(policy, rank=4, alpha=4, target_modules=LORA_TARGETS, seed=0)
        return policy, None

    runs = {}
    for name, remedies in (("plain", {}), ("guarded", {"loser_guard": 0.9, "dpop_lambda": 5.0})):
        policy, ref = policy_and_ref()
        _, log = _train(tiny, policy, ref, data, tmp_path / name, objective, max_steps=3, beta=50.0, **remedies)
        runs[name] = (policy, log)
    log = runs["guarded"][1]
    assert all(0.0 <= r["loser_guard_lambda"] <= 1.0 for r in log) and all(r["dpop_term"] <= 0.0 for r in log)
    if objective != "spin_exact":
        assert any(r["loser_guard_lambda"] < 1.0 for r in log)  # the guard acted on some rows
    # (spin_exact here: an unguided η = 0 opponent, whose chain's loser residual is ≈ 0 near θ_k: nothing to guard)
    assert log[0]["loss"] == pytest.approx(runs["plain"][1][0]["loss"], rel=1e-5)  # at θ = θ_k the hinge is 0 too
    after = {n: p.detach() for n, p in runs["guarded"][0].named_parameters() if p.requires_grad}
    plain = dict(runs["plain"][0].named_parameters())
    assert any(not torch.equal(v, plain[n].detach()) for n, v in after.items())


def test_data_check_errors():
    data = _pairs()
    data.loser = None
    with pytest.raises(ValueError, match="loser"):
        data.check("spin_approx")
    with pytest.raises(ValueError, match="trajector"):
        data.check("spin_exact")
    data.check("sft")


@pytest.mark.parametrize(("n", "positions"), [(10, 1), (10, 7), (10, 10), (10, 25), (1, 3)])
def test_visited_rows_are_the_distinct_rows_of_the_stream_in_first_visit_order(n, positions):
    taken = trainer._IndexStream(n, seed=5).take(0, positions).tolist()
    first_visits = list(dict.fromkeys(taken))
    assert trainer.visited_rows(n, 5, positions).tolist() == first_visits
    assert len(first_visits) == min(n, positions)


def test_stream_positions():
    cfg = TrainConfig(batch_size=3, gradient_accumulation_steps=2, max_steps=5)
    assert trainer.stream_positions(100, cfg, world_size=2) == 5 * 2 * 2 * 3
    assert trainer.stream_positions(10, TrainConfig(batch_size=4, epochs=1.0), world_size=1) == 12  # ceil(10/4)*4


def test_num_optimizer_steps():
    f = trainer.num_optimizer_steps
    assert f(1000, TrainConfig(max_steps=7)) == 7
    assert f(1000, TrainConfig(max_steps=7), world_size=4) == 7
    assert f(10, TrainConfig(batch_size=2, gradient_accumulation_steps=2)) == 3  # ceil(10 / 4)
    assert f(10, TrainConfig(batch_size=2, gradient_accumulation_steps=2), world_size=2) == 2  # ceil(10 / 8)
    assert f(8, TrainConfig(batch_size=2, epochs=2.5)) == 10
    assert f(8, TrainConfig(batch_size=4, epochs=0.1)) == 1  # never 0


def test_epochs_set_the_number_of_steps(tiny, tmp_path):
    result, log = _train(
        tiny,
        copy.deepcopy(tiny.denoiser),
        None,
        _pairs(8),
        tmp_path,
        "sft",
        max_steps=None,
        epochs=1.0,
        batch_size=4,
        log_every=100,
    )
    assert result.steps == 2
    assert [r["step"] for r in log] == [2]  # logged at the last step even when log_every is larger


def test_exact_objective_never_draws_a_step_with_zero_b():
    """A "linspace" DDIM schedule ends at t = 0 whose step to ᾱ_0 has B = 0 (ε̃' undefined): it is excluded."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(timestep_spacing="linspace", set_alpha_to_one=False)
    sched.set_timesteps(6)
    schedule = sampling.SamplerSchedule(
        sched.timesteps, sched.alphas_cumprod.double(), float(sched.final_alpha_cumprod), 0.0
    )
    valid = sampling.valid_exact_steps(schedule)
    assert valid.tolist() == [0, 1, 2, 3, 4]
    leading = DDIMScheduler(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    leading.set_timesteps(6)
    schedule = sampling.SamplerSchedule(
        leading.timesteps, leading.alphas_cumprod.double(), float(leading.final_alpha_cumprod), 0.0
    )
    assert sampling.valid_exact_steps(schedule).tolist() == list(range(6))


def test_spin_exact_with_v_prediction_converts_to_epsilon(tiny, tmp_path):
    """A v-prediction model: the sampler and the exact objective both turn v into ε, so on the opponent's own
    trajectory (η = 0, no guidance) the first loser error is again ~0. Pins DDPMProcess.exact_space and the v path."""
    from diffusers import DDIMScheduler

    config = dict(DDIMScheduler.from_config(tiny.scheduler.config, prediction_type="v_prediction").config)
    family = families.make("sd", config)
    assert family.process.prediction_type == "v_prediction"
    data = _with_opponent_samples(_pairs(4), tiny.denoiser, family, tmp_path / "gen")
    result = trainer.train(
        copy.deepcopy(tiny.denoiser),
        models.frozen_copy(tiny.denoiser),
        data,
        objective="spin_exact",
        loss_cfg=LossConfig(objective="spin_exact", timesteps_per_pair=4),
        train_cfg=_cfg(max_steps=1),
        family=family,
        out_dir=tmp_path / "train",
        seed=0,
        progress=False,
    )
    log = _log(result.log_path)
    assert log[0]["policy_error_loser"] < 1e-5
    assert log[0]["policy_error_winner"] > 0.1
    assert log[0]["loss"] == pytest.approx(LOG2, abs=1e-6)


def test_bf16_mixed_precision_keeps_a_bf16_reference(tiny, tmp_path):
    """Mixed precision: the reference is stored in bf16 (half the memory, as in the Diffusion-DPO script); the
    first loss is log 2 up to that rounding, and training stays finite."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        ref = models.frozen_copy(tiny.denoiser)
        _, log = _train(
            tiny,
            copy.deepcopy(tiny.denoiser),
            ref,
            _pairs(),
            tmp_path,
            "spin_approx",
            beta=50.0,
            max_steps=2,
            mixed_precision="bf16",
        )
        assert next(ref.parameters()).dtype == torch.bfloat16
        assert log[0]["loss"] == pytest.approx(LOG2, abs=0.05)
        assert all(math.isfinite(r["loss"]) for r in log)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_data_loader_workers_and_on_disk_cache_give_the_same_run(tiny, tmp_path):
    """Micro-batches come from a DataLoader: 2 worker processes reading an on-disk RowStore train exactly as the
    main process reading in-memory tensors does (same pairs, same draws, same order)."""
    from spin_diffusion.cache import RowStore, write_shard

    data = _pairs()
    runs = {}
    for name, workers in (("memory", 0), ("disk", 2)):
        if name == "disk":
            stores = {}
            for field in ("winner", "prompt_embeds", "loser"):
                tensor = data.prompt_embeds.embeds if field == "prompt_embeds" else getattr(data, field)
                paths = []
                for i, start in enumerate(range(0, len(tensor), 3)):  # shards of 3 rows: reads cross shards
                    path = tmp_path / f"{field}-{i}.safetensors"
                    write_shard(path, {field: tensor[start : start + 3]}, {})
                    paths.append(path)
                stores[field] = RowStore.open(paths, field)
            run_data = trainer.TrainData(**stores)
        else:
            run_data = data
        policy, ref = copy.deepcopy(tiny.denoiser), models.frozen_copy(tiny.denoiser)
        _train(
            tiny, policy, ref, run_data, tmp_path / name, "spin_approx", max_steps=3, batch_size=4, num_workers=workers
        )
        runs[name] = _snapshot(policy)
    for key in runs["memory"]:
        assert torch.equal(runs["memory"][key], runs["disk"][key]), key


def test_checkpoints_total_limit_keeps_the_newest(tiny, tmp_path):
    kept = {2: ["step_0000003", "step_0000004"], None: [f"step_000000{i}" for i in (1, 2, 3, 4)]}
    for limit, names in kept.items():
        out = tmp_path / str(limit)
        kw = dict(max_steps=5, checkpoint_every=1, checkpoints_total_limit=limit)
        _train(tiny, copy.deepcopy(tiny.denoiser), None, _pairs(), out, "sft", **kw)
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == names  # the last step is the export's
    with pytest.raises(SpinDiffusionError, match="train.checkpoints_total_limit must be >= 1 or null"):
        TrainConfig(checkpoints_total_limit=0)


def test_time_based_checkpoints(tiny, tmp_path):
    """train.checkpoint_every_minutes checkpoints on the clock even with step-based checkpoints off."""
    _train(tiny, copy.deepcopy(tiny.denoiser), None, _pairs(), tmp_path / "off", "sft", max_steps=3)
    assert not (tmp_path / "off" / "checkpoints").exists()
    _train(
        tiny,
        copy.deepcopy(tiny.denoiser),
        None,
        _pairs(),
        tmp_path / "on",
        "sft",
        max_steps=3,
        checkpoint_every_minutes=1e-9,
    )  # due after every step; the newest replaces the older ones
    assert [p.name for p in (tmp_path / "on" / "checkpoints").iterdir()] == ["step_0000002"]


# ------------------------------------------------------------------ EMA, 8-bit AdamW, validation images


def _checkpoint_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def test_ema_is_diffusers_moving_average_of_the_trained_weights(tiny, tmp_path):
    """The policy returned (and so exported) is the EMA: update n mixes with decay min(ema_decay, (1+n)/(10+n)),
    the first update copies the weights (EMAModel); the raw weights train exactly as without EMA."""
    data, kw = _pairs(), dict(max_steps=3, checkpoint_every=1, checkpoints_total_limit=None, seed=3)
    raw = copy.deepcopy(tiny.denoiser)
    _train(tiny, raw, models.frozen_copy(tiny.denoiser), data, tmp_path / "raw", "spin_approx", **kw)
    w1, w2 = (_checkpoint_weights(tmp_path / "raw", step) for step in (1, 2))
    w3 = {name: t.detach() for name, t in raw.state_dict().items()}

    ema = copy.deepcopy(tiny.denoiser)
    out = tmp_path / "ema"
    _train(tiny, ema, models.frozen_copy(tiny.denoiser), data, out, "spin_approx", ema_decay=0.2, **kw)
    d2, d3 = min(0.2, 2 / 11), min(0.2, 3 / 12)  # the warm-up decides update 2, ema_decay update 3
    for name, value in ema.state_dict().items():
        expected = d3 * (d2 * w1[name] + (1 - d2) * w2[name]) + (1 - d3) * w3[name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_checkpoint_weights(out, 2), w2, rtol=0, atol=0)  # training itself is unchanged
    assert any(not torch.equal(ema.state_dict()[n], w3[n]) for n in w3)
    with pytest.raises(SpinDiffusionError, match=r"train.ema_decay must be in \[0, 1\) or null"):
        TrainConfig(ema_decay=1.0)


def _dtypes(state) -> set[torch.dtype]:
    if isinstance(state, torch.Tensor):
        return {state.dtype}
    values = state.values() if isinstance(state, dict) else state if isinstance(state, list | tuple) else []
    return set().union(*(_dtypes(v) for v in values))


@pytest.mark.parametrize("setting", [{"ema_decay": 0.5}, {"optimizer": "adamw8bit"}])
def test_ema_and_8bit_adamw_resume_bit_identically(tiny, tmp_path, monkeypatch, setting):
    """Killed during step 3 and resumed from step 2: the EMA (its shadow weights and update count) and the 8-bit
    optimizer states come back from the checkpoint, so the result equals the uninterrupted run bit for bit."""
    if "optimizer" in setting:  # bitsandbytes keeps tensors under 4096 elements in 32 bits: all of the tiny UNet's
        import functools

        import bitsandbytes as bnb

        monkeypatch.setattr(bnb.optim, "AdamW8bit", functools.partial(bnb.optim.AdamW8bit, min_8bit_size=16))
    data = _pairs()
    kw = dict(max_steps=3, checkpoint_every=2, warmup_steps=1, lr_scheduler="linear", seed=4, **setting)
    full = copy.deepcopy(tiny.denoiser)
    _train(tiny, full, models.frozen_copy(tiny.denoiser), data, tmp_path / "full", "spin_approx", **kw)
    state = torch.load(tmp_path / "full" / "checkpoints" / "step_0000002" / "optimizer.bin", weights_only=False)
    assert (torch.uint8 in _dtypes(state["state"])) == ("optimizer" in setting)  # the states really are 8-bit

    real, calls = trainer._micro_step_loss, itertools.count()

    def dies_in_step_3(*args, **kwargs):
        if next(calls) == 2:
            raise _Killed
        return real(*args, **kwargs)

    out = tmp_path / "killed"
    with monkeypatch.context() as patch, pytest.raises(_Killed):
        patch.setattr(trainer, "_micro_step_loss", dies_in_step_3)
        _train(tiny, copy.deepcopy(tiny.denoiser), models.frozen_copy(tiny.denoiser), data, out, "spin_approx", **kw)
    resumed = copy.deepcopy(tiny.denoiser)
    result, _ = _train(tiny, resumed, models.frozen_copy(tiny.denoiser), data, out, "spin_approx", **kw)
    assert result.resumed_from == 2
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_lora_with_ema_averages_the_adapters_only(tiny, tmp_path):
    policy = copy.deepcopy(tiny.denoiser)
    add_lora(policy, rank=2, alpha=2.0, target_modules=LORA_TARGETS)
    before = _snapshot(policy)
    _train(tiny, policy, None, _pairs(), tmp_path, "spin_approx", ema_decay=0.9, max_steps=2)
    assert _changed(before, policy) and all("lora" in name for name in _changed(before, policy))


def _validation(tiny, folder: Path):
    from spin_diffusion.model_eval import Validation

    prompts = ["a red circle", "a blue square"]
    return Validation(
        c=tiny,
        prompts=prompts,
        embeds=encoding.encode(tiny, prompts),
        negative_embed=tiny.family.negative(tiny, ""),
        folder=folder,
        every=2,
        seeds=[11, 12],
        num_steps=2,
        guidance_scale=2.0,
        batch_size=2,
    )


def test_validation_images_are_saved_logged_and_change_nothing(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    kw = dict(max_steps=4, report_to="tensorboard", ema_decay=0.5)
    plain = copy.deepcopy(tiny.denoiser)
    _train(tiny, plain, models.frozen_copy(tiny.denoiser), _pairs(), tmp_path / "plain", "spin_approx", **kw)
    policy = copy.deepcopy(tiny.denoiser)
    out = tmp_path / "iter_01" / "train"
    validation = _validation(tiny, tmp_path / "iter_01" / "validation")
    _train(tiny, policy, models.frozen_copy(tiny.denoiser), _pairs(), out, "spin_approx", validation=validation, **kw)

    for name, value in plain.state_dict().items():  # rendering (EMA swapped in and back) leaves training alone
        assert torch.equal(policy.state_dict()[name], value), name
    steps = sorted(p.name for p in validation.folder.iterdir())
    assert steps == ["step_0000002", "step_0000004"]
    for step in steps:
        assert sorted(p.name for p in (validation.folder / step).iterdir()) == ["00000.png", "00001.png"]
    # the last render used the EMA weights, which are what the run returns: rendering those again gives the same
    from PIL import Image

    from spin_diffusion.model_eval import render_images

    again = render_images(
        tiny, policy, validation.embeds, validation.negative_embed, seeds=[11, 12], num_steps=2, guidance_scale=2.0,
        batch_size=2,
    )  # fmt: skip
    for i, image in enumerate(again):
        with Image.open(validation.folder / "step_0000004" / f"{i:05d}.png") as saved:
            assert list(saved.convert("RGB").getdata()) == list(image.getdata())
    logged = set()
    for events in {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        tags = [tag for tag in accumulator.Tags()["images"] if tag.startswith("validation")]
        logged |= {(tag, e.step, e.height) for tag in tags for e in accumulator.Images(tag)}  # one grid
    assert {step for _, step, _ in logged} == {2, 4} and {height for *_, height in logged} == {again[0].height}


def test_tf32_is_set_on_cuda_devices_only():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        trainer.set_tf32(not before[0], torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 == before[0]
        trainer.set_tf32(True, torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        trainer.set_tf32(False, torch.device("cuda"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_trackers_get_the_whole_config_and_can_be_off(tiny, tmp_path, monkeypatch):
    import yaml

    from spin_diffusion.config import hparams, load_config

    flat = hparams(load_config(None, ["data.random_flip=true"]))
    assert flat["data.random_flip"] is True and flat["model.path"] == "null" and flat["loss.beta"] == 5000.0
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())

    _train(tiny, copy.deepcopy(tiny.denoiser), None, _pairs(), tmp_path / "none", "sft", max_steps=1, report_to="none")
    assert not (tmp_path / "none" / "tensorboard").exists() and (tmp_path / "none" / "train_log.jsonl").is_file()

    result = trainer.train(
        copy.deepcopy(tiny.denoiser),
        None,
        _pairs(),
        objective="sft",
        loss_cfg=LossConfig(objective="sft"),
        train_cfg=TrainConfig(batch_size=2, max_steps=1, learning_rate=1e-4),
        family=tiny.family,
        out_dir=tmp_path / "tb",
        seed=0,
        progress=False,
        hparams=flat,
    )
    assert result.steps == 1
    (stored,) = (tmp_path / "tb" / "tensorboard").rglob("hparams.yml")
    values = yaml.safe_load(stored.read_text())
    assert values["data.random_flip"] is True and values["objective"] == "sft" and values["learning_rate"] == 1e-4


def test_wandb_offline_writes_a_local_run_with_the_config(tiny, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from spin_diffusion.config import hparams, load_config

    monkeypatch.setenv("WANDB_MODE", "offline")  # the real package, no network
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "iter_01" / "train"
    trainer.train(
        copy.deepcopy(tiny.denoiser),
        None,
        _pairs(),
        objective="sft",
        loss_cfg=LossConfig(objective="sft"),
        train_cfg=TrainConfig(batch_size=2, max_steps=2, learning_rate=1e-4, report_to="wandb"),
        family=tiny.family,
        out_dir=out,
        seed=0,
        progress=False,
        hparams=hparams(load_config(None, ["data.random_crop=true"])),
    )
    (run,) = (out / "wandb").glob("offline-run-*")
    (records,) = run.glob("*.wandb")
    data = records.read_bytes()
    assert b"data.random_crop" in data and b"loss.beta" in data  # the config, as hyper-parameters
    assert b"loss" in data and not (out / "tensorboard").exists()


# ------------------------------------------------------------------ caption contrast, DDO, opponent pool (issue 28)


def test_caption_table_and_mismatched_captions_never_pick_the_own_caption():
    captions = ["a red circle", "a blue circle", "a red square", "a red circle", "two green dots"]
    ids, first_row, near = trainer.caption_table(captions, one_word=True)
    assert ids.tolist() == [0, 1, 2, 0, 3] and first_row.tolist() == [0, 1, 2, 4]
    # one-word neighbours: red circle <-> blue circle, red circle <-> red square; "two green dots" has none
    assert [n.tolist() for n in near] == [[1, 2], [0], [0], []]
    assert trainer.caption_table(captions, one_word=False)[2] is None
    uniform = torch.linspace(0, 0.999, 50)
    for u in range(4):
        rows = torch.full((50,), u)
        for neighbours in (near, None):
            other = trainer.mismatched_captions(rows, uniform, 4, neighbours)
            assert not (other == u).any()
            expected = set(near[u].tolist()) if neighbours is not None and len(near[u]) else set(range(4)) - {u}
            assert set(other.tolist()) == expected  # every allowed caption is drawn, and only those
    with pytest.raises(ValueError, match="at least 2 distinct captions"):
        trainer.caption_table(["same", "same"], one_word=True)


def _with_captions(data: trainer.TrainData) -> trainer.TrainData:
    """Every row its own caption (the random embeddings of `_pairs` are distinct), drawn at random for c′."""
    data.caption_ids, data.caption_first_row = torch.arange(len(data)), torch.arange(len(data))
    return data


def test_micro_batches_pool_contrast_and_ddo_draws_depend_only_on_the_stream_position(tiny):
    """W ranks × B pairs and 1 rank × W·B pairs get the same losers from the pool, the same c′ and the same DDO
    draws (they are keyed by the pair's place in the stream), and a resume at micro-step m gets micro-step m again.
    DDO's generated image is noised with its row's real image's ε (the paper's Appendix D code shares (σ, ε)).
    The pool's loser for a row comes from an iteration that holds that row; rows the earlier iteration did not
    sample always get the latest's."""
    n = 8
    data = _with_captions(_pairs(n))
    old = torch.randn(n, *LATENT_SHAPE)
    data.loser_pool = (old,)
    data.loser_pool_has = torch.tensor([[True] * 6 + [False] * 2])
    kw = dict(objective="ddo", k_steps=1, share_noise=True, process=tiny.family.process,
              exact_steps=None, caption_dropout=0.0, contrast=True)  # fmt: skip

    def items(world, rank, bsz, first, count):
        mb = trainer._MicroBatches(data, 7, batch_size=bsz, world_size=world, rank=rank, first_micro_step=first,
                                   num_micro_steps=count, **kw)  # fmt: skip
        return [mb[i] for i in range(count)]

    one = items(1, 0, 4, 0, 4)
    two = [items(2, r, 2, 0, 4) for r in (0, 1)]
    for m in range(4):
        for key in ("idx", "loser", "loser_noise", "t_or_step", "noise"):
            torch.testing.assert_close(torch.cat([two[0][m][key], two[1][m][key]]), one[m][key], msg=key)
        torch.testing.assert_close(
            torch.cat(
                [two[0][m]["mismatch_context"]["prompt_embeds"], two[1][m]["mismatch_context"]["prompt_embeds"]]
            ),
            one[m]["mismatch_context"]["prompt_embeds"],
        )
    resumed = items(1, 0, 4, 2, 2)
    torch.testing.assert_close(resumed[0]["loser"], one[2]["loser"])
    sources = []
    for item in one:
        torch.testing.assert_close(item["loser_noise"], item["noise"])  # DDO: one ε per row, real and generated
        assert "loser_t_or_step" not in item  # and one t
        for i, loser in zip(item["idx"].tolist(), item["loser"], strict=True):
            from_old, from_latest = torch.equal(loser, old[i]), torch.equal(loser, data.loser[i])
            assert from_old or from_latest
            assert from_latest or i < 6
            sources.append(from_old)
        for i, ctx in zip(item["idx"].tolist(), item["mismatch_context"]["prompt_embeds"], strict=True):
            assert not torch.equal(ctx, data.prompt_embeds.embeds[i])  # c′ is never the pair's own caption
    assert 0 < sum(sources) < len(sources)  # both iterations of the pool supply losers


def test_caption_contrast_promise_the_true_caption_gains_over_the_mismatched_one(tiny, tmp_path):
    """A few steps of objective caption_contrast on two images with two captions (each one's c′ is the other): on
    fixed (t, ε) draws the policy's error under the true caption falls relative to the mismatched caption's, from
    the reference's slight preference for the wrong caption to a preference for the right one."""
    data = _with_captions(_pairs(2))
    ref = models.frozen_copy(tiny.denoiser)
    policy = copy.deepcopy(tiny.denoiser)

    @torch.no_grad()
    def gap(unet):  # mean over rows and draws of e(x | c′) − e(x | c)
        g = torch.Generator().manual_seed(99)
        rows = torch.arange(2).repeat_interleave(32)
        eps = torch.randn(len(rows), *LATENT_SHAPE, generator=g)
        t = torch.randint(0, 1000, (len(rows),), generator=g)
        x_t = tiny.noise_scheduler().add_noise(data.winner[rows], eps, t)
        emb = data.prompt_embeds.embeds
        err = {c: losses.denoise_error(unet(x_t, t, encoder_hidden_states=emb[r]).sample, eps) for c, r in
               (("true", rows), ("other", 1 - rows))}  # fmt: skip
        return (err["other"] - err["true"]).mean().item()

    _, log = _train(tiny, policy, ref, data, tmp_path, "caption_contrast", max_steps=12, batch_size=2, beta=500.0)
    assert log[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert gap(ref) < 0 < gap(policy)
    assert gap(policy) - gap(ref) > 5e-4


def test_caption_contrast_beside_spin_adds_its_term(tiny, tmp_path):
    """loss = SPIN's + w · contrast: both are log 2 at the first step; the term is logged."""
    data = _with_captions(_pairs(8))
    result = trainer.train(
        copy.deepcopy(tiny.denoiser), models.frozen_copy(tiny.denoiser), data, objective="spin_approx",
        loss_cfg=LossConfig(objective="spin_approx", beta=2000.0, caption_contrast_weight=0.5),
        train_cfg=_cfg(max_steps=2), family=tiny.family, out_dir=tmp_path, seed=0, progress=False,
    )  # fmt: skip
    log = _log(result.log_path)
    assert log[0]["loss"] == pytest.approx(1.5 * LOG2, abs=1e-6)
    assert log[0]["caption_contrast_term"] == pytest.approx(0.5 * LOG2, abs=1e-6)
    assert "caption_margin" in log[1]


def test_ddo_promise_the_discriminator_separates_real_from_generated(tiny, tmp_path):
    """A few DDO steps: on fixed draws the implicit discriminator r = −(β/2)(e^θ − e^ref) is positive on the real
    images and negative on the generated ones (two separate terms); the loss starts at 2·log 2. The "generated"
    latents come from another distribution than the real ones (0.5·N(0, 1) + 1.5), as θ_k's samples do."""
    data = _pairs(8)
    data.loser = 0.5 * data.loser + 1.5
    ref = models.frozen_copy(tiny.denoiser)
    policy = copy.deepcopy(tiny.denoiser)
    _, log = _train(tiny, policy, ref, data, tmp_path, "ddo", max_steps=8, batch_size=4, beta=2000.0)
    assert log[0]["loss"] == pytest.approx(2 * LOG2, abs=1e-6)
    after, before = _eval_errors(tiny, policy, data, draws=16), _eval_errors(tiny, ref, data, draws=16)
    assert (after.winner - before.winner).mean() < 0  # r on real > 0
    assert (after.loser - before.loser).mean() > 0  # r on generated < 0


def test_exact_guard_uses_the_noise_free_loser_target(tiny, tmp_path):
    """spin_exact at η = 1 with guidance: the stored step x'_{t-1} = A x'_t + B ε_guided + σ z gives the noisy target
    ε̃' = ε_guided + (σ/B) z. The guard must use ε_guided (θ_k's guided prediction, the mean of ε̃' given x'_t): its λ
    is the same for any step noise z and equals Diffusion-SDPO's formula on (pred_w − ε_w, pred_l − ε_guided), where
    the noisy target would give another λ. The winner is set so that x_t = x'_t and g_w ≈ g_l / 2, which makes
    g_w·g_l > 0 and λ ≈ ¼ < 1, so that the two targets can be told apart."""
    from accelerate import Accelerator

    from spin_diffusion.families import Cond

    scale, mu, b = 2.0, 0.5, 4
    data = _pairs(b)
    negative = torch.zeros(1, SEQ_LEN, EMBED_DIM)
    spec = sampling.GenerationSpec(
        run_seed=0, iteration=0, num_prompts=b, num_steps=4, guidance_scale=scale, eta=1.0,
        latent_shape=LATENT_SHAPE, store_trajectory=True, shard_size=4,
    )  # fmt: skip
    sampling.generate_shards(tiny.denoiser, tiny.family, data.prompt_embeds, negative, tmp_path / "gen", spec,
                             batch_size=4, progress=False)  # fmt: skip
    gen = sampling.load_generated(tmp_path / "gen")
    sampler = sampling.SamplerSchedule.of(gen)
    process, unet = tiny.family.process, tiny.denoiser
    step = torch.full((b,), 1)
    t = process.exact_time(sampler, step)
    x_t = gen.trajectory[torch.arange(b)][:, 1]
    ctx = data.prompt_embeds.embeds
    with torch.no_grad():
        cond = process.exact_space(unet(x_t, t, encoder_hidden_states=ctx).sample, x_t, t)
        uncond = process.exact_space(unet(x_t, t, encoder_hidden_states=negative.expand(b, -1, -1)).sample, x_t, t)
    guided = uncond + scale * (cond - uncond)
    coef_a, coef_b = sampling.ddim_coefficients(
        sampler.timesteps, step, sampler.alphas_cumprod, sampler.final_alpha_cumprod, sampler.eta
    )
    shape = (-1, 1, 1, 1)
    a_bar = process.alphas_cumprod[t].reshape(shape).float()
    gap = cond - guided  # the guidance gap, what g_l is at θ = θ_k
    delta = torch.randn(b, *LATENT_SHAPE, generator=torch.Generator().manual_seed(3))
    eps_w = cond - 0.5 * gap + 0.05 * gap.std() * delta  # g_w ≈ g_l / 2: λ ≈ (1 − μ)·¼/½ = ¼
    winner = (x_t - (1 - a_bar).sqrt() * eps_w) / a_bar.sqrt()  # so that noised(winner, eps_w, t) = x_t
    accelerator = Accelerator(cpu=True)
    lambdas, noisy = [], []
    for seed in (1, 2):
        z = torch.randn(b, *LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))
        x_prev = (coef_a.reshape(shape) * x_t + coef_b.reshape(shape) * guided).float() + 0.5 * z
        batch = {"winner": winner, "context": {"prompt_embeds": ctx}, "t_or_step": step, "noise": eps_w,
                 "loser_noise": eps_w, "loser_t": x_t, "loser_prev": x_prev}  # fmt: skip
        _, metrics = trainer._micro_step_loss(
            unet, models.frozen_copy(unet), batch, objective="spin_exact",
            loss_cfg=LossConfig(objective="spin_exact", beta=2000.0, loser_guard=mu), family=tiny.family,
            accelerator=accelerator, sampler=sampler, opponent_guidance=(scale, Cond(negative)),
        )  # fmt: skip
        lambdas.append(metrics["loser_guard_lambda"])
        implied = sampler.implied_target(x_t, x_prev, step)
        noisy.append(losses.loser_guard_scale(cond - eps_w, cond - implied, mu))
    expected = losses.loser_guard_scale(cond - eps_w, cond - guided, mu)
    torch.testing.assert_close(lambdas[0], lambdas[1])
    torch.testing.assert_close(lambdas[0], expected, atol=1e-4, rtol=1e-4)
    assert (expected < 0.99).all()
    assert not torch.allclose(noisy[0], expected, atol=1e-3)


# ------------------------------------------------------------------ the reference's terms computed before training


def _stochastic_guided_samples(tiny, tmp_path: Path) -> trainer.TrainData:
    """spin_exact data from an opponent that sampled with η = 1 and guidance 2 (the guard then needs θ_k's guided
    loser prediction, which precompute stores)."""
    data = _pairs(8)
    negative = torch.zeros(1, SEQ_LEN, EMBED_DIM)
    spec = sampling.GenerationSpec(run_seed=0, iteration=0, num_prompts=8, num_steps=4, guidance_scale=2.0, eta=1.0,
                                   latent_shape=LATENT_SHAPE, store_trajectory=True, shard_size=4)  # fmt: skip
    sampling.generate_shards(tiny.denoiser, tiny.family, data.prompt_embeds, negative, tmp_path, spec, batch_size=4,
                             progress=False)  # fmt: skip
    gen = sampling.load_generated(tmp_path)
    data.loser, data.loser_trajectory = gen.latents, gen.trajectory
    data.sampler = sampling.SamplerSchedule.of(gen)
    data.guidance_scale, data.negative_embed = 2.0, families.Cond(negative)
    return data


PRECOMPUTE_CASES = {
    "spin_approx": ("spin_approx", {}, {}),
    "spin_exact_guard_eta1_cfg": ("spin_exact", {"loser_guard": 0.5, "timesteps_per_pair": 2}, {}),
    "dpo_accumulation": ("dpo", {"sft_weight": 0.5}, {"gradient_accumulation_steps": 2}),
    "spin_approx_caption_contrast": ("spin_approx", {"caption_contrast_weight": 1.0}, {"caption_dropout": 0.3}),
    "caption_contrast": ("caption_contrast", {}, {}),
    "lora": ("spin_approx", {"loser_guard": 0.5}, {}),
    "bf16": ("spin_approx", {}, {"mixed_precision": "bf16"}),
}


@pytest.mark.parametrize("case", list(PRECOMPUTE_CASES))
def test_precomputed_reference_trains_bit_identically_without_a_reference_model(tiny, tmp_path, case):
    """train.precompute_reference: the reference's terms computed before training (trainer.reference_outputs, on
    θ_k itself) and read back per micro-step train exactly as the frozen reference model does, bit for bit: every
    objective with a reference, the exact path's guard at η = 1 with guidance (its guided loser target is stored),
    K = 2 timesteps, accumulation, caption dropout and contrast, LoRA (reference = θ_k, adapters off) and bf16
    mixed precision (the bf16 reference copy is made for the precompute and freed)."""
    objective, loss_kw, train_kw = PRECOMPUTE_CASES[case]
    if objective == "spin_exact":
        data = _stochastic_guided_samples(tiny, tmp_path / "generated")
    else:
        data = _pairs()
    if "caption_contrast" in case:
        data = _with_captions(data)
        data.empty_embed = torch.zeros(1, SEQ_LEN, EMBED_DIM)
    lora = case == "lora"
    loss_cfg = LossConfig(objective=objective, beta=5000.0, **loss_kw)
    train_cfg = _cfg(max_steps=3, **train_kw)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    weights, logs = {}, {}
    try:
        for mode in ("model", "precomputed"):
            policy = copy.deepcopy(tiny.denoiser)
            ref = reference = None
            if mode == "precomputed":
                outputs = list(trainer.reference_outputs(policy, data, objective=objective, loss_cfg=loss_cfg,
                                                         train_cfg=train_cfg, family=tiny.family, seed=3,
                                                         lora=lora))  # fmt: skip
                assert [m for m, _, _ in outputs] == list(range(3 * train_cfg.gradient_accumulation_steps))
                guided = [g for _, _, g in outputs if g is not None]
                assert len(guided) == (len(outputs) if case == "spin_exact_guard_eta1_cfg" else 0)
                reference = trainer.ReferenceOutputs(
                    torch.cat([e for _, e, _ in outputs]), torch.cat(guided) if guided else None
                )
            elif not lora:
                ref = models.frozen_copy(tiny.denoiser)
            if lora:
                add_lora(policy, rank=4, alpha=4, target_modules=LORA_TARGETS, seed=0)
            result = trainer.train(policy, ref, data, objective=objective, loss_cfg=loss_cfg, train_cfg=train_cfg,
                                   family=tiny.family, out_dir=tmp_path / mode, seed=3, progress=False,
                                   reference=reference)  # fmt: skip
            weights[mode], logs[mode] = _snapshot(result.policy), _log(result.log_path)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert logs["model"] == logs["precomputed"]  # every logged metric, the guard's λ and the contrast included
    assert logs["model"][-1]["loss"] != pytest.approx(LOG2, abs=1e-3)  # it trained
    assert all(torch.equal(weights["model"][k], weights["precomputed"][k]) for k in weights["model"])


def test_precomputed_reference_is_refused_where_it_does_not_apply(tiny, tmp_path):
    data = _pairs()
    stored = trainer.ReferenceOutputs(torch.zeros(4, 2, 1))
    with pytest.raises(ValueError, match="replaces `ref`"):  # beside a reference model
        trainer.train(copy.deepcopy(tiny.denoiser), models.frozen_copy(tiny.denoiser), data, objective="spin_approx",
                      loss_cfg=LossConfig(), train_cfg=_cfg(), family=tiny.family, out_dir=tmp_path, seed=0,
                      progress=False, reference=stored)  # fmt: skip
    with pytest.raises(ValueError, match="fewer visits"):  # 2 steps × 2 pairs need 4 rows
        trainer.train(copy.deepcopy(tiny.denoiser), None, data, objective="spin_approx", loss_cfg=LossConfig(),
                      train_cfg=_cfg(max_steps=3), family=tiny.family, out_dir=tmp_path, seed=0, progress=False,
                      reference=stored)  # fmt: skip
    with pytest.raises(ValueError, match="replaces `ref`"):  # sft has no reference
        next(trainer.reference_outputs(tiny.denoiser, data, objective="sft", loss_cfg=LossConfig(objective="sft"),
                                       train_cfg=_cfg(), family=tiny.family, seed=0))  # fmt: skip
