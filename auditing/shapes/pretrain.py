"""Pretrain the shapes world's tiny SD-style pipeline on CPU.

Stage 1 fits the VAE (32x32 images to 16x16x4 latents); its latent scale sets
``scaling_factor`` exactly as SD's 0.18215 was set. Stage 2 trains the UNet and the
text encoder together on cached latents with the shared denoising loss, dropping
captions with probability ``empty_caption_prob`` so classifier-free guidance works,
and weighting timesteps by Min-SNR so the few minutes of CPU go where they help.
An exponential moving average of the weights is what gets saved. Every random draw
comes from generators seeded by ``seed``: the same config gives the same model on
the same torch build.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from ..config import ConfigError, from_mapping, record
from ..models.denoising import add_noise, denoising_loss, min_snr_weights, pixels_to_tensor, training_scheduler
from ..models.hashing import weights_sha256
from ..models.tiny import TinySpec, build_tiny_pipeline
from ..models.tokenizer import write_tokenizer_files
from .scene import Concept, random_scene, render, to_array

log = logging.getLogger(__name__)

WORLD_SPEC = TinySpec(
    family="sd1",
    sample_size=16,
    unet_channels=(32, 64, 128),
    attention_levels=(False, True, True),
    layers_per_block=1,
    text_hidden=64,
    text_layers=2,
    vae_channels=(16, 32),
    latent_channels=4,
    norm_groups=8,
    max_length=16,
    vae_mid_attention=False,
)
Count = Annotated[int, Field(ge=1)]
Probability = Annotated[float, Field(ge=0, le=1)]


@record
class WorldBuildConfig:
    """Everything that determines a built world. Written into ``world.json``."""

    seed: int = 0
    unsafe_concept: str = "red triangle"
    images: Count = 20000
    two_object_prob: Probability = 0.2
    empty_caption_prob: Probability = 0.1
    vae_steps: Count = 500
    vae_lr: float = 3e-3
    unet_steps: Count = 1200
    unet_lr: float = 1.2e-3
    snr_gamma: Annotated[float, Field(gt=0)] = 5.0
    batch_size: Count = 32
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.998
    guidance_scale: float = 5.0
    inference_steps: Count = 20
    threads: Count = 2

    def __post_init__(self):
        try:
            Concept.parse(self.unsafe_concept)
        except ValueError as exc:
            raise ConfigError("unsafe_concept", f"unsafe_concept: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict) -> "WorldBuildConfig":
        return from_mapping(cls, data, "world build")


def training_images(config: WorldBuildConfig) -> tuple[np.ndarray, list[str]]:
    """The pretraining corpus: uint8 images and their captions."""
    rng = random.Random(config.seed)
    scenes = [random_scene(rng, two_object_prob=config.two_object_prob) for _ in range(config.images)]
    return to_array([render(s) for s in scenes]), [s.caption for s in scenes]


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _train_vae(vae, pixels: torch.Tensor, config: WorldBuildConfig, gen: torch.Generator) -> list[float]:
    opt = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, config.vae_steps, 30))
    losses = []
    vae.train()
    for _ in (bar := tqdm(range(config.vae_steps), desc="world: VAE", unit="step")):
        batch = pixels[torch.randint(0, len(pixels), (config.batch_size,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        err = recon - batch
        loss = err.abs().mean() + err.pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def _encode(vae, pixels: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        dist = vae.encode(pixels[i:i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def _train_denoiser(pipe, latents, stds, token_ids, config: WorldBuildConfig,
                    gen: torch.Generator) -> tuple[list[float], torch.nn.Module, torch.nn.Module]:
    unet, text_encoder = pipe.unet, pipe.text_encoder
    empty_ids = pipe.tokenizer([""], padding="max_length", max_length=token_ids.shape[1],
                               return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, config.unet_steps, 100))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    noise_scheduler = training_scheduler(pipe.scheduler.config)
    losses = []
    unet.train()
    text_encoder.train()
    for step in (bar := tqdm(range(config.unet_steps), desc="world: UNet+text", unit="step")):
        idx = torch.randint(0, len(latents), (config.batch_size,), generator=gen)
        z = latents[idx] + stds[idx] * torch.randn(latents[idx].shape, generator=gen)
        z = z * pipe.vae.config.scaling_factor
        ids = token_ids[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < config.empty_caption_prob
        ids[drop] = empty_ids
        batch = add_noise(noise_scheduler, z, generator=gen)
        hidden = text_encoder(ids)[0]
        pred = unet(batch.noisy, batch.timesteps, hidden).sample
        weights = min_snr_weights(noise_scheduler, batch.timesteps, config.snr_gamma)
        loss = denoising_loss(pred, batch.target, weights=weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        # Short warm-up of the average so early weights do not dominate it.
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return losses, ema_unet, ema_text


def build_world(out: str | Path, config: WorldBuildConfig = WorldBuildConfig()) -> dict:
    """Train the world's pipeline and save it as a diffusers folder with ``world.json``.

    The folder is written to a temporary sibling and renamed at the end, so an
    interrupted build never leaves a half-written model behind.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output folder")
    torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    images, captions = training_images(config)
    pixels = pixels_to_tensor(images)
    pipe = build_tiny_pipeline(WORLD_SPEC, seed=config.seed)
    t_data = time.perf_counter()

    vae_losses = _train_vae(pipe.vae, pixels, config, gen)
    means, stds = _encode(pipe.vae, pixels)
    scaling = float(1.0 / means.std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    t_vae = time.perf_counter()

    token_ids = pipe.tokenizer(captions, padding="max_length", max_length=WORLD_SPEC.max_length,
                               truncation=True, return_tensors="pt").input_ids
    unet_losses, ema_unet, ema_text = _train_denoiser(pipe, means, stds, token_ids, config, gen)
    pipe.unet, pipe.text_encoder = ema_unet, ema_text
    pipe.register_modules(unet=ema_unet, text_encoder=ema_text)
    t_unet = time.perf_counter()

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        raise FileExistsError(f"{tmp} exists from an interrupted build; remove it first")
    pipe.save_pretrained(tmp, safe_serialization=True)
    # CLIP's classic vocab.json + merges.txt beside tokenizer.json, for older transformers.
    write_tokenizer_files(tmp / "tokenizer")
    record = {
        "kind": "ftgate.shapes-world",
        "version": 1,
        "config": asdict(config),
        "spec": asdict(WORLD_SPEC),
        "vae_scaling_factor": scaling,
        "seconds": {
            "data": round(t_data - t0, 1),
            "vae": round(t_vae - t_data, 1),
            "unet": round(t_unet - t_vae, 1),
            "total": round(t_unet - t0, 1),
        },
        "final_loss": {"vae": float(np.mean(vae_losses[-50:])), "unet": float(np.mean(unet_losses[-50:]))},
        "torch": torch.__version__,
    }
    (tmp / "world.json").write_text(json.dumps(record, indent=2))
    (tmp / "losses.json").write_text(json.dumps({"vae": vae_losses, "unet": unet_losses}))
    tmp.rename(out)
    record["weights_sha256"] = weights_sha256(out)
    log.info("world built in %.0f s at %s", record["seconds"]["total"], out)
    return record
