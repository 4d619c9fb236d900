"""The tiny preset of every model family and what it runs with in the shared family tests. The checklist of
docs/FAMILIES.md ("Adding a family") parametrizes over these tables, so a new family joins every check here, once."""

from __future__ import annotations

# preset -> the diffusers pipeline class its export reloads in
PIPELINES = {
    "tiny-sdxl": "StableDiffusionXLPipeline",
    "tiny-sd3": "StableDiffusion3Pipeline",
    "tiny-sd35": "StableDiffusion3Pipeline",
    "tiny-flux": "FluxPipeline",
    "tiny-zimage": "ZImagePipeline",
    "tiny-qwenimage": "QwenImagePipeline",
    "tiny-flux2": "Flux2KleinPipeline",
}
ALL = ("tiny", *PIPELINES)
# the transformer families: each has configs/accelerate/fsdp_<name>.yaml naming its blocks
TRANSFORMERS = ("tiny-sd3", "tiny-flux", "tiny-zimage", "tiny-qwenimage", "tiny-flux2")
# what each runs with besides configs/tiny.yaml: FLUX.1-dev's guidance value (it is conditioning); shorter text where
# the default length makes the tiny runs slow
EXTRA = {
    "tiny-flux": ("model.max_sequence_length=32", "sample.guidance_scale=3.5"),
    "tiny-qwenimage": ("model.max_sequence_length=192",),
}
# the objective each family's 2-process check runs (spin_exact where the family's sampler inversion is new)
TWO_PROCESS_OBJECTIVE = {
    "tiny-sdxl": "spin_approx",
    "tiny-sd3": "spin_exact",
    "tiny-sd35": "spin_approx",
    "tiny-flux": "spin_exact",
    "tiny-zimage": "spin_exact",
    "tiny-qwenimage": "spin_approx",
    "tiny-flux2": "spin_exact",
}


def settings(preset: str) -> list[str]:
    """The --set overrides that run `preset` in the family tests."""
    return [f"model.preset={preset}", *EXTRA.get(preset, ())]
