"""LoRA on the denoiser (peft, through diffusers' adapter API): add, disable (the reference of a LoRA policy),
merge, and save in diffusers' and kohya's layouts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from spin_diffusion.atomic import fresh_dir, move_into_place
from spin_diffusion.errors import SpinDiffusionError, first_line

if TYPE_CHECKING:
    from spin_diffusion.models import Components


def tuner_layers(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]


def add_lora(
    denoiser: Any, *, rank: int, alpha: float, target_modules: list[str] | tuple[str, ...], seed: int = 0
) -> None:
    """Attach a fresh LoRA adapter (peft, via ``denoiser.add_adapter``); only its parameters train afterwards.

    The adapter starts as the identity (LoRA B = 0), so the denoiser's outputs are unchanged. LoRA A is drawn from
    ``seed`` (not the global RNG), so the same run gives the same adapter on any number of processes.
    """
    from peft import LoraConfig

    if rank <= 0:
        raise SpinDiffusionError(f"LoRA rank must be > 0, got {rank}")
    if tuner_layers(denoiser):
        raise SpinDiffusionError("the denoiser already has a LoRA adapter; merge_lora() it before adding a new one")
    targets = list(target_modules)
    names = [n for n, _ in denoiser.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not targets or missing:
        raise SpinDiffusionError(
            f"LoRA target_modules {missing or targets} match no denoiser module (typical: to_q, to_k, to_v, to_out.0)"
        )
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            denoiser.add_adapter(config)
    except ValueError as e:
        _remove_peft_state(denoiser)
        raise SpinDiffusionError(f"cannot add LoRA with target_modules={targets}: {first_line(e)}") from e
    for n, p in denoiser.named_parameters():
        p.requires_grad_("lora_" in n)


def _remove_peft_state(denoiser: Any) -> None:
    """Drop peft layers and diffusers' adapter bookkeeping (after a failed add_adapter)."""
    if tuner_layers(denoiser):
        denoiser.unload_lora()
    if "peft_config" in denoiser.__dict__:
        del denoiser.peft_config
    denoiser._hf_peft_config_loaded = False


@contextmanager
def adapters_disabled(denoiser: Any) -> Iterator[Any]:
    """Inside the block the denoiser runs without its LoRA adapters (= the reference/opponent θ_k).

    A no-op for a denoiser without adapters. The previous state is restored on exit, also on exceptions.
    """
    layers = tuner_layers(denoiser)
    if not layers or layers[0].disable_adapters:
        yield denoiser
        return
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()


def merge_lora(denoiser: Any) -> Any:
    """Fuse the LoRA adapters into the base weights and remove every peft layer; returns the same denoiser.

    Outputs are unchanged up to float rounding. Parameters keep their ``requires_grad`` flags (the
    base weights are frozen since :func:`add_lora`). A denoiser without adapters is returned as is.
    Verified numerically in tests: outputs after merging match the adapter outputs (allclose).
    """
    if not tuner_layers(denoiser):
        return denoiser
    denoiser.enable_adapters()
    denoiser.fuse_lora()
    denoiser.unload_lora()
    for attr in ("lora_scale", "_safe_fusing"):  # left behind by diffusers' fuse_lora
        if attr in denoiser.__dict__:
            delattr(denoiser, attr)
    return denoiser


def lora_state_dict(denoiser: Any) -> dict[str, Tensor]:
    """The LoRA adapter weights (peft ``get_peft_model_state_dict``) for saving; empty without adapters."""
    from peft.utils import get_peft_model_state_dict

    if not tuner_layers(denoiser):
        return {}
    return get_peft_model_state_dict(denoiser)


KOHYA_LORA_FILE = "lora_kohya.safetensors"


def _kohya_state_dict(state: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """A UNet's peft LoRA weights in the kohya layout that AUTOMATIC1111 / ComfyUI / SD.Next load (``lora_unet_*``
    keys, ``lora_down`` / ``lora_up``), through diffusers' ``convert_state_dict_to_kohya``; every ``.alpha`` is the
    adapter's real alpha (the converter writes the rank, which is only right when alpha == rank)."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    return {k: (torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}


def save_lora(denoiser: Any, out_dir: str | Path, c: Components | None = None) -> Path:
    """Write the denoiser's LoRA adapter as ``out_dir/pytorch_lora_weights.safetensors`` (diffusers LoRA format),
    and for UNet families also as ``out_dir/lora_kohya.safetensors`` (the kohya layout of AUTOMATIC1111 / ComfyUI).

    Loadable with ``load_lora_weights(out_dir)`` of the family's pipeline (``c``; SD-1.x when None); the kohya file
    with ``load_lora_weights(out_dir, weight_name="lora_kohya.safetensors")`` too. Atomic like :func:`save_pipeline`.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    state = lora_state_dict(denoiser)
    if not state:
        raise SpinDiffusionError("the denoiser has no LoRA adapter to save (call add_lora first)")
    out_dir = Path(out_dir)
    tmp = fresh_dir(out_dir)
    # The adapter metadata (rank, alpha, targets) is stored in the safetensors header: without it a loader
    # would assume lora_alpha == rank and scale the adapter wrongly.
    configs = denoiser.peft_config
    metadata = (configs.get("default") or next(iter(configs.values()))).to_dict()
    # the family's pipeline class writes the key prefix its load_lora_weights expects (unet. / transformer.)
    cls = type(c.family.pipeline(c)) if c is not None else None
    if c is not None and c.family.process.kind == "flow":  # the transformer families
        # peft's own keys (lora_A / lora_B), as diffusers' transformer LoRA scripts save them: the UNet layout's
        # converter renames only the attention projections, and FLUX.2's loader dropped those renamed keys
        cls.save_lora_weights(
            tmp, transformer_lora_layers=state, safe_serialization=True, transformer_lora_adapter_metadata=metadata
        )
    else:
        from diffusers import StableDiffusionPipeline

        (cls or StableDiffusionPipeline).save_lora_weights(
            tmp,
            unet_lora_layers=convert_state_dict_to_diffusers(state),
            safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )
        alpha = metadata.get("lora_alpha") or metadata.get("r")
        save_file(_kohya_state_dict(state, alpha), tmp / KOHYA_LORA_FILE, metadata={"ss_network_alpha": str(alpha)})
    return move_into_place(tmp, out_dir)
