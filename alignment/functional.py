"""The UNet as a pure function of a parameter dict, and the trainable scopes.

Hardening differentiates through simulated fine-tuning, so parameters must never be
swapped in and out of modules (the reference code's defect: one configuration trained
from the wrong weights). Every forward pass is ``torch.func.functional_call`` with an
explicit dict; the module's own parameters stay the original model, which is therefore
also the frozen teacher for distillation at no extra memory.

Scopes, in one parameter space ("effective weights"):

* ``attention-lora``: a rank-r LoRA on every attention projection (to_q, to_k, to_v,
  to_out.0), merged into the weights at the end. The reference code's choice; the default.
* ``attention``: the same projection weights, trained directly.
* ``full``: every UNet parameter.

LoRA is applied by merging ``W + (alpha / r) B A`` into the weight before the call. That
is the same function peft's ``Linear`` computes (a test checks the outputs agree with a
peft-injected model), and it keeps LoRA inside the functional picture: fine-tuning
configurations with method ``lora`` train fresh (A, B) pairs on top of theta, and their
result theta* is a point in the same effective-weight space as theta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
SCOPES = ("attention-lora", "attention", "full")

Params = dict[str, torch.Tensor]


def attention_weight_names(unet) -> list[str]:
    """Names of the attention projection weights (what LoRA adapts)."""
    names = [f"{name}.weight" for name, module in unet.named_modules()
             if isinstance(module, torch.nn.Linear) and name.endswith(ATTENTION_PROJECTIONS)]
    if not names:
        raise ValueError("the UNet has no attention projections (to_q, to_k, to_v, to_out.0)")
    return names


def scope_names(unet, scope: str) -> list[str]:
    """Parameter names the effective-weight space of ``scope`` covers."""
    if scope in ("attention-lora", "attention"):
        return attention_weight_names(unet)
    if scope == "full":
        return [name for name, _ in unet.named_parameters()]
    raise ValueError(f"scope {scope!r} not in {SCOPES}")


@dataclass(frozen=True)
class Batch:
    """Encoded training examples: VAE latents and text-encoder states."""

    latents: torch.Tensor
    cond: torch.Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]

    def take(self, index: torch.Tensor) -> Batch:
        return Batch(self.latents[index], self.cond[index])


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Denoiser:
    """Noise prediction ``f(params, x_t, t, c)``; parameters absent from ``params`` are the original's.

    ``precision`` below fp32 runs the forward pass under autocast while the parameters (the master
    copy every optimiser and the hypergradient work on) stay fp32. ``checkpointing`` recomputes each
    down, mid and up block in the backward pass instead of keeping its activations.
    """

    def __init__(self, unet, precision: str = "fp32", checkpointing: bool = False):
        if getattr(unet.config, "addition_embed_type", None):
            raise ValueError("hardening supports SD 1.x / 2.x UNets; this UNet needs added conditioning (SDXL)")
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} not in {tuple(PRECISIONS)}")
        self.unet = unet.eval().requires_grad_(False)
        self.precision = precision
        if checkpointing:
            blocks = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
            for block in blocks:
                if not getattr(block.forward, "checkpointed", False):  # a second Denoiser on this UNet
                    block.forward = _checkpointed(block)

    def __call__(self, params: Params, noisy: torch.Tensor, timesteps: torch.Tensor,
                 cond: torch.Tensor) -> torch.Tensor:
        dtype = PRECISIONS[self.precision]
        with torch.autocast(noisy.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = functional_call(self.unet, params, (noisy, timesteps), {"encoder_hidden_states": cond}).sample
        return out.float()

    def original(self, names: list[str]) -> Params:
        """Detached copies of the original parameters ``names``."""
        own = dict(self.unet.named_parameters())
        return {n: own[n].detach().clone() for n in names}


def _attention_kernels() -> list[SDPBackend]:
    """The scaled-dot-product-attention kernels enabled now, for a recomputation to use the same."""
    flags = ((SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
             (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
             (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled()),
             (SDPBackend.CUDNN_ATTENTION, torch.backends.cuda.cudnn_sdp_enabled()))
    return [kernel for kernel, enabled in flags if enabled]


def _checkpointed(block):
    """``block.forward`` under activation checkpointing that recomputes with the weights of *this* call.

    ``functional_call`` swaps the caller's tensors (theta*, or theta* +- r v in an HVP) into the module
    only while the forward runs; a recomputation in the backward pass that read the module's attributes
    would see the original weights. So the block's current tensors are handed to the checkpoint as
    inputs, and the recomputation puts exactly those back before running the block.
    """
    forward = block.forward
    names = [n for n, _ in block.named_parameters()]
    inside = False

    def run(*args, **kwargs):
        nonlocal inside
        if inside or not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        current = dict(block.named_parameters())  # during functional_call: the swapped-in tensors
        kernels = _attention_kernels()  # the double-backward HVP builds its graph under the math kernel

        def recompute(*tensors):
            nonlocal inside
            inside = True
            try:
                with sdpa_kernel(kernels):
                    return functional_call(block, dict(zip(names, tensors)), args, kwargs)
            finally:
                inside = False

        return checkpoint(recompute, *(current[n] for n in names), use_reentrant=False)

    run.checkpointed = True
    return run


def lora_init(weights: Params, rank: int, generator: torch.Generator) -> Params:
    """Fresh LoRA factors for each weight as customers' adapters start: A ~ N(0, 1/rank^2), B = 0.

    diffusers' LoRA training scripts create their adapters with peft's ``init_lora_weights="gaussian"``,
    which is ``normal_(lora_A, std=1 / r)`` and ``zeros_(lora_B)`` (peft ``tuners/lora/layer.py``).
    Drawn on the CPU from the run's generator, so a run draws the same factors on every device.
    """
    factors: Params = {}
    for name, w in weights.items():
        a = torch.randn((rank, w.shape[1]), generator=generator, dtype=torch.float32) / rank
        factors[f"{name}::A"] = a.to(w)
        factors[f"{name}::B"] = torch.zeros((w.shape[0], rank), dtype=w.dtype, device=w.device)
    return factors


def lora_merge(weights: Params, factors: Params, scale: float) -> Params:
    """``W + scale * B A`` for every weight that has factors; others unchanged."""
    merged = dict(weights)
    for name, w in weights.items():
        a = factors.get(f"{name}::A")
        if a is not None:
            merged[name] = w + scale * (factors[f"{name}::B"] @ a)
    return merged


def flat_norm(params: Params) -> torch.Tensor:
    return torch.sqrt(sum((t.float() ** 2).sum() for t in params.values()))


def flat_dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k].float() * b[k].float()).sum() for k in a)

