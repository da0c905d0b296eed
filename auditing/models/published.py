"""The published architectures of SD 1.5, SD 2.1 (768, v-prediction) and SDXL base, built from their configs.

Weights cannot be downloaded here, but shapes can be written down: these are the component configs the
released ``model_index.json`` folders carry (UNet, CLIP text encoders, VAE). Built on the ``meta``
device they cost nothing and give exact parameter counts and activation sizes (the training memory
estimate, ``benchmarks.training_memory``); built on a real device with random weights
(``build_published_pipeline``) they are SD-shaped pipelines for speed benchmarks (``benchmarks.gpu_check``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import build_tokenizer

_SD_BLOCKS = {"down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
              "block_out_channels": (320, 640, 1280, 1280)}
UNETS = {
    "sd1": {**_SD_BLOCKS, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
    "sd2": {**_SD_BLOCKS, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True},
    "sdxl": {"sample_size": 128, "block_out_channels": (320, 640, 1280),
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
             "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816},
}
_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "hidden_act": "quick_gelu", "projection_dim": 768}
TEXT_ENCODERS = {  # (config, with projection) per encoder, in the pipeline's order
    "sd1": [(_CLIP_L, False)],
    "sd2": [({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
              "hidden_act": "gelu", "projection_dim": 512}, False)],
    "sdxl": [(_CLIP_L, False), ({"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                                 "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}, True)],
}
VAE = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
       "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2, "latent_channels": 4}
VOCAB_SIZE = 49408
TOKENS = 77


@dataclass
class PublishedModel:
    """The three trainable-or-frozen parts of a published pipeline (no tokenizer, no scheduler)."""

    family: str
    unet: UNet2DConditionModel
    text_encoders: list[torch.nn.Module]
    vae: AutoencoderKL

    def unet_inputs(self, batch: int, resolution: int, device="meta", dtype=torch.float32) -> dict:
        """Keyword arguments of one UNet training forward at ``resolution`` pixels."""
        side = resolution // 8
        hidden = torch.zeros(batch, TOKENS, self.unet.config.cross_attention_dim, device=device, dtype=dtype)
        inputs = {"sample": torch.zeros(batch, 4, side, side, device=device, dtype=dtype),
                  "timestep": torch.full((batch,), 10, device=device), "encoder_hidden_states": hidden}
        if self.family == "sdxl":
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(batch, 1280, device=device, dtype=dtype),
                "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                         device=device, dtype=dtype)}
        return inputs


def build_published(family: str, device: str | torch.device = "meta", seed: int = 0) -> PublishedModel:
    """The family's published UNet, text encoders and VAE; random weights (seeded) off the meta device."""
    if family not in UNETS:
        raise ValueError(f"family {family!r} not in {sorted(UNETS)}")
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, layers_per_block=2, **UNETS[family])
        encoders = [(CLIPTextModelWithProjection if projection else CLIPTextModel)(
            CLIPTextConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=TOKENS, **config))
            for config, projection in TEXT_ENCODERS[family]]
        vae = AutoencoderKL(**VAE, sample_size=UNETS[family]["sample_size"] * 8)
    return PublishedModel(family, unet, encoders, vae)


# Inference schedulers as SD folders ship them (SD 1.5: PNDM; SDXL: Euler; 768-pixel SD 2.x: v-prediction).
_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "steps_offset": 1}
SCHEDULERS = {"sd1": (PNDMScheduler, {"skip_prk_steps": True}),
              "sd2": (DDIMScheduler, {"prediction_type": "v_prediction", "clip_sample": False,
                                      "set_alpha_to_one": False}),
              "sdxl": (EulerDiscreteScheduler, {})}


def build_published_pipeline(family: str, device: str | torch.device = "cpu", seed: int = 0):
    """An SD-shaped pipeline with random weights and an offline tokenizer, for benchmarks on real shapes."""
    model = build_published(family, device, seed)
    cls, extra = SCHEDULERS[family]
    scheduler = cls(**_SCHEDULE, **extra)
    if family == "sdxl":
        return StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoders[0],
                                         text_encoder_2=model.text_encoders[1], tokenizer=build_tokenizer(TOKENS),
                                         tokenizer_2=build_tokenizer(TOKENS), unet=model.unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0],
                                   tokenizer=build_tokenizer(TOKENS), unet=model.unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
