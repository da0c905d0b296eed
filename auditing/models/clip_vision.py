"""The CLIP image tower open_clip builds for OpenAI's ViT weights, without open_clip.

MHSC scores open_clip's ``encode_image`` embedding of OpenAI's ViT-L/14. open_clip needs
torchvision at import, and the torchvision wheels this project can install are CUDA builds
that do not load beside the CPU torch, so the tower is rebuilt here from the same parts with
open_clip's parameter names (``conv1.weight``, ``class_embedding``, ``positional_embedding``,
``ln_pre``, ``transformer.resblocks.N.{ln_1,attn,ln_2,mlp.c_fc,mlp.c_proj}``, ``ln_post``,
``proj``): a state dict saved from ``open_clip_model.visual`` loads strictly. QuickGELU, as
OpenAI trained these weights (open_clip >= 3 builds plain "ViT-L-14" with GELU and only warns).
``tests/test_mhsc.py`` checks the tower against embeddings open_clip 3.3.0 itself produced.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD, in RGB order.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # open_clip's default width per attention head


@dataclass(frozen=True)
class ClipVisionSpec:
    """Sizes of an open_clip ViT image tower; the defaults are ViT-L-14 (embedding 768)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    output_dim: int = 768

    def __post_init__(self):
        if self.image_size % self.patch_size or self.width % HEAD_WIDTH:
            raise ValueError(f"image_size must be a multiple of patch_size and width of {HEAD_WIDTH} ({self})")

    @property
    def heads(self) -> int:
        return self.width // HEAD_WIDTH


VIT_L_14 = ClipVisionSpec()


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Block(nn.Module):
    """Pre-norm residual attention block (open_clip's ResidualAttentionBlock)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class ClipVisionTower(nn.Module):
    """Image -> CLIP embedding: patches, class token, transformer, class token's projection."""

    def __init__(self, spec: ClipVisionSpec = VIT_L_14):
        super().__init__()
        self.spec = spec
        w, grid = spec.width, spec.image_size // spec.patch_size
        self.conv1 = nn.Conv2d(3, w, kernel_size=spec.patch_size, stride=spec.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, w) * w**-0.5)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = _Transformer(w, spec.layers, spec.heads)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.randn(w, spec.output_dim) * w**-0.5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # (N, patches, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


def clip_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """open_clip's evaluation transform for OpenAI models, in PIL and numpy: bicubic resize of the
    shorter side to ``size``, centre crop, scale to [0, 1], normalise by OpenAI's mean and std."""
    out = []
    for image in images:
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        scaled = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
        image = image.resize(scaled, Image.Resampling.BICUBIC)
        w, h = image.size
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        out.append((array - np.array(OPENAI_MEAN, np.float32)) / np.array(OPENAI_STD, np.float32))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
