"""LoRA fine-tuning of a text-to-image pipeline, as customers run it.

The base weights are frozen; a peft adapter of rank ``rank`` is trained on the UNet's attention
projections (and, with ``train_text_encoder``, on the text encoders': SDXL has two) with the shared
denoising loss, and saved as ``pytorch_lora_weights.safetensors`` by the pipeline class's own LoRA
saver, so plain diffusers' ``pipe.load_lora_weights(folder)`` reads it, every adapter in the one file.
"""

from __future__ import annotations

import time
from pathlib import Path

from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image

from auditing.models.conditioning import encode_text, encode_tokens, predict, text_encoders, tokenize
from auditing.models.denoising import add_noise, denoising_loss, min_snr_weights, training_scheduler
from auditing.models.examples import TrainingImages

from .job import TrainingResult
from .loop import Notify, Progress, batch_indices, begin, run_fingerprint, run_steps, staged_output
from .settings import LoraSettings

__all__ = ["LORA_WEIGHTS", "LoraSettings", "train_lora"]

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP self-attention
TEXT_ENCODER_LAYERS = ("text_encoder_lora_layers", "text_encoder_2_lora_layers")  # save_lora_weights' names


def _adapter(rank: int, targets: tuple[str, ...]) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights="gaussian")


def save_lora(pipe, folder: Path, with_text_encoder: bool) -> Path:
    """Write the trained adapters where ``pipe.load_lora_weights(folder)`` finds them."""
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    if with_text_encoder:
        for name, encoder in zip(TEXT_ENCODER_LAYERS, text_encoders(pipe)):
            layers[name] = get_peft_model_state_dict(encoder)
    type(pipe).save_lora_weights(folder, safe_serialization=True, **layers)
    return folder / LORA_WEIGHTS


def train_lora(pipe, examples: list[tuple[Image.Image, str]], settings: LoraSettings, out: str | Path,
               progress: Progress | None = None, state_dir: Path | None = None,
               notify: Notify | None = None) -> TrainingResult:
    """Train LoRA adapters on (image, caption) pairs into the new folder ``out``."""
    started = time.perf_counter()
    out = Path(out)
    captions = [c for _, c in examples]
    with staged_output(out) as work:
        size = begin(pipe, settings)
        images = TrainingImages(pipe, [im for im, _ in examples], size, settings.crop, settings.random_flip)
        groups = []
        if settings.train_text_encoder:
            ids = tokenize(pipe, captions)
            for encoder in text_encoders(pipe):
                encoder.add_adapter(_adapter(settings.rank, TEXT_ENCODER_TARGET_MODULES))
                if settings.gradient_checkpointing:
                    encoder.gradient_checkpointing_enable()
                groups.append((encoder, settings.text_encoder_lr or settings.learning_rate))

            def condition(idx):
                return encode_tokens(pipe, [i[idx] for i in ids])
        else:
            text = encode_text(pipe, captions)

            def condition(idx):
                return text[idx]
        pipe.unet.add_adapter(_adapter(settings.rank, TARGET_MODULES))
        groups.insert(0, (pipe.unet, settings.learning_rate))
        noise_scheduler = training_scheduler(pipe.scheduler.config)

        def step_loss(rng, gen):
            idx = batch_indices(rng, len(images), settings.batch_size)
            latents, time_ids = images.batch(idx, rng)
            batch = add_noise(noise_scheduler, latents, generator=gen, noise_offset=settings.noise_offset)
            prediction = predict(pipe.unet, batch.noisy, batch.timesteps, condition(idx), time_ids)
            weights = min_snr_weights(noise_scheduler, batch.timesteps, settings.snr_gamma)
            return denoising_loss(prediction, batch.target, weights=weights)

        weights, samples, checkpoints, resumed = run_steps(
            pipe, settings, groups, step_loss, lambda folder: save_lora(pipe, folder, settings.train_text_encoder),
            settings.validation_prompt or captions[0], size, work, progress, desc="train: lora",
            state=None if state_dir is None else (Path(state_dir), run_fingerprint(settings, examples)),
            notify=notify)
    return TrainingResult(out / weights, "lora", [out / p for p in samples], [out / p for p in checkpoints],
                          time.perf_counter() - started, resumed)
