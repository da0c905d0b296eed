"""LoRA fine-tuning of a text-to-image pipeline, as customers run it.

The base weights are frozen; a peft adapter of rank ``rank`` is trained on the UNet's
attention projections (and, with ``train_text_encoder``, on the text encoder's) with the
shared denoising loss, and saved as ``pytorch_lora_weights.safetensors`` in the folder
layout that plain diffusers' ``pipe.load_lora_weights(folder)`` reads, both adapters in
the one file.
"""

from __future__ import annotations

import time
from pathlib import Path

from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image

from auditing.models.denoising import add_noise, denoising_loss, training_scheduler
from auditing.models.examples import encode_images, encode_prompts, tokenize

from .job import TrainingResult
from .loop import Progress, batch_indices, begin, run_steps, staged_output
from .settings import LoraSettings

__all__ = ["LORA_WEIGHTS", "LoraSettings", "train_lora"]

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP self-attention


def _adapter(rank: int, targets: tuple[str, ...]) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights="gaussian")


def save_lora(pipe, folder: Path, with_text_encoder: bool) -> Path:
    """Write the trained adapters where ``pipe.load_lora_weights(folder)`` finds them."""
    text_encoder = get_peft_model_state_dict(pipe.text_encoder) if with_text_encoder else None
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              text_encoder_lora_layers=text_encoder, safe_serialization=True)
    return folder / LORA_WEIGHTS


def train_lora(pipe, examples: list[tuple[Image.Image, str]], settings: LoraSettings, out: str | Path,
               progress: Progress | None = None) -> TrainingResult:
    """Train LoRA adapters on (image, caption) pairs into the new folder ``out``."""
    started = time.perf_counter()
    out = Path(out)
    captions = [c for _, c in examples]
    with staged_output(out) as work:
        size = begin(pipe, settings)
        latents = encode_images(pipe, [im for im, _ in examples], size=size)
        if settings.train_text_encoder:
            pipe.text_encoder.add_adapter(_adapter(settings.rank, TEXT_ENCODER_TARGET_MODULES))
            ids = tokenize(pipe, captions)
            modules = [pipe.unet, pipe.text_encoder]

            def condition(idx):
                return pipe.text_encoder(ids[idx])[0]
        else:
            hidden = encode_prompts(pipe, captions)
            modules = [pipe.unet]

            def condition(idx):
                return hidden[idx]
        pipe.unet.add_adapter(_adapter(settings.rank, TARGET_MODULES))

        noise_scheduler = training_scheduler(pipe.scheduler.config)

        def step_loss(rng, gen):
            idx = batch_indices(rng, len(examples), settings.batch_size)
            batch = add_noise(noise_scheduler, latents[idx], generator=gen)
            return denoising_loss(pipe.unet(batch.noisy, batch.timesteps, condition(idx)).sample, batch.target)

        weights, samples, checkpoints = run_steps(
            pipe, settings, modules, step_loss, lambda folder: save_lora(pipe, folder, settings.train_text_encoder),
            captions[0], size, work, progress, desc="train: lora")
    return TrainingResult(out / weights, "lora", [out / p for p in samples], [out / p for p in checkpoints],
                          time.perf_counter() - started)
