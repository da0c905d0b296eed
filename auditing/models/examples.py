"""Encoding training examples once, shared by customer training and hardening.

Images become VAE latents and prompts text-encoder states before any training loop
starts, so the loops only ever touch the UNet.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .denoising import pixels_to_tensor


@torch.no_grad()
def encode_images(pipe, images: list[Image.Image], batch_size: int = 64, size: int | None = None) -> torch.Tensor:
    """Scaled VAE latent means of the images resized to ``size`` x ``size`` (default: the UNet's native size)."""
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for i in range(0, len(images), batch_size):
        pixels = pixels_to_tensor(np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
                                            for im in images[i:i + batch_size]]))
        pixels = pixels.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
        out.append(pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor)
    return torch.cat(out)


def tokenize(pipe, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's maximum length, as pipelines do, on the text encoder's device."""
    ids = pipe.tokenizer(list(prompts), padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    return ids.to(pipe.text_encoder.device)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states of the padded prompts."""
    return pipe.text_encoder(tokenize(pipe, prompts))[0]
