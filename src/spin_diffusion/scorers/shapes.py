"""The built-in shapes world's exact judge as a Scorer (no weights; the demo's default scorer)."""

from __future__ import annotations

import torch

from spin_diffusion.scorers._common import BatchedScorer

ATTRIBUTES = ("all", "color", "shape", "position")


class ShapesJudgeScorer(BatchedScorer):
    """1.0 when the image shows what the caption names, else 0.0, by ``spin_diffusion.world.judge``.

    ``attribute="all"`` (name ``shapes_judge``) needs color, shape and position all right; ``"color"``,
    ``"shape"`` or ``"position"`` (names ``shapes_color`` ...) score that attribute alone. The mean over a
    prompt set is the judge's accuracy. Captions must be shapes-world captions (else ValueError from the world).
    """

    higher_is_better = True

    def __init__(self, attribute: str = "all", *, batch_size: int = 64):
        if attribute not in ATTRIBUTES:
            raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
        from spin_diffusion.world import judge  # lazy: the world is only needed when this scorer is used

        self._judge = judge
        self.attribute = attribute
        self.name = "shapes_judge" if attribute == "all" else f"shapes_{attribute}"
        self.batch_size = batch_size

    def check_prompts(self, prompts: list[str]) -> None:
        """Refuse, before any image is rendered, a prompt the world's judge cannot read."""
        from spin_diffusion.errors import SpinDiffusionError
        from spin_diffusion.world import parse_caption

        for i, prompt in enumerate(prompts):
            try:
                parse_caption(prompt)
            except ValueError as err:
                raise SpinDiffusionError(
                    f"prompt {i + 1} cannot be scored by {self.name}: {err} (the shapes scorers only judge "
                    "demo-world captions; use other scorers or prompts)"
                ) from None

    def _score_batch(self, images, prompts):
        verdicts = [self._judge(im, caption) for im, caption in zip(images, prompts, strict=True)]
        return torch.tensor([float(getattr(v, self.attribute)) for v in verdicts], dtype=torch.float32)
