"""Training examples on disk, and their encodings, shared by customer training and hardening.

Two upload layouts are read: images with same-name ``.txt`` captions, and diffusers'
``imagefolder`` layout (``metadata.jsonl`` lines ``{"file_name": ..., "text": ...}``).
Encoding images to VAE latents and prompts to text-encoder states happens once per
dataset, so training loops only ever touch the UNet.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .denoising import pixels_to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METADATA = "metadata.jsonl"


def load_examples(folder: str | Path) -> list[tuple[Image.Image, str]]:
    """(image, caption) pairs from a caption folder or an imagefolder with ``metadata.jsonl``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such dataset folder")
    if (folder / METADATA).is_file():
        examples = []
        for line_no, line in enumerate((folder / METADATA).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name, caption = record["file_name"], record["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{folder / METADATA} line {line_no}: needs 'file_name' and 'text' ({exc})") from None
            path = folder / name
            if path.parent != folder or not path.is_file():
                raise ValueError(f"{folder / METADATA} line {line_no}: {name!r} is not a file in {folder}")
            examples.append((Image.open(path).convert("RGB"), str(caption).strip()))
    else:
        examples = []
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = path.with_suffix(".txt")
            if not caption.is_file():
                raise ValueError(f"{path.name}: no caption file {caption.name}")
            examples.append((Image.open(path).convert("RGB"), caption.read_text().strip()))
    if not examples:
        raise ValueError(f"{folder}: no images")
    return examples


@torch.no_grad()
def encode_images(pipe, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
    """Scaled VAE latent means at the UNet's native resolution."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for i in range(0, len(images), batch_size):
        pixels = pixels_to_tensor(np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
                                            for im in images[i:i + batch_size]]))
        pixels = pixels.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
        out.append(pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states, padded to the tokenizer's maximum length as pipelines do."""
    ids = pipe.tokenizer(list(prompts), padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]
