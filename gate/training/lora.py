"""LoRA fine-tuning of a text-to-image pipeline, as customers run it.

The base weights are frozen; a peft adapter of rank ``rank`` is trained on the UNet's
attention projections with the shared denoising loss, and saved as
``pytorch_lora_weights.safetensors`` in the folder layout that plain diffusers'
``pipe.load_lora_weights(folder)`` reads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from auditing.models.denoising import add_noise, denoising_loss
from auditing.models.examples import encode_images, encode_prompts

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 4
    learning_rate: float = 1e-4
    steps: int = 500
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self):
        for f in ("rank", "steps", "batch_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1 (got {getattr(self, f)})")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1] (got {self.learning_rate})")


def train_lora(pipe, examples: list[tuple[Image.Image, str]], settings: LoraSettings, out: str | Path) -> Path:
    """Train a UNet attention LoRA on (image, caption) pairs; return the weights file."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    latents = encode_images(pipe, [im for im, _ in examples])
    hidden = encode_prompts(pipe, [c for _, c in examples])
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.rank,
                                     target_modules=list(TARGET_MODULES), init_lora_weights="gaussian"))
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.learning_rate)
    pipe.unet.train()
    order = random.Random(settings.seed)
    for _ in (bar := tqdm(range(settings.steps), desc="train: lora", unit="step")):
        idx = torch.tensor(order.sample(range(len(examples)), min(settings.batch_size, len(examples))))
        batch = add_noise(pipe.scheduler, latents[idx], generator=gen)
        pred = pipe.unet(batch.noisy, batch.timesteps, hidden[idx]).sample
        loss = denoising_loss(pred, batch.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    pipe.unet.eval()
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              safe_serialization=True)
    tmp.rename(out)
    return out / LORA_WEIGHTS
