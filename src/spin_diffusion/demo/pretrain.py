"""Stage 0 of the demo: fit the tiny VAE of the `demo` preset to the shapes world.

A randomly initialised VAE decodes noise, so the demo first trains it as a plain autoencoder (MSE plus a
small KL term) on rendered images, and calibrates `scaling_factor` so that the latents the UNet sees have
unit variance, as Stable Diffusion's 0.18215 does for its VAE.
"""

from __future__ import annotations

import torch

from spin_diffusion.models import Components


def train_vae(
    c: Components,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
) -> dict[str, float]:
    """Train `c.vae` in place on `images` ([N, 3, H, W] in [-1, 1]); set its scaling_factor. Returns metrics."""
    vae = c.vae
    assert vae is not None
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    mse = torch.tensor(float("nan"))
    for _ in range(steps):
        x = images[torch.randint(0, images.shape[0], (batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = mse + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sample = images[: min(512, images.shape[0])]
        latents = vae.encode(sample).latent_dist.mean
        scale = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scale)
        recon = vae.decode(latents).sample
        final_mse = float(torch.nn.functional.mse_loss(recon, sample))
    return {"vae_train_mse": mse.item(), "vae_recon_mse": final_mse, "vae_scaling_factor": scale}
