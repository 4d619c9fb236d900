"""The table of training objectives: what each one needs and which loss it trains with.

Every place that behaves differently per objective (the trainer's batches and loss, self-play's generation, the
config's checks, the card) asks this table instead of comparing names, so a new objective, or a new loss term,
is one row or one field here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from spin_diffusion import losses

PreferenceLoss = Callable[
    ..., tuple
]  # (policy errors, ref errors, beta, *, sft_weight, dpop_lambda) -> (loss, metrics)


@dataclass(frozen=True)
class Objective:
    """One training objective.

    Attributes:
        name: the value of ``loss.objective``.
        loser: where the loser image of a pair comes from: None (sft trains on the real images alone),
            "generated" (θ_k's own sample, regenerated every self-play iteration), "pairs" (the rejected image of
            a preference pair, dpo) or "caption" (the real image itself under a mismatched caption c′: no loser
            image at all, the caption contrast alone).
        trajectory: trains on the opponent's stored sampling chain (the exact SPIN objective), not on forward-noised
            final latents.
        loss: the preference loss on denoising errors (spin_diffusion.losses); None for sft (plain denoising loss).
        options: extra keyword arguments of ``loss``, each taken from a LossConfig field: (argument, field).
    """

    name: str
    loser: Literal["generated", "pairs", "caption"] | None
    trajectory: bool
    loss: PreferenceLoss | None
    options: tuple[tuple[str, str], ...] = ()

    @property
    def self_play(self) -> bool:
        """Iterates: θ_{k+1} is trained against θ_k's own samples, K times."""
        return self.loser == "generated"

    @property
    def iterates(self) -> bool:
        """Trains in rounds against θ_k, K times: self-play, and the caption contrast alone (no generation)."""
        return self.loser in ("generated", "caption")

    @property
    def needs_ref(self) -> bool:
        """Has a frozen reference (θ_k in self-play, the base model in dpo)."""
        return self.loss is not None


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective("sft", loser=None, trajectory=False, loss=None),
    "dpo": Objective("dpo", loser="pairs", trajectory=False, loss=losses.dpo_loss),
    "spin_approx": Objective("spin_approx", loser="generated", trajectory=False, loss=losses.spin_approx_loss),
    "spin_exact": Objective("spin_exact", loser="generated", trajectory=True, loss=losses.spin_exact_loss),
    "ddo": Objective(
        "ddo",
        loser="generated",
        trajectory=False,
        loss=losses.ddo_loss,
        options=(("fake_weight", "ddo_fake_weight"),),
    ),
    "caption_contrast": Objective(
        "caption_contrast", loser="caption", trajectory=False, loss=losses.caption_contrast_loss
    ),
}


def get(name: str) -> Objective:
    """The table's row for ``loss.objective`` = name (KeyError names the valid ones)."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; one of {', '.join(OBJECTIVES)}") from None
