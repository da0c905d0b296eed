"""What a UNet is conditioned on besides the noisy latent and the timestep, per model family.

SD 1.x and 2.x take the last hidden states of their one text encoder. SDXL takes the penultimate hidden
states of both its encoders side by side, the second encoder's pooled (projected) embedding, and six
micro-conditioning numbers per image: original size, crop top-left corner and target size, as
``StableDiffusionXLPipeline`` computes them at inference. Training has to feed the same inputs or the
UNet is trained on conditioning it never sees when it renders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def takes_time_ids(unet) -> bool:
    """Whether the UNet takes SDXL's added conditioning (pooled text embedding and time ids)."""
    return unet.config.get("addition_embed_type") == "text_time"


def is_sdxl(pipe) -> bool:
    return takes_time_ids(pipe.unet)


def text_encoders(pipe) -> list[torch.nn.Module]:
    """The text encoders the UNet's conditioning comes from, in the order their states are concatenated."""
    return [pipe.text_encoder, pipe.text_encoder_2] if is_sdxl(pipe) else [pipe.text_encoder]


def tokenize(pipe, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids of each text encoder, padded to its tokenizer's maximum length as pipelines pad them."""
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if is_sdxl(pipe) else [pipe.tokenizer]
    return [tok(list(prompts), padding="max_length", truncation=True, max_length=tok.model_max_length,
                return_tensors="pt").input_ids.to(encoder.device)
            for tok, encoder in zip(tokenizers, text_encoders(pipe))]


@dataclass(frozen=True)
class TextConditioning:
    """Per-prompt text inputs of the UNet: hidden states, and for SDXL the pooled embedding."""

    hidden: torch.Tensor  # [N, tokens, cross_attention_dim]
    pooled: torch.Tensor | None = None  # [N, projection_dim], SDXL only

    def __getitem__(self, idx) -> TextConditioning:
        return TextConditioning(self.hidden[idx], None if self.pooled is None else self.pooled[idx])

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def repeat(self, n: int) -> TextConditioning:
        """One prompt's conditioning for ``n`` examples (a DreamBooth instance or class prompt)."""
        return self[torch.zeros(n, dtype=torch.long)]

    @staticmethod
    def cat(parts: list[TextConditioning]) -> TextConditioning:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextConditioning(torch.cat([p.hidden for p in parts]), pooled)


def encode_tokens(pipe, ids: list[torch.Tensor]) -> TextConditioning:
    """Run the text encoders on ``tokenize``'s ids (with gradients when an encoder is being trained)."""
    if not is_sdxl(pipe):
        return TextConditioning(pipe.text_encoder(ids[0])[0])
    hidden, pooled = [], None
    for encoder, enc_ids in zip(text_encoders(pipe), ids):
        out = encoder(enc_ids, output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return TextConditioning(torch.cat(hidden, dim=-1), pooled)


@torch.no_grad()
def encode_text(pipe, prompts: list[str]) -> TextConditioning:
    """The UNet's text conditioning for the prompts, computed once before a training loop."""
    return encode_tokens(pipe, tokenize(pipe, prompts))


def time_ids(original: tuple[int, int], crop_top_left: tuple[int, int], target: tuple[int, int]) -> list[int]:
    """SDXL's micro-conditioning of one image, (height, width) pairs in pixels as the pipeline orders them."""
    return [*original, *crop_top_left, *target]


def predict(unet, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
            image_time_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's prediction, with SDXL's added conditioning when its config asks for it."""
    if not takes_time_ids(unet):
        return unet(noisy, timesteps, text.hidden).sample
    if text.pooled is None or image_time_ids is None:
        raise ValueError("an SDXL UNet needs the pooled text embedding and the images' time ids")
    added = {"text_embeds": text.pooled.to(noisy.dtype), "time_ids": image_time_ids.to(noisy.device, noisy.dtype)}
    return unet(noisy, timesteps, text.hidden, added_cond_kwargs=added).sample
