"""Measure what the training memory estimate (``gate.training.memory``) is built from, on the meta device.

For each published family (``auditing.models.published``): parameter counts, LoRA parameters per unit
of rank on the attention projections customers train, and the bytes autograd keeps for the backward pass
of one training forward of the UNet, per latent pixel at batch 1 in fp32, counted with
``torch.autograd.graph.saved_tensors_hooks``. Two exclusions make the count the one a CUDA run pays:
tensors shaped like a parameter (autograd saves a reference to the weight, which is already resident)
and square attention-probability matrices (CUDA's flash and memory-efficient attention recompute them
instead of saving them). With gradient checkpointing the count is what the checkpointed forward saves
plus the largest single block's activations, which its recomputation holds during the backward pass.

    python -m benchmarks.training_memory      # one JSON line per family
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager

import torch

from auditing.models.published import UNETS, build_published

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # gate.training.lora.TARGET_MODULES
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def lora_params_per_rank(module: torch.nn.Module, targets: tuple[str, ...]) -> int:
    """A rank-r LoRA on these Linear layers has r x (in + out) parameters per layer."""
    return sum(m.in_features + m.out_features for name, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(targets))


@contextmanager
def _saved_bytes(parameter_shapes: set[tuple[int, ...]], counter: Counter):
    def pack(t):
        shape = tuple(t.shape)
        if shape in parameter_shapes:
            counter["parameter"] += t.numel() * t.element_size()
        elif t.ndim >= 3 and shape[-1] == shape[-2] and shape[-1] >= 64:
            counter["attention"] += t.numel() * t.element_size()
        else:
            counter["activation"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def activation_bytes(family: str, resolution: int, checkpointing: bool) -> int:
    """Bytes saved for the backward pass of one batch-1 fp32 UNet training forward at ``resolution``."""
    model = build_published(family)
    unet = model.unet.requires_grad_(True).train()
    shapes = {tuple(p.shape) for p in unet.parameters()} | {tuple(p.shape[::-1]) for p in unet.parameters()}
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    per_block, hooks = [], []
    for block in blocks:  # each block's own saved activations, measured in the plain forward
        hooks.append(block.register_forward_pre_hook(lambda m, a: per_block.append(-total["activation"])))
        hooks.append(block.register_forward_hook(lambda m, a, o: per_block.__setitem__(
            -1, per_block[-1] + total["activation"])))
    total: Counter = Counter()
    with _saved_bytes(shapes, total):
        unet(**model.unet_inputs(1, resolution))
    for hook in hooks:
        hook.remove()
    if not checkpointing:
        return total["activation"]
    unet.enable_gradient_checkpointing()
    kept: Counter = Counter()
    with _saved_bytes(shapes, kept):
        unet(**model.unet_inputs(1, resolution))
    return kept["activation"] + max(per_block)


def footprint(family: str) -> dict:
    """Everything ``gate.training.memory.FOOTPRINTS`` holds for one family, measured."""
    model = build_published(family)
    native = UNETS[family]["sample_size"] * 8
    latent_pixels = (native // 8) ** 2
    return {
        "family": family,
        "native_resolution": native,
        "unet_params": sum(p.numel() for p in model.unet.parameters()),
        "text_encoder_params": [sum(p.numel() for p in e.parameters()) for e in model.text_encoders],
        "vae_params": sum(p.numel() for p in model.vae.parameters()),
        "unet_lora_params_per_rank": lora_params_per_rank(model.unet, UNET_LORA_TARGETS),
        "text_encoder_lora_params_per_rank": [lora_params_per_rank(e, TEXT_LORA_TARGETS)
                                              for e in model.text_encoders],
        "activation_bytes_per_latent_pixel": round(activation_bytes(family, native, False) / latent_pixels),
        "checkpointed_activation_bytes_per_latent_pixel":
            round(activation_bytes(family, native, True) / latent_pixels),
    }


def main() -> None:
    for family in UNETS:
        print(json.dumps(footprint(family)))


if __name__ == "__main__":
    main()
