"""Scorer implementations, one module per family; use ``spin_diffusion.scoring.build_scorer`` to build them.

- ``clip``: PickScore, CLIP score, LAION aesthetic predictor (transformers ``CLIPModel``)
- ``hpsv2``: HPSv2 (open_clip when importable, else a converted transformers ``CLIPModel``)
- ``imagereward``: ImageReward (transformers BLIP vision + text models and the reward MLP)
- ``shapes``: the built-in shapes world's exact judge

Modules are imported lazily by ``build_scorer`` so that importing this package does not import transformers.
"""
