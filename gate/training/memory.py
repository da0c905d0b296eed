"""Will a training job fit on a worker's GPU? An estimate the API checks before it queues the job.

Kept free of torch: the figures per family were measured on the meta device by
``python -m benchmarks.training_memory`` from the published architectures, and a test re-measures them.
The estimate (docs/training.md, "GPU memory") adds:

* the weights: frozen ones in the training precision (fp32 for ``mixed_precision`` "no", else 2 bytes),
  the VAE in fp32, a DreamBooth UNet in fp32;
* the trainable parameters' gradient and two Adam moments (fp32 each), plus their fp32 copy for LoRA;
* the UNet's activations kept for the backward pass: batch x latent pixels x the measured bytes per
  latent pixel (fp32), halved under fp16/bf16 autocast, the checkpointed figure with gradient
  checkpointing;
* ``CUDA_OVERHEAD_BYTES`` for the CUDA context and kernel workspaces, then ``FRAGMENTATION`` on top
  for the caching allocator.

The text encoders' activations (77 tokens) and the VAE's transient encoding peak are small beside these
and not counted. No GPU has checked these figures yet; they are an estimate, meant to refuse jobs that
cannot fit, not to pack GPUs to the last byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
CUDA_OVERHEAD_BYTES = 1 * GIB
FRAGMENTATION = 1.2
ADAM_BYTES = 12  # fp32 gradient + exp_avg + exp_avg_sq per trainable parameter
HALF_PRECISIONS = ("fp16", "bf16")


@dataclass(frozen=True)
class Footprint:
    """One family's measured sizes (``benchmarks.training_memory.footprint``)."""

    native_resolution: int
    unet_params: int
    text_encoder_params: tuple[int, ...]
    vae_params: int
    unet_lora_params_per_rank: int
    text_encoder_lora_params_per_rank: tuple[int, ...]
    activation_bytes_per_latent_pixel: int
    checkpointed_activation_bytes_per_latent_pixel: int


FOOTPRINTS = {  # python -m benchmarks.training_memory
    "sd1": Footprint(512, 859_520_964, (123_060_480,), 83_653_863, 199_296, (73_728,), 439_401, 168_552),
    "sd2": Footprint(768, 865_910_724, (340_387_840,), 83_653_863, 207_488, (188_416,), 445_097, 182_867),
    "sdxl": Footprint(1024, 2_567_463_684, (123_060_480, 694_659_840), 83_653_863, 1_451_520, (73_728, 327_680),
                      867_721, 372_644),
}


def estimate_bytes(family: str, method: str, settings) -> int:
    """GPU bytes a job of ``method`` with these training settings needs on a ``family`` base model."""
    fp = FOOTPRINTS[family]
    half = settings.mixed_precision in HALF_PRECISIONS
    frozen = 2 if half else 4
    resolution = settings.resolution or fp.native_resolution
    weights = sum(fp.text_encoder_params) * frozen + fp.vae_params * 4
    if method == "dreambooth":
        weights += fp.unet_params * 4
        trainable = fp.unet_params * ADAM_BYTES
    else:
        weights += fp.unet_params * frozen
        lora = fp.unet_lora_params_per_rank + (sum(fp.text_encoder_lora_params_per_rank)
                                               if settings.train_text_encoder else 0)
        trainable = lora * settings.rank * (4 + ADAM_BYTES)
    per_pixel = (fp.checkpointed_activation_bytes_per_latent_pixel if settings.gradient_checkpointing
                 else fp.activation_bytes_per_latent_pixel)
    activations = settings.batch_size * (resolution // 8) ** 2 * per_pixel * (0.5 if half else 1.0)
    return round((weights + trainable + activations + CUDA_OVERHEAD_BYTES) * FRAGMENTATION)


def family_of(folder: str | Path) -> str | None:
    """sd1, sd2 or sdxl from a diffusers folder's configs (pipeline class, cross-attention width);
    None for a folder whose UNet is none of the published ones (a tiny test model, say) or without
    readable configs."""
    folder = Path(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text())
        unet = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError):  # no readable configs: not a folder of a known family
        return None
    width = unet.get("cross_attention_dim")
    if index.get("_class_name") == "StableDiffusionXLPipeline":
        return "sdxl" if width == 2048 else None
    return {768: "sd1", 1024: "sd2"}.get(width)
