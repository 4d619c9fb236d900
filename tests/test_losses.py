"""Unit tests for spin_diffusion.losses: hand-computed values and the invariants of DESIGN.md."""

from __future__ import annotations

import ast
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from spin_diffusion import losses
from spin_diffusion.losses import (
    DenoiseErrors,
    denoise_error,
    dpo_loss,
    sft_loss,
    spin_approx_loss,
    spin_exact_loss,
)

PREFERENCE_LOSSES = [dpo_loss, spin_approx_loss, spin_exact_loss]
LossFn = Callable[[DenoiseErrors, DenoiseErrors, float], tuple[torch.Tensor, dict[str, torch.Tensor]]]
METRIC_NAMES = {"margin", "reward_winner", "reward_loser", "accuracy", "policy_error_winner", "policy_error_loser"}
LOG2 = math.log(2.0)
L_PLUS1 = math.log1p(math.exp(-1.0))  # ℓ(+1) = −log σ(1) = log(1 + e^{−1}) ≈ 0.3133
L_MINUS1 = math.log1p(math.exp(1.0))  # ℓ(−1) = −log σ(−1) = log(1 + e^{+1}) ≈ 1.3133


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(16)


def _random_errors(b: int, k: int, *, requires_grad: bool = False) -> DenoiseErrors:
    """Positive errors around 1, like per-element MSEs of a unit-variance ε prediction."""
    w = (torch.rand(b, k, dtype=torch.float64) + 0.5).requires_grad_(requires_grad)
    l_ = (torch.rand(b, k, dtype=torch.float64) + 0.5).requires_grad_(requires_grad)
    return DenoiseErrors(w, l_)


