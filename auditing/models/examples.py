"""Training images as the UNet sees them: cropped square without squashing, then VAE latents.

Each image's shorter side is resized to the training size (aspect ratio kept) and a square is cut from
it, at the centre or at random, optionally mirrored, as diffusers' training scripts prepare images.
Where the image came from (original size, crop corner) is kept as SDXL's time ids. A fixed crop is
encoded once before training; random crops and flips are drawn and encoded per batch.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageOps

from .conditioning import time_ids
from .denoising import pixels_to_tensor

CROPS = ("center", "random")
ENCODE_BATCH = 64


def crop_square(image: Image.Image, size: int, crop: str = "center", flip: bool = False,
                rng: random.Random | None = None) -> tuple[Image.Image, list[int]]:
    """The ``size`` x ``size`` training view of ``image`` and its SDXL time ids.

    ``crop`` "random" draws the corner uniformly from ``rng``; ``flip`` mirrors the image half the time."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS} (got {crop!r})")
    image = image.convert("RGB")
    original = (image.height, image.width)
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    if flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if crop == "random":
        top, left = rng.randint(0, height - size), rng.randint(0, width - size)
    else:
        top, left = (height - size) // 2, (width - size) // 2
    return image.crop((left, top, left + size, top + size)), time_ids(original, (top, left), (size, size))


@torch.no_grad()
def encode_pixels(pipe, images: list[Image.Image]) -> torch.Tensor:
    """Scaled VAE latent means of equally sized RGB images."""
    out = []
    for i in range(0, len(images), ENCODE_BATCH):
        pixels = pixels_to_tensor(np.stack([np.asarray(im) for im in images[i:i + ENCODE_BATCH]]))
        pixels = pixels.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
        out.append(pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor)
    return torch.cat(out)


def encode_images(pipe, images: list[Image.Image], size: int | None = None) -> torch.Tensor:
    """Latents of the images' centre crops at ``size`` (default: the UNet's native size)."""
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return encode_pixels(pipe, [crop_square(im, size)[0] for im in images])


class TrainingImages:
    """The customer's images for a training loop: ``batch(idx, rng)`` gives latents and time ids."""

    def __init__(self, pipe, images: list[Image.Image], size: int, crop: str = "center", flip: bool = False):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS} (got {crop!r})")
        self.pipe, self.images, self.size, self.crop, self.flip = pipe, images, size, crop, flip
        self.fixed = crop == "center" and not flip
        if self.fixed:
            views = [crop_square(im, size) for im in images]
            self.latents = encode_pixels(pipe, [v for v, _ in views])
            self.time_ids = torch.tensor([ids for _, ids in views])

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fixed:
            return self.latents[idx], self.time_ids[idx]
        views = [crop_square(self.images[i], self.size, self.crop, self.flip, rng) for i in idx.tolist()]
        return encode_pixels(self.pipe, [v for v, _ in views]), torch.tensor([ids for _, ids in views])
