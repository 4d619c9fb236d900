"""spin-diffusion: self-play fine-tuning of text-to-image diffusion models.

SPIN-Diffusion (Yuan, Chen, Ji, Gu; NeurIPS 2024, https://huggingface.co/papers/2402.10210).
"""

__version__ = "0.1.0"