def _hand_pair() -> tuple[DenoiseErrors, DenoiseErrors]:
    """B = 2 pairs, K = 2 timesteps, for β = 2 (so the logit is z = −Δ).

    Pair 0: policy.winner = [0, 2], ref.winner = [1, 1], losers all 1
            -> Δ = [−1, +1] -> z = [+1, −1]   (the two timesteps disagree)
    Pair 1: winners all 1, policy.loser = [2, 2], ref.loser = [1, 1]
            -> Δ = [0 − 1, 0 − 1] = [−1, −1] -> z = [+1, +1]
    """
    policy = DenoiseErrors(torch.tensor([[0.0, 2.0], [1.0, 1.0]]), torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    ref = DenoiseErrors(torch.ones(2, 2), torch.ones(2, 2))
    return policy, ref


# --- hand-computed values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", [dpo_loss, spin_approx_loss])
def test_logistic_outside_hand_values(loss_fn: LossFn) -> None:
    """dpo / approx = mean_k ℓ(z_k).

    Pair 0: (ℓ(+1) + ℓ(−1)) / 2 = (0.3133 + 1.3133) / 2 = 0.8133
    Pair 1: (ℓ(+1) + ℓ(+1)) / 2 = ℓ(+1) = 0.3133
    """
    policy, ref = _hand_pair()
    loss, _ = loss_fn(policy, ref, 2.0)
    torch.testing.assert_close(loss, torch.tensor([(L_PLUS1 + L_MINUS1) / 2, L_PLUS1]))


def test_exact_hand_values() -> None:
    """exact = ℓ(mean_k z_k).

    Pair 0: ℓ((+1 − 1) / 2) = ℓ(0) = log 2 = 0.6931  (< 0.8133 of approx: Jensen)
    Pair 1: ℓ((+1 + 1) / 2) = ℓ(+1) = 0.3133        (= approx: z constant over k)
    """
    policy, ref = _hand_pair()
    loss, _ = spin_exact_loss(policy, ref, 2.0)
    torch.testing.assert_close(loss, torch.tensor([LOG2, L_PLUS1]))


@pytest.mark.parametrize("loss_fn", PREFERENCE_LOSSES)
def test_hand_metrics(loss_fn: LossFn) -> None:
    """β = 2 -> scale −1.

    reward_winner = −mean_k(policy.winner − ref.winner): pair 0 −mean(−1, +1) = 0; pair 1 0
    reward_loser  = −mean_k(policy.loser − ref.loser):   pair 0 0;              pair 1 −mean(1, 1) = −1
    margin = reward_winner − reward_loser = mean_k z_k = [0, 1]; accuracy = margin > 0 = [0, 1]
    policy_error_winner = mean_k policy.winner = [1, 1]; policy_error_loser = [1, 2]
    """
    policy, ref = _hand_pair()
    _, m = loss_fn(policy, ref, 2.0)
    assert set(m) == METRIC_NAMES
    torch.testing.assert_close(m["reward_winner"], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(m["reward_loser"], torch.tensor([0.0, -1.0]))
    torch.testing.assert_close(m["margin"], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(m["accuracy"], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(m["policy_error_winner"], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(m["policy_error_loser"], torch.tensor([1.0, 2.0]))


def test_beta_scales_logit_with_half() -> None:
    """β = 5000, Δ = −4e-4 -> z = −(5000/2)·(−4e-4) = +1 -> loss ℓ(1) (Diffusion-DPO `scale_term = -0.5*beta`)."""
    policy = DenoiseErrors(torch.tensor([0.1000]), torch.tensor([0.1004]))
    ref = DenoiseErrors(torch.tensor([0.1000]), torch.tensor([0.1000]))
    for loss_fn in PREFERENCE_LOSSES:
        loss, m = loss_fn(policy, ref, 5000.0)
        torch.testing.assert_close(loss, torch.tensor([L_PLUS1]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m["margin"], torch.tensor([1.0]), rtol=1e-4, atol=1e-4)


def test_sft_hand_values() -> None:
    """sft = mean_k policy.winner: [[1, 3], [2, 2]] -> [2, 2]; [B] input -> itself (K = 1)."""
    errors = torch.tensor([[1.0, 3.0], [2.0, 2.0]], requires_grad=True)
    loss, m = sft_loss(errors)
    torch.testing.assert_close(loss, torch.tensor([2.0, 2.0]))
    assert set(m) == {"policy_error_winner"}
    torch.testing.assert_close(m["policy_error_winner"], torch.tensor([2.0, 2.0]))
    assert not m["policy_error_winner"].requires_grad
    loss.sum().backward()
    torch.testing.assert_close(errors.grad, torch.full((2, 2), 0.5))
    torch.testing.assert_close(sft_loss(torch.tensor([0.25, 4.0]))[0], torch.tensor([0.25, 4.0]))


@pytest.mark.parametrize(
    ("loss_fn", "plain"),
    [
        (dpo_loss, [(L_PLUS1 + L_MINUS1) / 2, L_PLUS1]),
        (spin_approx_loss, [(L_PLUS1 + L_MINUS1) / 2, L_PLUS1]),
        (spin_exact_loss, [LOG2, L_PLUS1]),
    ],
)
def test_sft_weight_adds_lambda_times_winner_error(loss_fn: LossFn, plain: list[float]) -> None:
    """λ = 0.5 on the hand pair (β = 2): mean_k policy.winner = [mean(0, 2), mean(1, 1)] = [1, 1]
    -> sft_term = 0.5·[1, 1] = [0.5, 0.5], added to the plain values of the tests above. The preference
    metrics do not change."""
    policy, ref = _hand_pair()
    loss, m = loss_fn(policy, ref, 2.0, sft_weight=0.5)
    torch.testing.assert_close(loss, torch.tensor(plain) + 0.5)
    torch.testing.assert_close(m["sft_term"], torch.tensor([0.5, 0.5]))
    _, m_plain = loss_fn(policy, ref, 2.0)
    assert set(m) == METRIC_NAMES | {"sft_term"} and set(m_plain) == METRIC_NAMES  # λ = 0: no sft_term key
    for name in METRIC_NAMES:
        torch.testing.assert_close(m[name], m_plain[name])


@pytest.mark.parametrize("loss_fn", PREFERENCE_LOSSES)
def test_sft_weight_per_pair_values_and_gradients(loss_fn: LossFn) -> None:
    """policy == ref, so every logit z is 0 and the preference part is log 2 (β = 2, K = 2).

    policy.winner = [[0.2, 0.6], [1.0, 3.0]] -> mean_k = [0.4, 2.0]; λ = 0.25 -> sft_term = [0.1, 0.5],
    loss = log 2 + [0.1, 0.5].
    Gradients at z = 0: the preference part gives ∂/∂e_w,k = (β/2)·σ(0)/K = (2/2)·(1/2)/2 = 0.25 (and −0.25 on
    the loser) for approx and exact alike; the SFT part adds λ/K = 0.125 on the winner only -> 0.375.
    With λ = β/4 = 0.5 the SFT part is 0.25, equal to the preference part (the rule of thumb in the docstring).
    """
    winner = torch.tensor([[0.2, 0.6], [1.0, 3.0]], dtype=torch.float64)
    loser = torch.tensor([[0.5, 0.5], [0.7, 0.9]], dtype=torch.float64)
    ref = DenoiseErrors(winner.clone(), loser.clone())
    for weight, expected_grad in [(0.25, 0.375), (0.5, 0.5)]:
        policy = DenoiseErrors(winner.clone().requires_grad_(True), loser.clone().requires_grad_(True))
        loss, m = loss_fn(policy, ref, 2.0, sft_weight=weight)
        sft_term = weight * torch.tensor([0.4, 2.0], dtype=torch.float64)
        torch.testing.assert_close(loss, LOG2 + sft_term)
        torch.testing.assert_close(m["sft_term"], sft_term)
        assert not m["sft_term"].requires_grad
        loss.sum().backward()
        torch.testing.assert_close(policy.winner.grad, torch.full((2, 2), expected_grad, dtype=torch.float64))
        torch.testing.assert_close(policy.loser.grad, torch.full((2, 2), -0.25, dtype=torch.float64))


@pytest.mark.parametrize("loss_fn", PREFERENCE_LOSSES)
def test_sft_weight_zero_is_the_plain_loss_and_negative_raises(loss_fn: LossFn) -> None:
    policy, ref = _random_errors(8, 3), _random_errors(8, 3)
    torch.testing.assert_close(loss_fn(policy, ref, 2.0, sft_weight=0.0)[0], loss_fn(policy, ref, 2.0)[0])
    with pytest.raises(ValueError, match="sft_weight must be >= 0"):
        loss_fn(policy, ref, 2.0, sft_weight=-0.1)


# --- invariants ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", PREFERENCE_LOSSES)
@pytest.mark.parametrize("k", [1, 4])
def test_policy_equals_ref_gives_log2(loss_fn: LossFn, k: int) -> None:
    """At initialisation θ = θ_k, every Δ is exactly 0, so the loss is ℓ(0) = log 2 and nothing is 'accurate'."""
    policy = _random_errors(8, k)
    ref = DenoiseErrors(policy.winner.clone(), policy.loser.clone())
    loss, m = loss_fn(policy, ref, 5000.0)
    torch.testing.assert_close(loss, torch.full((8,), LOG2, dtype=torch.float64))
    assert torch.all(m["margin"] == 0)
    assert torch.all(m["accuracy"] == 0)


def test_k1_all_preference_losses_agree() -> None:
    policy, ref = _random_errors(16, 1), _random_errors(16, 1)
    beta = 3.0
    dpo, m_dpo = dpo_loss(policy, ref, beta)
    approx, m_approx = spin_approx_loss(policy, ref, beta)
    exact, m_exact = spin_exact_loss(policy, ref, beta)
    torch.testing.assert_close(approx, dpo)
    torch.testing.assert_close(exact, dpo)
    for name in METRIC_NAMES:
        torch.testing.assert_close(m_approx[name], m_dpo[name])
        torch.testing.assert_close(m_exact[name], m_dpo[name])


def test_dpo_equals_approx_for_k_gt_1() -> None:
    """SPIN-approx is Diffusion-DPO with (real, generated, θ_k) roles; same math for any K."""
    policy, ref = _random_errors(16, 5), _random_errors(16, 5)
    torch.testing.assert_close(spin_approx_loss(policy, ref, 4.0)[0], dpo_loss(policy, ref, 4.0)[0])


def test_approx_upper_bounds_exact() -> None:
    """ℓ is convex, so mean_k ℓ(z_k) ≥ ℓ(mean_k z_k) (Jensen), strictly when the z_k differ."""
    policy, ref = _random_errors(256, 4), _random_errors(256, 4)
    beta = 4.0  # logits of order 1, where ℓ is clearly curved
    approx, _ = spin_approx_loss(policy, ref, beta)
    exact, _ = spin_exact_loss(policy, ref, beta)
    assert torch.all(approx >= exact - 1e-12)
    assert torch.any(approx > exact + 1e-3)


def test_exact_equals_logistic_of_margin() -> None:
    policy, ref = _random_errors(8, 3), _random_errors(8, 3)
    loss, m = spin_exact_loss(policy, ref, 2.5)
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(m["margin"]))
    torch.testing.assert_close(m["margin"], m["reward_winner"] - m["reward_loser"])


@pytest.mark.parametrize("loss_fn", PREFERENCE_LOSSES)
def test_gradient_signs(loss_fn: LossFn) -> None:
    """Lowering the error on the real image lowers the loss; lowering it on the generated image raises it."""
    policy = _random_errors(8, 3, requires_grad=True)
    ref = _random_errors(8, 3)
    loss, m = loss_fn(policy, ref, 2.0)
    loss.mean().backward()
    assert torch.all(policy.winner.grad > 0)
    assert torch.all(policy.loser.grad < 0)
    for name, value in m.items():
        assert value.shape == (8,), name
        assert not value.requires_grad, name


# --- shapes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", PREFERENCE_LOSSES)
def test_1d_inputs_are_k1(loss_fn: LossFn) -> None:
    policy, ref = _random_errors(6, 1), _random_errors(6, 1)
    flat_policy = DenoiseErrors(policy.winner[:, 0], policy.loser[:, 0])
    flat_ref = DenoiseErrors(ref.winner[:, 0], ref.loser[:, 0])
    loss_2d, m_2d = loss_fn(policy, ref, 3.0)
    loss_1d, m_1d = loss_fn(flat_policy, flat_ref, 3.0)
    assert loss_1d.shape == (6,)
    torch.testing.assert_close(loss_1d, loss_2d)
    for name in METRIC_NAMES:
        torch.testing.assert_close(m_1d[name], m_2d[name])


@pytest.mark.parametrize("loss_fn", PREFERENCE_LOSSES)
def test_bad_shapes_raise(loss_fn: LossFn) -> None:
    good = _random_errors(4, 2)
    with pytest.raises(ValueError, match="differ in shape"):  # winner vs loser
        loss_fn(DenoiseErrors(torch.rand(4, 2), torch.rand(4, 3)), good, 1.0)
    with pytest.raises(ValueError, match="differ in shape"):  # policy vs ref
        loss_fn(good, _random_errors(4, 3), 1.0)
    with pytest.raises(ValueError, match=r"\[B, K\]"):  # 3-D
        loss_fn(DenoiseErrors(torch.rand(4, 2, 1), torch.rand(4, 2, 1)), good, 1.0)
    with pytest.raises(ValueError, match=r"\[B, K\]"):  # 0-D
        loss_fn(DenoiseErrors(torch.tensor(1.0), torch.tensor(1.0)), good, 1.0)


def test_sft_bad_shape_raises() -> None:
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        sft_loss(torch.rand(2, 3, 4))


# --- denoise_error ------------------------------------------------------------------------------------------


def test_denoise_error_is_per_sample_mean() -> None:
    pred, target = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    expected = torch.stack([((pred[i] - target[i]) ** 2).sum() / (4 * 5 * 6) for i in range(3)])
    out = denoise_error(pred, target)
    assert out.shape == (3,) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_denoise_error_bf16_upcasts_to_float32() -> None:
    pred = torch.randn(2, 4, 8, 8).to(torch.bfloat16).requires_grad_(True)
    target = torch.randn(2, 4, 8, 8).to(torch.bfloat16)
    out = denoise_error(pred, target)
    assert out.dtype == torch.float32
    expected = (pred.detach().float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert pred.grad is not None and pred.grad.dtype == torch.bfloat16


def test_denoise_error_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        denoise_error(torch.rand(2, 3), torch.rand(2, 4))


# --- layering -----------------------------------------------------------------------------------------------


def test_losses_imports_only_torch() -> None:
    tree = ast.parse(open(losses.__file__, encoding="utf-8").read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "losses.py must not use relative imports"
            roots.add((node.module or "").split(".")[0])
    assert roots <= {"torch", "typing", "math", "__future__"}, roots


# --- DPO-Positive hinge -------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", PREFERENCE_LOSSES)
@pytest.mark.parametrize("lam", [0.5, 50.0])
def test_dpop_hinge_by_formula(loss_fn: LossFn, lam: float) -> None:
    """β = 2: r_w = −(e^θ_w − e^ref_w). Pair 0's winner got worse (r_w = −1): z = −1 + λ·(−1) − r_l; pair 1's got
    better (r_w = +0.5): no hinge. Losers: r_l = −(2 − 1) = −1 for both."""
    policy = DenoiseErrors(torch.tensor([[2.0], [0.5]]), torch.tensor([[2.0], [2.0]]))
    ref = DenoiseErrors(torch.ones(2, 1), torch.ones(2, 1))
    loss, metrics = loss_fn(policy, ref, 2.0, dpop_lambda=lam)
    z = torch.tensor([-1.0 - lam + 1.0, 0.5 + 1.0])
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(z))
    torch.testing.assert_close(metrics["dpop_term"], torch.tensor([-lam, 0.0]))
    torch.testing.assert_close(metrics["margin"], torch.tensor([0.0, 1.5]))  # the margin itself has no hinge
    plain, plain_metrics = loss_fn(policy, ref, 2.0)
    assert "dpop_term" not in plain_metrics
    assert loss[1] == plain[1] and loss[0] > plain[0]


def test_dpop_hinge_exact_acts_on_the_trajectory_mean() -> None:
    """spin_exact: the hinge is λ·min(0, mean_k r_w) (the whole trajectory's log-ratio), approx: mean_k of the
    per-timestep hinge. r_w = [+1, −3] (β = 2): exact hinge λ·min(0, −1) = −λ; approx hinge per k [0, −3λ]."""
    policy = DenoiseErrors(torch.tensor([[0.0, 4.0]]), torch.ones(1, 2))
    ref = DenoiseErrors(torch.ones(1, 2), torch.ones(1, 2))
    lam = 2.0
    exact, m_exact = spin_exact_loss(policy, ref, 2.0, dpop_lambda=lam)
    approx, m_approx = spin_approx_loss(policy, ref, 2.0, dpop_lambda=lam)
    torch.testing.assert_close(exact, -torch.nn.functional.logsigmoid(torch.tensor([-1.0 - lam])))
    z_k = torch.tensor([1.0, -3.0 - 3.0 * lam])
    torch.testing.assert_close(approx, -torch.nn.functional.logsigmoid(z_k).mean().reshape(1))
    torch.testing.assert_close(m_exact["dpop_term"], torch.tensor([-lam]))
    torch.testing.assert_close(m_approx["dpop_term"], torch.tensor([-1.5 * lam]))


@pytest.mark.parametrize("loss_fn", PREFERENCE_LOSSES)
def test_dpop_hinge_multiplies_the_winner_gradient_by_one_plus_lambda(loss_fn: LossFn) -> None:
    """Where the winner got worse than the reference, ∂z/∂e^θ_w is (1 + λ) times the plain one; the loser's is the
    plain one (evaluated at the hinged logit)."""
    lam = 3.0
    w = torch.tensor([[1.2]], dtype=torch.float64, requires_grad=True)
    l_ = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    ref = DenoiseErrors(torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    beta = 10.0
    loss, _ = loss_fn(DenoiseErrors(w, l_), ref, beta, dpop_lambda=lam)
    gw, gl = torch.autograd.grad(loss.sum(), [w, l_])
    z = -(beta / 2) * 0.2 * (1 + lam)
    s = torch.sigmoid(torch.tensor(-z, dtype=torch.float64))
    torch.testing.assert_close(gw, (beta / 2) * (1 + lam) * s.reshape(1, 1))
    torch.testing.assert_close(gl, -(beta / 2) * s.reshape(1, 1))


@pytest.mark.parametrize("loss_fn", PREFERENCE_LOSSES)
def test_negative_dpop_lambda_raises(loss_fn: LossFn) -> None:
    policy, ref = _hand_pair()
    with pytest.raises(ValueError, match="dpop_lambda must be >= 0"):
        loss_fn(policy, ref, 1.0, dpop_lambda=-1.0)


# --- Diffusion-SDPO's loser guard ---------------------------------------------------------------------------


def test_loser_guard_scale_by_formula() -> None:
    """λ = clamp((1−μ)‖g_w‖² / (g_w·g_l), 0, 1) where g_w·g_l > 0, else 1; one value per row."""
    r_w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    r_l = torch.tensor([[2.0, 0.0], [-1.0, 5.0], [0.1, 0.0], [1.0, 1.0], [3.0, 4.0]])
    for mu in (0.0, 0.5, 0.9, 1.0):
        lam = losses.loser_guard_scale(r_w, r_l, mu)
        expected = torch.tensor([min(1.0, (1 - mu) / 2), 1.0, min(1.0, (1 - mu) / 0.1), 1.0, 1 - mu])
        torch.testing.assert_close(lam, expected)
    # rows may carry any latent shape; the factor 2/numel of the MSE gradient cancels in the ratio
    lam4d = losses.loser_guard_scale(r_w.reshape(5, 2, 1, 1), r_l.reshape(5, 2, 1, 1), 0.5)
    torch.testing.assert_close(lam4d, losses.loser_guard_scale(r_w, r_l, 0.5))


@pytest.mark.parametrize("mu", [-0.1, 1.1, float("nan")])
def test_loser_guard_mu_outside_unit_interval_raises(mu: float) -> None:
    with pytest.raises(ValueError, match=r"mu must be in \[0, 1\]"):
        losses.loser_guard_scale(torch.ones(2, 3), torch.ones(2, 3), mu)


def test_scale_gradient_keeps_value_scales_gradient() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    scale = torch.tensor([[0.25, 1.0], [0.0, 0.5]])
    y = losses.scale_gradient(x, scale)
    torch.testing.assert_close(y, x.detach())
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, scale)


def _linear_model_step(loss_fn: LossFn, mu: float | None, gen: torch.Generator, lam_p: float = 0.0):
    """A small linear model, pred = φ·W, with one one-hot input φ_i per pair shared by the pair's winner and loser
    (as the trainer's pairs share prompt, time and noise), so output-space and parameter-space inner products agree.
    Returns the first-order change of each pair's winner error along one SGD step: ∇_W A_i · (−∇_W loss)."""
    b, d = 6, 5
    phi = torch.eye(b, dtype=torch.float64)
    w0 = torch.randn(b, d, generator=gen, dtype=torch.float64)
    w = (w0 + 0.3 * torch.randn(b, d, generator=gen, dtype=torch.float64)).requires_grad_(True)
    y_w = torch.randn(b, d, generator=gen, dtype=torch.float64)
    # losers whose residual often points along the winner's: the case where widening the margin hurts the winner
    y_l = (
        y_w
        + torch.randn(b, 1, generator=gen, dtype=torch.float64) * (w0 - y_w)
        + 0.5 * torch.randn(b, d, generator=gen, dtype=torch.float64)
    )
    pred, ref_pred = phi @ w, phi @ w0
    policy = DenoiseErrors(denoise_error(pred, y_w).unsqueeze(1), denoise_error(pred, y_l).unsqueeze(1))
    ref = DenoiseErrors(denoise_error(ref_pred, y_w).unsqueeze(1), denoise_error(ref_pred, y_l).unsqueeze(1))
    if mu is not None:
        lam = losses.loser_guard_scale(pred - y_w, pred - y_l, mu).reshape(b, 1)
        policy = policy._replace(loser=losses.scale_gradient(policy.loser, lam))
    loss, _ = loss_fn(policy, ref, 50.0, dpop_lambda=lam_p)
    (grad,) = torch.autograd.grad(loss.sum(), w, retain_graph=True)
    changes = []
    for i in range(b):
        (grad_a,) = torch.autograd.grad(policy.winner[i, 0], w, retain_graph=True)
        changes.append(float((grad_a * -grad).sum()))
    return changes


@pytest.mark.parametrize("loss_fn", PREFERENCE_LOSSES)
@pytest.mark.parametrize("hinge", [0.0, 5.0])
def test_loser_guard_never_raises_the_winner_error_to_first_order(loss_fn: LossFn, hinge: float) -> None:
    """The guard's promise on a linear model: over many random draws, every pair's winner error does not rise to first
    order along the SGD step with the guard, for every μ, while without it some do (so the test can fail); a larger
    μ lowers it at least as much, pair by pair (same draws). The hinge does not break the promise (it only scales
    the pair's logistic weight)."""

    def changes(mu: float | None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return torch.tensor([c for _ in range(40) for c in _linear_model_step(loss_fn, mu, gen, lam_p=hinge)])

    plain, by_mu = changes(None), {mu: changes(mu) for mu in (0.0, 0.5, 0.9)}
    assert plain.max() > 1e-3  # without the guard the winner's error does rise in some pairs
    for mu, guarded in by_mu.items():
        assert guarded.max() <= 1e-12, (mu, guarded.max())
    assert (by_mu[0.5] <= by_mu[0.0] + 1e-12).all() and (by_mu[0.9] <= by_mu[0.5] + 1e-12).all()


# --- caption contrast (issue 28) ----------------------------------------------------------------------------


def test_caption_contrast_is_the_dpo_form_on_the_two_captions() -> None:
    """Winner = e(x|c), loser = e(x|c′) at the same x_t: the hand pair gives dpo's values (mean_k ℓ(z_k)), and a
    policy that denoises the true caption better than the reference does (relative to c′) has margin > 0."""
    policy, ref = _hand_pair()
    loss, m = losses.caption_contrast_loss(policy, ref, 2.0)
    torch.testing.assert_close(loss, torch.tensor([(L_PLUS1 + L_MINUS1) / 2, L_PLUS1]))
    torch.testing.assert_close(loss, dpo_loss(policy, ref, 2.0)[0])
    assert m["margin"][1] > 0  # row 1: the mismatched caption's error rose, the true caption's did not
    loss0, _ = losses.caption_contrast_loss(ref, ref, 7.0)
    torch.testing.assert_close(loss0, torch.full((2,), LOG2))


def test_caption_contrast_gradient_signs() -> None:
    """Lowering the error under the true caption lowers the loss; lowering it under c′ raises it."""
    policy, ref = _random_errors(8, 2, requires_grad=True), _random_errors(8, 2)
    loss, _ = losses.caption_contrast_loss(policy, ref, 3.0)
    loss.sum().backward()
    assert torch.all(policy.winner.grad > 0) and torch.all(policy.loser.grad < 0)


# --- DDO (issue 28) -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_ddo_hand_values(alpha: float) -> None:
    """β = 2: r = −(e^θ − e^ref). Row 0: r_w = [+1, −1], r_l = 0 -> ℓ(r_w) averaged, fake term ℓ(−0) = log 2.
    Row 1: r_w = 0 (log 2), r_l = −1 -> fake term −log(1 − σ(−1)) = −log σ(1) = ℓ(+1)."""
    policy, ref = _hand_pair()
    loss, m = losses.ddo_loss(policy, ref, 2.0, fake_weight=alpha)
    real = torch.tensor([(L_PLUS1 + L_MINUS1) / 2, LOG2])
    fake = torch.tensor([LOG2, L_PLUS1])
    torch.testing.assert_close(loss, real + alpha * fake)
    torch.testing.assert_close(m["real_term"], real)
    torch.testing.assert_close(m["fake_term"], fake)
    torch.testing.assert_close(m["accuracy"], torch.tensor([0.25, 0.5]))  # row 0: 1 of 2 real right, r_l = 0 wrong


def test_ddo_at_the_reference_is_one_plus_alpha_log2_and_has_no_cross_term() -> None:
    """At θ = ref both GAN terms are log 2. The loss is a sum of a real term and a generated term with no
    cross term, so which generated image sits beside which real one does not change the batch's total (in the DPO
    form it does: the logistic couples the pair)."""
    ref = _random_errors(6, 3)
    loss0, _ = losses.ddo_loss(ref, ref, 500.0, fake_weight=0.5)
    torch.testing.assert_close(loss0, torch.full((6,), 1.5 * LOG2, dtype=torch.float64))
    policy = DenoiseErrors(
        ref.winner + 0.01 * torch.randn_like(ref.winner), ref.loser + 0.01 * torch.randn_like(ref.loser)
    )
    perm = torch.randperm(6)
    shuffled_policy, shuffled_ref = policy._replace(loser=policy.loser[perm]), ref._replace(loser=ref.loser[perm])
    total = losses.ddo_loss(policy, ref, 500.0)[0].sum()
    torch.testing.assert_close(losses.ddo_loss(shuffled_policy, shuffled_ref, 500.0)[0].sum(), total)
    assert not torch.allclose(
        dpo_loss(shuffled_policy, shuffled_ref, 500.0)[0].sum(), dpo_loss(policy, ref, 500.0)[0].sum()
    )


def test_ddo_is_the_papers_appendix_d_loss_at_beta_2_d_times_its_beta() -> None:
    """The paper's code (Zheng et al. 2025, App. D, with w(t) = 1): log p ≈ −Σ_d (ε_θ − ε)², one ε per row for the real
    and the generated image, loss = −log σ(β_p·(logp − logp_ref)) − α·log σ(−β_p·(logp_fake − logp_ref_fake)).
    Ours on mean errors over D elements equals it at β = 2·D·β_p."""
    g = torch.Generator().manual_seed(3)
    b, shape, beta_p, alpha = 5, (4, 2, 2), 0.02, 1.5
    d = 4 * 2 * 2
    eps = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    pred = {k: eps + 0.3 * torch.randn(b, *shape, generator=g, dtype=torch.float64) for k in ("w", "l", "rw", "rl")}
    logp = {k: -((v - eps) ** 2).sum(dim=(1, 2, 3)) for k, v in pred.items()}
    paper = -F.logsigmoid(beta_p * (logp["w"] - logp["rw"])) - alpha * F.logsigmoid(-beta_p * (logp["l"] - logp["rl"]))
    err = {k: losses.denoise_error(v, eps) for k, v in pred.items()}
    ours, _ = losses.ddo_loss(
        DenoiseErrors(err["w"], err["l"]), DenoiseErrors(err["rw"], err["rl"]), 2 * d * beta_p, fake_weight=alpha
    )
    torch.testing.assert_close(ours, paper)


def test_ddo_gradient_signs_and_options() -> None:
    policy, ref = _random_errors(8, 2, requires_grad=True), _random_errors(8, 2)
    loss, m = losses.ddo_loss(policy, ref, 3.0, sft_weight=0.5, dpop_lambda=2.0)
    loss.sum().backward()
    assert torch.all(policy.winner.grad > 0) and torch.all(policy.loser.grad < 0)
    assert {"sft_term", "dpop_term"} <= set(m) and all(not v.requires_grad for v in m.values())
    with pytest.raises(ValueError, match="fake_weight must be >= 0"):
        losses.ddo_loss(policy, ref, 3.0, fake_weight=-1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        losses.ddo_loss(policy, _random_errors(8, 3), 3.0)
