"""spin-diffusion: self-play fine-tuning of text-to-image diffusion models.

SPIN-Diffusion (Yuan, Chen, Ji, Gu; NeurIPS 2024, https://huggingface.co/papers/2402.10210), with SFT and
Diffusion-DPO baselines. The names in ``__all__`` are the public API; the CLI (``spin-diffusion``) calls them:

- configs: `load_config` (a YAML file and ``key=value`` overrides, the rules of ``--set``) -> `RunConfig`
- training: `spin`, `sft`, `dpo` on a run dir (``resume=True`` continues one) -> `RunResult`
- evaluation: `evaluate` (models × prompts × scorers) -> `EvalResult`
- data: `prepare_pickapic` (Pick-a-Pic v2 shards -> training shards) -> `PrepareSummary`
- the built-in CPU demo: `run_demo` -> `DemoResult`; its arms `demo_configs` and prompts `demo_prompts`
- the loss for your own training loop: `spin_loss` -> `LossOutput`, and `denoise_error`
- errors a user can fix: `SpinDiffusionError` (a one-line message)

Example::

    import spin_diffusion as sd

    result = sd.spin("configs/tiny.yaml", {"train.max_steps": 2}, run_dir="runs/mine")
    print(result.summary())

Every other module is internal and may change between releases. ``import spin_diffusion`` stays cheap: each name
is imported from its module on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from spin_diffusion.api import (
        DemoResult,
        EvalResult,
        RunResult,
        demo_configs,
        demo_prompts,
        dpo,
        evaluate,
        load_config,
        prepare_pickapic,
        run_demo,
        sft,
        spin,
    )
    from spin_diffusion.config import RunConfig
    from spin_diffusion.errors import SpinDiffusionError
    from spin_diffusion.prepare import PrepareSummary
    from spin_diffusion.training_loss import LossOutput, denoise_error, spin_loss

# public name -> the module that defines it (imported on first access)
_EXPORTS = {
    **dict.fromkeys(
        [
            "DemoResult",
            "EvalResult",
            "RunResult",
            "demo_configs",
            "demo_prompts",
            "dpo",
            "evaluate",
            "load_config",
            "prepare_pickapic",
            "run_demo",
            "sft",
            "spin",
        ],
        "api",
    ),
    "RunConfig": "config",
    "SpinDiffusionError": "errors",
    "PrepareSummary": "prepare",
    "LossOutput": "training_loss",
    "denoise_error": "training_loss",
    "spin_loss": "training_loss",
}

__all__ = [
    "DemoResult",
    "EvalResult",
    "LossOutput",
    "PrepareSummary",
    "RunConfig",
    "RunResult",
    "SpinDiffusionError",
    "__version__",
    "demo_configs",
    "demo_prompts",
    "denoise_error",
    "dpo",
    "evaluate",
    "load_config",
    "prepare_pickapic",
    "run_demo",
    "sft",
    "spin",
    "spin_loss",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
