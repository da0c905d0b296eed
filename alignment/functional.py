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

import math
from dataclasses import dataclass

import torch
from torch.func import functional_call

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


class Denoiser:
    """Noise prediction ``f(params, x_t, t, c)``; parameters absent from ``params`` are the original's."""

    def __init__(self, unet):
        if getattr(unet.config, "addition_embed_type", None):
            raise ValueError("hardening supports SD 1.x / 2.x UNets; this UNet needs added conditioning (SDXL)")
        self.unet = unet.eval().requires_grad_(False)

    def __call__(self, params: Params, noisy: torch.Tensor, timesteps: torch.Tensor,
                 cond: torch.Tensor) -> torch.Tensor:
        return functional_call(self.unet, params, (noisy, timesteps), {"encoder_hidden_states": cond}).sample

    def original(self, names: list[str]) -> Params:
        """Detached copies of the original parameters ``names``."""
        own = dict(self.unet.named_parameters())
        return {n: own[n].detach().clone() for n in names}


def lora_init(weights: Params, rank: int, generator: torch.Generator) -> Params:
    """Fresh LoRA factors for each weight: A ~ peft's Kaiming-uniform default, B = 0."""
    factors: Params = {}
    for name, w in weights.items():
        bound = 1.0 / math.sqrt(w.shape[1])  # kaiming_uniform_(a=sqrt(5)) on a [rank, in] matrix
        a = (torch.rand((rank, w.shape[1]), generator=generator, dtype=torch.float32) * 2 - 1) * bound
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


def axpy(alpha: float, x: Params, y: Params) -> Params:
    """``alpha * x + y`` key by key."""
    return {k: alpha * x[k] + y[k] for k in y}
