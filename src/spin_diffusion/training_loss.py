"""SPIN-Diffusion's loss (and Diffusion-DPO's) for your own training loop: one call from predictions or errors.

`spin_loss` is the loss the trainer (`trainer._micro_step_loss`) computes, without the trainer: give it what a
policy and a frozen reference predicted for the noised winner (the real image) and loser (the model's own sample,
or a rejected image), and the regression targets, and it returns a scalar to ``backward()`` plus its metrics. The
math lives in `spin_diffusion.losses` (pure functions on denoising errors); this module only chooses the objective
from the table (`spin_diffusion.objectives`), turns predictions into errors, and applies Diffusion-SDPO's loser
guard the way the trainer does. It imports torch, never diffusers.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from spin_diffusion import losses, objectives

__all__ = ["LossOutput", "denoise_error", "spin_loss"]

denoise_error = losses.denoise_error


class LossOutput(NamedTuple):
    """What `spin_loss` returns.

    Attributes:
        loss: scalar, the mean of ``per_sample`` over the B pairs: call ``loss.backward()`` on it.
        per_sample: ``[B]`` loss of each pair (each pair's K timesteps averaged as the objective prescribes).
        metrics: name -> detached ``[B]`` tensor: ``margin``, ``reward_winner``, ``reward_loser``, ``accuracy``,
            ``policy_error_winner``, ``policy_error_loser``; with ``sft_weight`` > 0 ``sft_term``, with
            ``dpop_lambda`` > 0 ``dpop_term``, with ``loser_guard`` set ``loser_guard_lambda``.
    """

    loss: Tensor
    per_sample: Tensor
    metrics: dict[str, Tensor]


def spin_loss(
    policy_winner: Tensor,
    policy_loser: Tensor,
    ref_winner: Tensor,
    ref_loser: Tensor,
    *,
    beta: float,
    target_winner: Tensor | None = None,
    target_loser: Tensor | None = None,
    objective: str = "spin_approx",
    timesteps_per_pair: int = 1,
    sft_weight: float = 0.0,
    dpop_lambda: float = 0.0,
    loser_guard: float | None = None,
) -> LossOutput:
    """SPIN-Diffusion's loss on one batch of (winner, loser) pairs, from predictions and targets or from errors.

    SPIN-Diffusion (https://huggingface.co/papers/2402.10210) trains θ_{k+1} to denoise the real image (the
    winner) better, and the frozen opponent θ_k's own sample for the same prompt (the loser) worse, than θ_k
    does; Eq. 4.9 (``objective="spin_approx"``) is exactly Diffusion-DPO's loss (``"dpo"``, Wallace et al. 2023,
    https://huggingface.co/papers/2311.12908) with reference = θ_k:

        ``L = mean_k −log σ(−(β/2)·[(e^θ_w − e^ref_w) − (e^θ_l − e^ref_l)]_k)``

    where ``e`` is a per-sample denoising error (`denoise_error`: the mean squared error over the latent).

    Two ways to call it:

    - **Predictions** (give ``target_winner`` and ``target_loser``): the four tensors are the models' outputs
      ``[N, ...]`` on the noised winner and loser latents, and the targets are what the models regress (ε, v, or
      the flow velocity) for those rows. The winner and loser rows of a pair share the timestep (and, ideally,
      the noise); N = B·K, row ``b*K + k`` being pair b at its k-th timestep (``timesteps_per_pair`` = K).
      The loser guard needs this form.
    - **Errors** (no targets): the four tensors are denoising errors ``[B, K]`` (or ``[B]`` for K = 1), as
      `denoise_error` computes them.

    The reference's predictions or errors are detached here (the reference is frozen); compute them under
    ``torch.no_grad()`` to save memory.

    Args:
        policy_winner: the trained model's prediction (or error) on the noised winner (the real image).
        policy_loser: the same on the noised loser (the opponent's own sample; DPO: the rejected image).
        ref_winner: the frozen reference's (θ_k; DPO: the base model) prediction (or error) on the winner.
        ref_loser: the reference's prediction (or error) on the loser.
        beta: inverse temperature β > 0, in Diffusion-DPO ``--beta_dpo`` units (SD-1.5: thousands).
        target_winner: the regression target of the winner rows; with ``target_loser``, selects predictions.
        target_loser: the regression target of the loser rows.
        objective: ``"spin_approx"`` (Eq. 4.9), ``"spin_exact"`` (Eq. 4.8, the mean over the K timesteps inside
            the logistic; its loser targets must come from the opponent's stored sampling chain, see
            `spin_diffusion.losses.spin_exact_loss`) or ``"dpo"`` (the same loss as spin_approx).
        timesteps_per_pair: K, the timesteps of each pair among the N rows of predictions (ignored for errors,
            whose shape says K).
        sft_weight: λ ≥ 0: adds ``λ·mean_k e^θ_w`` per pair, the plain denoising loss on the winner (RPO).
        dpop_lambda: λ_P ≥ 0: the DPO-Positive hinge ``λ_P·min(0, reward_w)`` inside the logistic, so the margin
            cannot grow by making the winner worse. 0 = off.
        loser_guard: μ ∈ [0, 1] or None (off): Diffusion-SDPO's winner-preserving guard; the loser error keeps its
            value but its gradient is scaled per row so that, to first order, the step does not raise the winner's
            error (`spin_diffusion.losses.loser_guard_scale`). Needs predictions and targets.

    Returns:
        `LossOutput`: the scalar ``loss`` to backpropagate, the ``[B]`` ``per_sample`` losses and ``metrics``.

    Raises:
        ValueError: an unknown objective or one without a preference loss (``"sft"``: use
            ``denoise_error(pred, target).mean()``), β ≤ 0, one target without the other, the guard without
            targets, N not a multiple of K, or shapes that disagree.

    Example:
        >>> import torch, spin_diffusion as sd
        >>> pred = torch.zeros(2, 4, 8, 8)
        >>> out = sd.spin_loss(pred, pred, pred, pred, target_winner=pred + 1, target_loser=pred - 1, beta=1000.0)
        >>> round(out.loss.item(), 4)  # the policy equals the reference: log 2
        0.6931
    """
    try:
        spec = objectives.get(objective)
    except KeyError as err:
        raise ValueError(str(err.args[0])) from None
    if spec.loss is None:
        raise ValueError(f"{objective} has no preference loss; its loss is denoise_error(pred, target).mean()")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if (target_winner is None) != (target_loser is None):
        raise ValueError("give both target_winner and target_loser (predictions), or neither (errors)")
    guard = None
    if target_winner is None:
        if loser_guard is not None:
            raise ValueError("loser_guard needs predictions and targets (target_winner, target_loser), not errors")
        policy = losses.DenoiseErrors(policy_winner, policy_loser)
        ref = losses.DenoiseErrors(ref_winner.detach(), ref_loser.detach())
    else:
        assert target_loser is not None
        rows = policy_winner.shape[0] if policy_winner.ndim else 0
        if timesteps_per_pair < 1 or rows % timesteps_per_pair:
            raise ValueError(f"{rows} rows are not pairs × timesteps_per_pair={timesteps_per_pair}")
        shape = (rows // timesteps_per_pair, timesteps_per_pair)

        def errors(winner: Tensor, loser: Tensor) -> losses.DenoiseErrors:
            w, l_ = losses.denoise_error(winner, target_winner), losses.denoise_error(loser, target_loser)
            return losses.DenoiseErrors(w.reshape(shape), l_.reshape(shape))

        policy = errors(policy_winner, policy_loser)
        ref = errors(ref_winner.detach(), ref_loser.detach())
        if loser_guard is not None:
            with torch.no_grad():
                guard = losses.loser_guard_scale(
                    policy_winner.detach().float() - target_winner.float(),
                    policy_loser.detach().float() - target_loser.float(),
                    loser_guard,
                ).reshape(shape)
            policy = policy._replace(loser=losses.scale_gradient(policy.loser, guard))
    per_sample, metrics = spec.loss(policy, ref, beta, sft_weight=sft_weight, dpop_lambda=dpop_lambda)
    if guard is not None:
        metrics["loser_guard_lambda"] = guard.mean(dim=1)
    return LossOutput(per_sample.mean(), per_sample, metrics)
