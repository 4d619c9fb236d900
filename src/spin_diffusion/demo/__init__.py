"""The built-in CPU demo: the end-to-end runner (SFT vs SPIN on the shapes world, `spin_diffusion.world`), its
evaluation and the pretraining of its base model."""
