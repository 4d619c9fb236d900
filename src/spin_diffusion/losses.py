"""Loss functions for SFT, Diffusion-DPO and SPIN-Diffusion: pure tensor math, no state, no logging.

Every loss takes per-sample denoising errors (see :func:`denoise_error`) and returns
``(per-sample losses [B], metrics)`` where ``metrics`` maps a name to a detached per-sample tensor
``[B]``. The caller reduces (``loss.mean()``) and logs.

Notation (one pair = one prompt with a winner and a loser image, K timesteps per pair):

- ``e^θ_w, e^θ_l``: policy errors on the winner (real / preferred) and loser (generated / rejected)
  image, ``e^ref_w, e^ref_l`` the same for the frozen reference (θ_k in SPIN, the base model in DPO).
  All four are ``[B, K]`` and use the same timesteps (and, by default, the same noise) per pair.
- Per-timestep margin ``Δ_k = (e^θ_w − e^ref_w) − (e^θ_l − e^ref_l)``, shape ``[B, K]``.
- Logit ``z_k = −(β/2)·Δ_k`` and ``ℓ(z) = −log σ(z) = log(1 + e^{−z})`` (convex, decreasing).

Objectives:

- Diffusion-DPO (Wallace et al. 2023, Eq. 14, https://huggingface.co/papers/2311.12908) and the
  approximate SPIN-Diffusion objective (Yuan et al. 2024, Eq. 4.9, https://huggingface.co/papers/2402.10210)
  have the expectation over t OUTSIDE the logistic: ``mean_k ℓ(z_k)``. SPIN-approx *is* Diffusion-DPO with
  winner = real image, loser = θ_k's sample and reference = θ_k, so both share one implementation.
- The exact SPIN-Diffusion objective (Eq. 4.8) has it INSIDE: ``ℓ(mean_k z_k)``. ℓ is convex, so by
  Jensen ``approx ≥ exact`` on the same inputs, with equality for K = 1.
- SFT is the plain denoising loss on the real images: ``mean_k e^θ_w``.
- Every preference loss takes ``sft_weight`` λ ≥ 0 and adds ``λ·mean_k e^θ_w`` per pair: the SFT term on the
  winner, the RPO remedy (Pang et al. 2024, https://huggingface.co/papers/2404.19733) for a preference loss that
  can fall while the likelihood of the preferred images falls too (the motivation of DPO-Positive, Pal et al.
  2024, https://huggingface.co/papers/2402.13228).
  The preference term's gradient on ``e^θ_w`` is ``(β/2)·σ(−z)`` (β/4 at initialisation, where z = 0), the
  SFT term's is λ, so λ ≈ β/4 weighs the two equally at the start of an iteration.
- Every preference loss takes ``dpop_lambda`` λ_P ≥ 0, the DPO-Positive hinge (Pal et al. 2024, Eq. 3) inside the
  logistic: DPOP adds ``−λ_P·max(0, log π_ref(y_w) − log π_θ(y_w))`` inside β(·); with log π ∝ −e that is
  ``−(β/2)·λ_P·max(0, e^θ_w − e^ref_w) = λ_P·min(0, reward_w)`` on the winner side of the logit. It is zero while
  the policy denoises the winner at least as well as the reference, and otherwise makes the logit (1 + λ_P) times
  as sensitive to the winner's reward, so the margin can no longer be widened by making the winner worse.
- :func:`loser_guard_scale` and :func:`scale_gradient` are the winner-preserving guard of Diffusion-SDPO (Fu et al.
  2025, https://huggingface.co/papers/2511.03317): the loser's error keeps its value, its gradient is scaled by
  λ ∈ [0, 1] chosen from the output-space gradients so that the update does not raise the winner's error to first
  order. The caller (the trainer) computes λ from the residuals and scales the policy's loser error before the loss.

β units: an error is the per-element MEAN (not sum) of the squared error over the latent, and the
logit carries the ½ of the Diffusion-DPO reference code (``scale_term = -0.5 * beta_dpo``), so β here
is directly comparable with Diffusion-DPO's ``--beta_dpo`` (5000 for SD-1.5). The paper's constants
(λ, T and the per-step weight ω(λ_t) / w_t) are folded into β, as in both reference objectives.

Shapes: errors are ``[B, K]``; a 1-D ``[B]`` tensor is accepted and treated as K = 1. Any other
shape, or winner/loser/policy/ref shapes that disagree, raise ``ValueError`` (a programming error in
the caller, not a user error).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class DenoiseErrors(NamedTuple):
    """Per-sample denoising errors of one model on a batch of (winner, loser) pairs.

    Attributes:
        winner: ``[B, K]`` (or ``[B]`` for K = 1) error on the real / preferred image at K timesteps.
        loser: same shape; same timesteps (and, by default, same noise) on the generated / rejected image.
    """

    winner: Tensor
    loser: Tensor


def denoise_error(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample, over all non-batch dimensions, computed in (at least) float32.

    This is the Diffusion-DPO ``(model_pred - target).pow(2).mean(dim=[1, 2, 3])``; the target is ε or
    v (whatever the model predicts), or ε̃'_t for the exact SPIN objective (see :func:`spin_exact_loss`).
    Low-precision inputs (bf16/fp16) are upcast before the subtraction, so the result is float32;
    float64 inputs stay float64.

    Args:
        pred: ``[B, ...]`` model output.
        target: ``[B, ...]`` regression target, same shape as ``pred``.

    Returns:
        ``[B]`` per-sample mean squared error.

    Raises:
        ValueError: if the shapes differ or the inputs are 0-D.
    """
    if pred.shape != target.shape:
        raise ValueError(f"denoise_error: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.ndim == 0:
        raise ValueError("denoise_error: inputs need a batch dimension, got 0-D tensors")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    diff = pred.to(dtype) - target.to(dtype)
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def _as_2d(x: Tensor, name: str) -> Tensor:
    """``[B, K]`` stays, ``[B]`` becomes ``[B, 1]`` (K = 1); anything else is a ValueError."""
    if x.ndim == 1:
        return x.unsqueeze(1)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [B, K] (or [B] for K = 1), got shape {tuple(x.shape)}")
    return x


def _check_errors(errors: DenoiseErrors, name: str) -> DenoiseErrors:
    """Validate one model's (winner, loser) errors and return them as ``[B, K]``."""
    if errors.winner.shape != errors.loser.shape:
        raise ValueError(
            f"{name}.winner {tuple(errors.winner.shape)} and {name}.loser {tuple(errors.loser.shape)} differ in shape"
        )
    return DenoiseErrors(_as_2d(errors.winner, f"{name}.winner"), _as_2d(errors.loser, f"{name}.loser"))


def _logits(
    policy: DenoiseErrors, ref: DenoiseErrors, beta: float, *, dpop_lambda: float = 0.0, inside: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """The logits inside ℓ and the shared preference metrics (each ``[B]``).

    ``inside=False`` (Diffusion-DPO, SPIN-approx): one logit per timestep, ``z_k = r_w,k + λ_P·min(0, r_w,k) − r_l,k``
    ``[B, K]``. ``inside=True`` (SPIN-exact): one logit per pair on the timestep means, ``z = r̄_w + λ_P·min(0, r̄_w)
    − r̄_l`` ``[B, 1]`` (the hinge acts on the trajectory's log-ratio, as DPOP's on a sequence's). Here
    ``r_w = −(β/2)·(e^θ_w − e^ref_w)``, ``r_l = −(β/2)·(e^θ_l − e^ref_l)`` and λ_P = ``dpop_lambda``.

    Metrics (detached, per sample): ``margin`` = mean_k (r_w − r_l) = ``reward_winner − reward_loser``;
    ``reward_winner`` = mean_k r_w; ``reward_loser`` = mean_k r_l; ``accuracy`` = 1.0 where margin > 0 (the policy
    prefers the winner more than the reference does); ``policy_error_winner`` / ``policy_error_loser`` = mean_k of
    the raw policy errors; with λ_P > 0 also ``dpop_term`` = the hinge's mean contribution to the logit (≤ 0).
    """
    if not dpop_lambda >= 0:  # also refuses nan
        raise ValueError(f"dpop_lambda must be >= 0, got {dpop_lambda}")
    policy = _check_errors(policy, "policy")
    ref = _check_errors(ref, "ref")
    if policy.winner.shape != ref.winner.shape:
        raise ValueError(
            f"policy errors {tuple(policy.winner.shape)} and ref errors {tuple(ref.winner.shape)} differ in shape"
        )
    scale = -0.5 * beta  # Diffusion-DPO `scale_term`
    reward_w = scale * (policy.winner - ref.winner)  # [B, K]
    reward_l = scale * (policy.loser - ref.loser)  # [B, K]
    if inside:
        reward_w, reward_l = reward_w.mean(dim=1, keepdim=True), reward_l.mean(dim=1, keepdim=True)  # [B, 1]
    hinge = dpop_lambda * reward_w.clamp(max=0) if dpop_lambda > 0 else None
    logits = reward_w - reward_l if hinge is None else reward_w + hinge - reward_l
    with torch.no_grad():
        margin = (reward_w - reward_l).mean(dim=1)
        metrics = {
            "margin": margin,
            "reward_winner": reward_w.mean(dim=1),
            "reward_loser": reward_l.mean(dim=1),
            "accuracy": (margin > 0).to(logits.dtype),
            "policy_error_winner": policy.winner.mean(dim=1),
            "policy_error_loser": policy.loser.mean(dim=1),
        }
        if hinge is not None:
            metrics["dpop_term"] = hinge.mean(dim=1)
    return logits, metrics


def _plus_sft(
    loss: Tensor, policy: DenoiseErrors, sft_weight: float, metrics: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """``loss + λ·mean_k e^θ_w`` ``[B]``; with λ > 0 the metrics gain ``sft_term`` = that added term (detached).

    λ = 0 returns ``loss`` unchanged (no ``sft_term`` metric), so existing logs keep their keys.
    """
    if sft_weight < 0:
        raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
    if sft_weight == 0:
        return loss, metrics
    sft_term = sft_weight * _as_2d(policy.winner, "policy.winner").mean(dim=1)  # [B]
    return loss + sft_term, {**metrics, "sft_term": sft_term.detach()}


def _logistic_outside(
    policy: DenoiseErrors, ref: DenoiseErrors, beta: float, sft_weight: float, dpop_lambda: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """``mean_k −log σ(z_k)``: the expectation over t outside ℓ (Diffusion-DPO = SPIN-approx), plus the SFT term."""
    logits, metrics = _logits(policy, ref, beta, dpop_lambda=dpop_lambda)
    return _plus_sft(-F.logsigmoid(logits).mean(dim=1), policy, sft_weight, metrics)


def sft_loss(policy_winner: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Supervised fine-tuning on the real images: the plain denoising loss, averaged over timesteps.

    Args:
        policy_winner: ``[B, K]`` (or ``[B]`` for K = 1) policy errors on the real images.

    Returns:
        Per-sample loss ``[B]`` = mean over K, and ``{"policy_error_winner": [B]}`` (detached).

    Raises:
        ValueError: if the input is not 1-D or 2-D.
    """
    errors = _as_2d(policy_winner, "policy_winner")
    loss = errors.mean(dim=1)
    return loss, {"policy_error_winner": loss.detach()}


def dpo_loss(
    policy: DenoiseErrors, ref: DenoiseErrors, beta: float, *, sft_weight: float = 0.0, dpop_lambda: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO loss (Wallace et al. 2023, Eq. 14, https://huggingface.co/papers/2311.12908).

    ``L = mean_k −log σ(−(β/2)·[(e^θ_w − e^ref_w) − (e^θ_l − e^ref_l)]_k)``, i.e. one logistic per
    timestep, then the mean over the K timesteps (the reference code uses K = 1). Here ``winner`` /
    ``loser`` are the preferred / rejected images of a human preference pair and ``ref`` is the frozen
    base model. β is in ``--beta_dpo`` units (module docstring); larger β = stronger preference signal,
    weaker implicit KL to the reference.

    Args:
        policy: errors of the trained model, ``[B, K]`` each (``[B]`` = K = 1).
        ref: errors of the frozen reference at the same timesteps and noise, same shape.
        beta: inverse temperature β > 0.
        sft_weight: λ ≥ 0; adds ``λ·mean_k e^θ_w`` per pair (module docstring). 0 = the plain objective.
        dpop_lambda: λ_P ≥ 0; the DPO-Positive hinge ``λ_P·min(0, reward_w)`` on the winner side of the logit
            (module docstring). 0 = off.

    Returns:
        Per-sample loss ``[B]`` and metrics ``margin``, ``reward_winner``, ``reward_loser``, ``accuracy``,
        ``policy_error_winner``, ``policy_error_loser``, when ``sft_weight`` > 0 ``sft_term``, and when
        ``dpop_lambda`` > 0 ``dpop_term`` (each ``[B]``, detached).

    Raises:
        ValueError: if shapes disagree or are not 1-D/2-D, or ``sft_weight`` or ``dpop_lambda`` < 0.
    """
    return _logistic_outside(policy, ref, beta, sft_weight, dpop_lambda)


def spin_approx_loss(
    policy: DenoiseErrors, ref: DenoiseErrors, beta: float, *, sft_weight: float = 0.0, dpop_lambda: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Approximate SPIN-Diffusion objective, Eq. (4.9) of https://huggingface.co/papers/2402.10210.

    ``L = mean_k −log σ(−(β/2)·Δ_k)``: the expectation over t sits OUTSIDE the logistic ℓ. By Jensen
    (ℓ convex) this upper-bounds the exact objective (4.8), and the trajectory terms are replaced by the
    forward process on the final images, so only x_0 (real) and x'_0 (θ_k's sample) are needed. It is
    exactly Diffusion-DPO (:func:`dpo_loss`, same implementation) with winner = real image, loser = θ_k's
    sample for the same prompt, and ref = θ_k (the frozen opponent), not the base model.

    Args:
        policy: errors of θ (being trained), ``[B, K]`` each (``[B]`` = K = 1), on forward-noised
            real (winner) and generated (loser) latents.
        ref: errors of θ_k at the same timesteps and noise, same shape.
        beta: inverse temperature β > 0, in Diffusion-DPO ``--beta_dpo`` units (module docstring).
        sft_weight: λ ≥ 0; adds ``λ·mean_k e^θ_w`` per pair (module docstring). 0 = the plain objective.
        dpop_lambda: λ_P ≥ 0; the DPO-Positive hinge ``λ_P·min(0, reward_w)`` on the winner side of the logit
            (module docstring). 0 = off.

    Returns:
        Per-sample loss ``[B]`` and the metrics of :func:`dpo_loss`.

    Raises:
        ValueError: if shapes disagree or are not 1-D/2-D, or ``sft_weight`` or ``dpop_lambda`` < 0.
    """
    return _logistic_outside(policy, ref, beta, sft_weight, dpop_lambda)


def spin_exact_loss(
    policy: DenoiseErrors, ref: DenoiseErrors, beta: float, *, sft_weight: float = 0.0, dpop_lambda: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Exact SPIN-Diffusion objective, Eq. (4.8) of https://huggingface.co/papers/2402.10210.

    ``L = −log σ(−(β/2)·mean_k Δ_k)``: the expectation over t sits INSIDE the logistic ℓ, because (4.8)
    is the SPIN objective on the log-likelihood ratio of the whole trajectory x_{0:T}, a sum over steps
    that the paper writes as T·E_t[...]. The factor T is folded into β, so K = 1 gives exactly
    :func:`spin_approx_loss` and :func:`dpo_loss`, and ``exact ≤ approx`` on the same inputs (Jensen).

    What the caller (the trainer) must supply, since this function only sees the errors:

    - Loser (generated) errors are taken against ε̃'_t = (x'_{t−1} − A_t x'_t)/B_t, built from two
      consecutive latents of θ_k's stored sampling trajectory, where x_{t−1} = A_t x_t + B_t ε + σ_t z is
      the sampler's step (for DDIM, A_t = √ᾱ_{t−1}/√ᾱ_t and B_t = √(1−ᾱ_{t−1}−σ_t²) − A_t√(1−ᾱ_t)),
      evaluated at the stored x'_t, not at a forward-noised x'_0.
    - Winner (real) errors use the forward process on the real image, where ε̃_t reduces to the forward
      noise ε as σ_t → 0.
    - Any per-step weight w_t = B_t²/(2σ_t²) is not applied here; like (4.9) and Diffusion-DPO, it is
      treated as a constant folded into β.

    The paper averages over all T sampling steps inside ℓ; averaging a random subsample of K steps is
    a biased estimator of that (ℓ is non-linear): by Jensen its expectation lies between the
    full-trajectory exact loss (K = T) and the approximate loss (K = 1), and the bias shrinks as K grows.

    Args:
        policy: errors of θ (being trained), ``[B, K]`` each (``[B]`` = K = 1), at K steps of the
            trajectory.
        ref: errors of θ_k at the same steps, same shape.
        beta: inverse temperature β > 0, in Diffusion-DPO ``--beta_dpo`` units (module docstring).
        sft_weight: λ ≥ 0; adds ``λ·mean_k e^θ_w`` per pair (module docstring). 0 = the plain objective.
        dpop_lambda: λ_P ≥ 0; the DPO-Positive hinge ``λ_P·min(0, reward_w)`` on the winner side of the logit
            (module docstring). 0 = off.

    Returns:
        Per-sample loss ``[B]`` and the metrics of :func:`dpo_loss` (``margin + dpop_term`` is exactly the logit
        inside ℓ here, so ``loss = −log σ(margin + dpop_term) + sft_term``).

    Raises:
        ValueError: if shapes disagree or are not 1-D/2-D, or ``sft_weight`` or ``dpop_lambda`` < 0.
    """
    logits, metrics = _logits(policy, ref, beta, dpop_lambda=dpop_lambda, inside=True)
    return _plus_sft(-F.logsigmoid(logits[:, 0]), policy, sft_weight, metrics)


def loser_guard_scale(residual_winner: Tensor, residual_loser: Tensor, mu: float) -> Tensor:
    """Diffusion-SDPO's winner-preserving scale λ for the loser's gradient, one per row. -> ``[N]``, no grad.

    For one row (one pair at one timestep) let A = e^θ_w and B = e^θ_l be the policy's errors and
    ``g_A = ∂A/∂pred_w ∝ pred_w − target_w``, ``g_B = ∂B/∂pred_l ∝ pred_l − target_l`` their output-space
    gradients (the ``residual_*`` given here; the common factor 2/numel cancels). A preference loss moves the
    outputs along ``−c·(g_A − λ·g_B)`` with c > 0 (its gradient on A and B has the same size and opposite signs);
    asking that this lowers A by at least μ of the plain SFT step, ``(−g_A + λ g_B)·g_A ≤ −μ‖g_A‖²``, gives

        λ = clamp((1 − μ)·‖g_A‖² / (g_A·g_B), 0, 1)   where g_A·g_B > 0, else 1.

    μ = 0 only forbids raising A; μ = 1 also cancels every loser push that has a component along g_A. The rule is
    exact in output space, i.e. when winner and loser outputs share the network's Jacobian (the same prompt, time
    and noise, as here by default); Fu et al. call this the output-space approximation.

    Per row, not per batch (Diffusion-SDPO's code takes one λ from the batch means of its per-GPU batch): the
    winner of every pair is protected, not just the batch average (row-wise bounds sum to the batch bound, since
    rows are disjoint output coordinates), and λ of a row depends on that row alone, so N processes × B pairs
    and 1 process × N·B pairs (or any gradient accumulation) compute the same λ without a collective.

    Args:
        residual_winner: ``[N, ...]`` policy prediction minus target on the winner (any float dtype).
        residual_loser: same shape, on the loser, row for row the same pair and timestep.
        mu: μ ∈ [0, 1].

    Raises:
        ValueError: if the shapes differ or μ is outside [0, 1].
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"loser guard mu must be in [0, 1], got {mu}")
    if residual_winner.shape != residual_loser.shape or residual_winner.ndim == 0:
        raise ValueError(
            f"residual_winner {tuple(residual_winner.shape)} and residual_loser {tuple(residual_loser.shape)} must "
            "have the same [N, ...] shape"
        )
    with torch.no_grad():
        g_a = residual_winner.detach().reshape(residual_winner.shape[0], -1).double()
        g_b = residual_loser.detach().reshape(residual_loser.shape[0], -1).double()
        dot = (g_a * g_b).sum(dim=1)
        norm2 = g_a.pow(2).sum(dim=1)
        bound = ((1.0 - mu) * norm2 / dot.where(dot > 0, torch.ones_like(dot))).clamp(0.0, 1.0)
        return bound.where(dot > 0, torch.ones_like(dot)).to(torch.promote_types(residual_winner.dtype, torch.float32))


def scale_gradient(x: Tensor, scale: Tensor) -> Tensor:
    """``x`` in value, ``scale·∂x`` in gradient: ``x.detach() + scale·(x − x.detach())`` (``scale`` broadcasts)."""
    detached = x.detach()
    return detached + scale.detach().to(x.dtype) * (x - detached)


def caption_contrast_loss(
    policy: DenoiseErrors, ref: DenoiseErrors, beta: float, *, sft_weight: float = 0.0, dpop_lambda: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """The caption contrast: prefer the real image under its own caption c to the SAME image under a mismatched
    caption c′, relative to the reference (θ_k), in the Diffusion-DPO form.

    ``L = mean_k −log σ(−(β/2)·[(e^θ(x|c) − e^ref(x|c)) − (e^θ(x|c′) − e^ref(x|c′))]_k)``. Here ``winner`` holds the
    errors under c and ``loser`` those under c′, at the same x_t (same image, same t, same ε): only the conditioning
    differs, so the margin is a difference of ELBO surrogates of log p(x|c) − log p(x|c′), the quantity a diffusion
    model used as a zero-shot classifier compares across captions (Li et al. 2023, "Your diffusion model is secretly
    a zero-shot classifier", https://huggingface.co/papers/2303.16203; Clark & Jaini 2023), and the logistic on it is
    the binary (c vs c′) case of the discriminative objective of Qu et al. 2024 (discriminative tuning of
    text-to-image models), written relative to θ_k as SPIN and DPO are. Label-free: c′ is another caption of the data.

    Args:
        policy: errors of θ, ``[B, K]`` each (``[B]`` = K = 1): ``winner`` under c, ``loser`` under c′.
        ref: errors of the reference at the same x_t, t and ε, same shape.
        beta: inverse temperature β > 0 (``--beta_dpo`` units, module docstring).
        sft_weight: λ ≥ 0; adds ``λ·mean_k e^θ(x|c)`` per row (module docstring). 0 = off.
        dpop_lambda: λ_P ≥ 0; the DPO-Positive hinge on the true caption's reward. 0 = off.

    Returns:
        Per-sample loss ``[B]`` and the metrics of :func:`dpo_loss` (``margin`` > 0: the policy prefers the true
        caption more than the reference does).

    Raises:
        ValueError: if shapes disagree or are not 1-D/2-D, or ``sft_weight`` or ``dpop_lambda`` < 0.
    """
    return _logistic_outside(policy, ref, beta, sft_weight, dpop_lambda)


def ddo_loss(
    policy: DenoiseErrors,
    ref: DenoiseErrors,
    beta: float,
    *,
    sft_weight: float = 0.0,
    dpop_lambda: float = 0.0,
    fake_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct Discriminative Optimization (Zheng et al. 2025, ICML, https://huggingface.co/papers/2503.01103).

    The paper's loss (its Eq. 13): the GAN discriminator is parameterized implicitly by the likelihood ratio of the
    model being trained to a frozen reference, ``r_θ(x) = log p_θ(x) − log p_ref(x)``, and trained on real data
    (positives) and the reference's own samples (negatives):

        ``L_{α,β} = −E_{x∼data} log σ(β·r_θ(x)) − α·E_{x∼p_ref} log(1 − σ(β·r_θ(x)))``,

    with α in [0.5, 50] and β in [0.01, 0.1] in the paper; its Appendix D code defaults to α = 1, β = 0.02. For
    diffusion the log-ratio is replaced by the ELBO difference at one (t, ε),
    ``Δ = −w(t)·(‖ε_θ(x_t) − ε‖² − ‖ε_ref(x_t) − ε‖²)`` summed over the dimensions, and Jensen's inequality moves
    E_{t,ε} outside the logistic (an upper bound). The same (t, ε) serves the real and the generated image of a row
    and both models. Run in rounds: each round's reference is the previous round's model.

    Our translation: ``β·Δ = −(β/2)·(e^θ − e^ref)`` with e the *mean* squared ε- or v-error over the D latent
    elements (``--beta_dpo`` units, as Diffusion-DPO writes DPO), so our β ≈ 2·D·β_paper up to the weighting w(t)
    (EDM's in the paper, uniform here); with K timesteps the logistic is taken per timestep and averaged. The caller
    draws the real and generated rows at the same (t, ε) (the generated image is θ_k's sample for the row's
    caption); this function sums the two per-row terms ``−log σ(r_w) − α·log σ(−r_l)`` (1 − σ(z) = σ(−z)), which
    share no logit. At θ = ref both are log 2, so the loss starts at (1 + α)·log 2.

    Args:
        policy: errors of θ, ``[B, K]`` each (``[B]`` = K = 1): ``winner`` on real images, ``loser`` on the
            reference's samples, at the same (t, ε) as the row's real image.
        ref: errors of the reference at the same (t, ε) as the policy's, row for row.
        beta: inverse temperature β > 0 (``--beta_dpo`` units, module docstring).
        sft_weight: λ ≥ 0; adds ``λ·mean_k e^θ_w`` per row (module docstring). 0 = off.
        dpop_lambda: λ_P ≥ 0; the DPO-Positive hinge ``λ_P·min(0, r_w)`` inside the real term's logit. 0 = off.
        fake_weight: α ≥ 0, the weight of the generated term.

    Returns:
        Per-sample loss ``[B]`` and metrics ``reward_winner`` (mean_k r_w), ``reward_loser`` (mean_k r_l),
        ``margin`` (their difference), ``accuracy`` (the discriminator's: the fraction of the row's real and
        generated images it classifies correctly, (1[r_w > 0] + 1[r_l < 0]) / 2), ``real_term``, ``fake_term``
        (the two losses before α), ``policy_error_winner``, ``policy_error_loser`` and, when on, ``sft_term`` and
        ``dpop_term`` (each ``[B]``, detached).

    Raises:
        ValueError: if shapes disagree or are not 1-D/2-D, or ``sft_weight``, ``dpop_lambda`` or ``fake_weight`` < 0.
    """
    if not fake_weight >= 0:
        raise ValueError(f"fake_weight must be >= 0, got {fake_weight}")
    if not dpop_lambda >= 0:
        raise ValueError(f"dpop_lambda must be >= 0, got {dpop_lambda}")
    policy, ref = _check_errors(policy, "policy"), _check_errors(ref, "ref")
    if policy.winner.shape != ref.winner.shape:
        raise ValueError(
            f"policy errors {tuple(policy.winner.shape)} and ref errors {tuple(ref.winner.shape)} differ in shape"
        )
    scale = -0.5 * beta
    reward_w = scale * (policy.winner - ref.winner)  # [B, K]
    reward_l = scale * (policy.loser - ref.loser)  # [B, K]
    hinge = dpop_lambda * reward_w.clamp(max=0) if dpop_lambda > 0 else torch.zeros_like(reward_w)
    real_term = -F.logsigmoid(reward_w + hinge).mean(dim=1)  # [B]
    fake_term = -F.logsigmoid(-reward_l).mean(dim=1)  # [B]
    with torch.no_grad():
        metrics = {
            "margin": (reward_w - reward_l).mean(dim=1),
            "reward_winner": reward_w.mean(dim=1),
            "reward_loser": reward_l.mean(dim=1),
            "accuracy": ((reward_w > 0).to(reward_w.dtype) + (reward_l < 0).to(reward_l.dtype)).mean(dim=1) / 2,
            "real_term": real_term.detach(),
            "fake_term": fake_term.detach(),
            "policy_error_winner": policy.winner.mean(dim=1),
            "policy_error_loser": policy.loser.mean(dim=1),
        }
        if dpop_lambda > 0:
            metrics["dpop_term"] = hinge.mean(dim=1)
    return _plus_sft(real_term + fake_weight * fake_term, policy, sft_weight, metrics)
