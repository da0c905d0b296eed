"""The denoising loss shared by hardening, customer training and the world's pretraining.

The regression target follows the scheduler's ``prediction_type``: the added noise
for ``epsilon`` (SD 1.x), the velocity ``alpha_t * eps - sigma_t * x0`` for
``v_prediction`` (SD 2.x 768), the clean latent for ``sample``. Getting this wrong
silently trains a model to predict the wrong quantity, so unknown types raise.

Noise for training comes from ``training_scheduler``, never from a pipeline's inference scheduler:
Euler and Euler-ancestral index sigmas by the timesteps of their last ``set_timesteps`` (empty until a
render, then only those few), several inference schedulers have no ``get_velocity``, and sample renders
during training reset the inference scheduler's state.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

_DDPM_FIELDS = frozenset(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}


def training_scheduler(config) -> DDPMScheduler:
    """A DDPM scheduler with the model's noise schedule (betas, ``num_train_timesteps``,
    ``prediction_type``, ``timestep_spacing``, zero-SNR rescaling) from any scheduler's config,
    as diffusers' training scripts build it; fields only inference schedulers have are dropped."""
    return DDPMScheduler.from_config({k: v for k, v in dict(config).items() if k in _DDPM_FIELDS})


def pixels_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images [N, H, W, 3] to the VAE's input: float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass(frozen=True)
class NoisyBatch:
    """Inputs a UNet sees during training, and what it should predict."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def add_noise(scheduler: DDPMScheduler, latents: torch.Tensor, generator: torch.Generator | None = None,
              timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
              noise_offset: float = 0.0) -> NoisyBatch:
    """Sample timesteps and noise, and the matching target for the scheduler's parameterisation.

    ``noise_offset`` adds a per-channel constant to the noise (scaled by it), which lets a model learn
    very dark and very bright images (diffusers' ``--noise_offset``)."""
    n = latents.shape[0]
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
    if noise_offset:
        offset = torch.randn((n, latents.shape[1], 1, 1), generator=generator, dtype=latents.dtype)
        noise = noise + noise_offset * offset.to(latents.device)
    timesteps = timesteps.to(latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif kind == "sample":
        target = latents
    else:
        raise ValueError(f"prediction_type {kind!r} not in ('epsilon', 'v_prediction', 'sample')")
    return NoisyBatch(noisy, timesteps, target)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor | None:
    """Min-SNR-gamma loss weights (Hang et al., 2023), expressed for the scheduler's target; None
    (unweighted) when ``gamma`` is None.

    Clipping the signal-to-noise ratio at ``gamma`` stops the nearly noise-free timesteps
    from dominating the gradient, which speeds up convergence several-fold.
    """
    if gamma is None:
        return None
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    if kind == "sample":
        return clipped
    raise ValueError(f"prediction_type {kind!r} not in ('epsilon', 'v_prediction', 'sample')")


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in float32 (fp16/bf16 predictions lose the small residuals otherwise),
    optionally weighted per example."""
    err = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_example = err.mean(dim=tuple(range(1, err.ndim)))
    if weights is not None:
        per_example = per_example * weights.float()
    return per_example if reduction == "none" else per_example.mean()
