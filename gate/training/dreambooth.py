"""DreamBooth (Ruiz et al., 2023): every UNet weight fine-tuned on the customer's images.

Every training image is captioned with ``instance_prompt``. With ``class_prompt``, the base
model first renders ``num_class_images`` images of the class (image i from seed
``seed + i``), and each step adds ``prior_loss_weight`` times the denoising loss on them, so
the class keeps its look while the instance is learnt (prior preservation). The text encoder
and VAE stay frozen; the UNet trains in fp32 (autocast to fp16/bf16 under ``mixed_precision``). On
SDXL the class images' time ids are their rendered size, uncropped. The UNet is saved as a diffusers
sub-folder ``unet/``; its single ``.safetensors`` file is the artifact the gate audits.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from PIL import Image

from auditing.models.conditioning import TextConditioning, encode_text, predict
from auditing.models.denoising import add_noise, denoising_loss, min_snr_weights, training_scheduler
from auditing.models.examples import TrainingImages
from auditing.render import render_batch

from .job import TrainingResult
from .loop import (
    GUIDANCE_SCALE,
    Notify,
    Progress,
    autocast,
    batch_indices,
    begin,
    run_fingerprint,
    run_steps,
    staged_output,
)
from .settings import DreamBoothSettings

CLASS_IMAGE_INFERENCE_STEPS = 25
CLASS_IMAGE_BATCH_SIZE = 4
MAX_SHARD_SIZE = "1000GB"  # one weights file, never shards: the gate stores and hashes a single file


def save_unet(pipe, folder: Path) -> Path:
    """Write ``folder/unet/`` (config and weights) as ``UNet2DConditionModel.from_pretrained`` reads it."""
    pipe.unet.save_pretrained(folder / "unet", safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    return folder / "unet" / SAFETENSORS_WEIGHTS_NAME


def class_images(pipe, settings: DreamBoothSettings, size: int) -> list[Image.Image]:
    """The base model's own images of the class, from fixed seeds."""
    seeds = [settings.seed + i for i in range(settings.num_class_images)]
    images = []
    for start in range(0, len(seeds), CLASS_IMAGE_BATCH_SIZE):
        chunk = seeds[start:start + CLASS_IMAGE_BATCH_SIZE]
        with autocast(pipe, settings):
            images += render_batch(pipe, [settings.class_prompt] * len(chunk), chunk, GUIDANCE_SCALE,
                                   CLASS_IMAGE_INFERENCE_STEPS, width=size, height=size)
    return images


def train_dreambooth(pipe, examples: list[tuple[Image.Image, str]], settings: DreamBoothSettings, out: str | Path,
                     progress: Progress | None = None, state_dir: Path | None = None,
                     notify: Notify | None = None) -> TrainingResult:
    """Fine-tune the UNet on the images (captions ignored) into the new folder ``out``."""
    started = time.perf_counter()
    out = Path(out)
    with staged_output(out) as work:
        size = begin(pipe, settings, full_unet=True)
        images = TrainingImages(pipe, [im for im, _ in examples], size, settings.crop, settings.random_flip)
        instance = encode_text(pipe, [settings.instance_prompt])
        prior = settings.class_prompt is not None
        if prior:
            if progress:
                progress(0.0, "generating class images")
            rendered = class_images(pipe, settings, size)
            (work / "class_images").mkdir()
            for i, image in enumerate(rendered):
                image.save(work / "class_images" / f"{i:04d}.png")
            class_set = TrainingImages(pipe, rendered, size)
            class_text = encode_text(pipe, [settings.class_prompt])
        pipe.unet.requires_grad_(True)
        noise_scheduler = training_scheduler(pipe.scheduler.config)

        def step_loss(rng, gen):
            idx = batch_indices(rng, len(images), settings.batch_size)
            x, time_ids = images.batch(idx, rng)
            text = instance.repeat(len(idx))
            if prior:  # one UNet call on instance and class examples together
                cidx = batch_indices(rng, len(class_set), settings.batch_size)
                cx, ctime_ids = class_set.batch(cidx, rng)
                x, time_ids = torch.cat([x, cx]), torch.cat([time_ids, ctime_ids])
                text = TextConditioning.cat([text, class_text.repeat(len(cidx))])
            batch = add_noise(noise_scheduler, x, generator=gen, noise_offset=settings.noise_offset)
            losses = denoising_loss(predict(pipe.unet, batch.noisy, batch.timesteps, text, time_ids), batch.target,
                                    reduction="none",
                                    weights=min_snr_weights(noise_scheduler, batch.timesteps, settings.snr_gamma))
            loss = losses[:len(idx)].mean()
            if prior:
                loss = loss + settings.prior_loss_weight * losses[len(idx):].mean()
            return loss

        weights, samples, checkpoints, resumed = run_steps(
            pipe, settings, [(pipe.unet, settings.learning_rate)], step_loss, lambda folder: save_unet(pipe, folder),
            settings.validation_prompt or settings.instance_prompt, size, work, progress, desc="train: dreambooth",
            state=None if state_dir is None else (Path(state_dir), run_fingerprint(settings, examples)),
            notify=notify)
    return TrainingResult(out / weights, "unet", [out / p for p in samples], [out / p for p in checkpoints],
                          time.perf_counter() - started, resumed)
