"""Write an SD 1.x pipeline as one ``.safetensors`` checkpoint in the original LDM layout.

Operators keep models in two forms (a diffusers folder, or the single-file layout that
most community tools use). This writer is the inverse of diffusers' single-file loader,
so a hardened model can be handed to such tools, and ``load_pipeline``'s single-file
path can be tested without a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from ..files import atomic_write

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return key


def _unet_key(key: str, layers: int, has_attention: list[bool]) -> str:
    parts = key.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        i, kind, j, rest = int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
        # LDM numbers blocks flat: each down level holds `layers` resnets plus a
        # downsampler slot (input_blocks.0 is conv_in); each up level `layers + 1` resnets.
        if parts[0] == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{1 + i * (layers + 1) + layers}.0.op.{rest.removeprefix('conv.')}"
            index, prefix = 1 + i * (layers + 1) + int(j), "input_blocks"
        else:
            if kind == "upsamplers":
                slot = 2 if has_attention[i] else 1
                return f"output_blocks.{i * (layers + 1) + layers}.{slot}.{rest}"
            index, prefix = i * (layers + 1) + int(j), "output_blocks"
        if kind == "resnets":
            return f"{prefix}.{index}.0.{_rename(rest, _RESNET)}"
        return f"{prefix}.{index}.1.{rest}"
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_rename(rest, _RESNET)}"
        return f"middle_block.1.{rest}"
    return _rename(key, _UNET_TOP)


def _vae_key(key: str, levels: int) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    parts = key.split(".")
    side = parts[0]
    if len(parts) > 2 and parts[1] in ("down_blocks", "up_blocks"):
        i = int(parts[2])
        level = i if side == "encoder" else levels - 1 - i
        stage = "down" if side == "encoder" else "up"
        kind, rest = parts[3], parts[4:]
        if kind == "resnets":
            return f"{side}.{stage}.{level}.block.{rest[0]}.{'.'.join(rest[1:])}"
        sampler = "downsample" if kind == "downsamplers" else "upsample"
        return f"{side}.{stage}.{level}.{sampler}.{'.'.join(rest[1:])}"
    if len(parts) > 2 and parts[1] == "mid_block":
        if parts[2] == "resnets":
            return f"{side}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        return f"{side}.mid.attn_1.{_rename('.'.join(parts[4:]), _VAE_ATTENTION)}"
    return key


def export_single_file(pipe, path: str | Path) -> Path:
    """Write ``pipe`` (an SD 1.x pipeline) to ``path`` as an LDM-layout ``.safetensors``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single-file exports are .safetensors only")
    if getattr(pipe, "text_encoder_2", None) is not None or pipe.unet.config.use_linear_projection:
        raise ValueError("single-file export supports SD 1.x pipelines only")
    layers = pipe.unet.config.layers_per_block
    up_attention = ["CrossAttn" in t for t in pipe.unet.config.up_block_types]
    levels = len(pipe.vae.config.block_out_channels)
    state: dict[str, torch.Tensor] = {}
    for k, v in pipe.unet.state_dict().items():
        state["model.diffusion_model." + _unet_key(k, layers, up_attention)] = v
    for k, v in pipe.vae.state_dict().items():
        new = _vae_key(k, levels)
        if ".mid.attn_1." in new and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        state["first_stage_model." + new] = v
    for k, v in pipe.text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel; the LDM layout keeps `text_model.`.
        state["cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k] = v
    return atomic_write(path, save({k: v.detach().contiguous() for k, v in state.items()}))
