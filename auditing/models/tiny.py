"""Tiny random-weight text-to-image pipelines built from configs.

Same classes and folder layout as the real SD 1.x / 2.x / SDXL pipelines, a few
hundred thousand parameters each, so every code path that will later meet real
weights on a GPU runs here on a CPU in seconds. Weights are seeded: the same spec
and seed give the same pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import build_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny pipeline. Defaults are small enough for unit tests."""

    family: str = "sd1"
    sample_size: int = 8  # latent side; image side = sample_size * vae_scale_factor
    unet_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    text_hidden: int = 32
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4
    norm_groups: int = 8
    max_length: int = 16
    vae_mid_attention: bool = True
    # Which UNet levels carry cross-attention; None = all but the deepest (SD's layout).
    attention_levels: tuple[bool, ...] | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} not in {FAMILIES}")


def _text_encoder(spec: TinySpec, vocab_size: int, eos_id: int, projection: bool = False,
                  hidden: int | None = None):
    hidden = hidden or spec.text_hidden
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=max(1, hidden // 16),
        max_position_embeddings=spec.max_length,
        projection_dim=hidden,
        bos_token_id=eos_id - 1,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        hidden_act="quick_gelu",
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(spec: TinySpec) -> AutoencoderKL:
    n = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.vae_channels,
        latent_channels=spec.latent_channels,
        layers_per_block=1,
        norm_num_groups=spec.norm_groups,
        sample_size=spec.sample_size * 2 ** (n - 1),
        mid_block_add_attention=spec.vae_mid_attention,
    )


def _unet(spec: TinySpec, cross_attention_dim: int, **extra) -> UNet2DConditionModel:
    n = len(spec.unet_channels)
    attn = spec.attention_levels or (True,) * (n - 1) + (False,)
    if len(attn) != n:
        raise ValueError(f"attention_levels has {len(attn)} entries for {n} UNet levels")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DConditionModel(
        sample_size=spec.sample_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        layers_per_block=spec.layers_per_block,
        block_out_channels=spec.unet_channels,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=spec.norm_groups,
        **extra,
    )


def _scheduler(prediction_type: str) -> DDIMScheduler:
    # SD's training schedule; DDIM so that few-step sampling works on tiny models.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_pipeline(spec: TinySpec = TinySpec(), seed: int = 0):
    """A random-weight SD 1.x / 2.x / SDXL pipeline with an offline tokenizer."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(model_max_length=spec.max_length)
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    vae = _vae(spec)
    if spec.family == "sdxl":
        te1 = _text_encoder(spec, vocab, eos)
        te2 = _text_encoder(spec, vocab, eos, projection=True, hidden=spec.text_hidden * 2)
        unet = _unet(
            spec,
            cross_attention_dim=spec.text_hidden * 3,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=spec.text_hidden * 2 + 6 * 8,
            transformer_layers_per_block=1,
        )
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
            tokenizer_2=build_tokenizer(model_max_length=spec.max_length), unet=unet,
            scheduler=_scheduler("epsilon"),
        )
    text_encoder = _text_encoder(spec, vocab, eos)
    sd2 = spec.family == "sd2"
    unet = _unet(spec, cross_attention_dim=spec.text_hidden, use_linear_projection=sd2)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=_scheduler("v_prediction" if sd2 else "epsilon"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
