"""Hessian-vector products of the fine-tuning loss, two ways.

* ``autograd``: double backward. PyTorch has no derivative for the fused
  scaled-dot-product-attention backward kernels, so the graph is built under the math
  kernel. The gradient graph is built once per point and reused for every product
  (the Richardson solver asks for K of them at the same theta*).
* ``finite-difference``: the one-sided difference ``(g(theta + r v) - g(theta)) / r`` of ordinary
  gradients. The base gradient ``g(theta)`` is the same for every product at one theta*, so it is
  computed once, at the first product, and shared: a Richardson solve of K steps costs K gradients
  (K - 1 products and the base), where the central difference cost 2 (K - 1). No double backward,
  so it works with fused attention and gradient checkpointing. ``r = epsilon * ||theta|| / ||v||``
  keeps the relative perturbation fixed whatever the scale of the weights and of v. The perturbed
  point is written into one preallocated buffer, and the product is formed in place in the
  perturbed gradient, so a product holds two parameter-sized tensors of its own.

Below fp32 the forward pass rounds each weight to the autocast dtype (bf16 keeps 8 bits of
mantissa, fp16 11), so a perturbation of 1e-3 of the weights' scale is largely rounded away and the
difference of two gradients is mostly rounding noise. ``FD_EPSILON`` is the smallest relative
step per precision at which the bf16 / fp16 one-sided difference agrees with the fp32 autograd HVP
at cosine >= 0.99 on the tiny UNet (``tests/test_alignment_device.py``). In fp32 the one-sided
difference's own O(r) error dominates instead: on the world model 1e-3 gave cosine 0.972, 1e-4 0.9998.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .functional import Params, flat_norm

HVP_BACKENDS = ("finite-difference", "autograd")
FD_EPSILON = {"fp32": 1e-4, "bf16": 1e-1, "fp16": 3e-2}

LossFn = Callable[[Params], torch.Tensor]


def gradient(loss_fn: LossFn, params: Params) -> tuple[torch.Tensor, Params]:
    """Loss and its gradient at ``params`` (detached)."""
    leaves = {k: t.detach().requires_grad_() for k, t in params.items()}
    loss = loss_fn(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


class FiniteDifferenceHVP:
    """One-sided finite-difference products at one point, sharing its base gradient."""

    def __init__(self, loss_fn: LossFn, params: Params, epsilon: float = FD_EPSILON["fp32"]):
        self.loss_fn, self.params, self.epsilon = loss_fn, params, epsilon
        self.theta_norm = float(flat_norm(params))
        self.base: Params | None = None  # g(theta), computed at the first product and shared by the rest
        self.point: Params | None = None  # theta + r v, rewritten in place for each product

    def __call__(self, v: Params) -> Params:
        v_norm = float(flat_norm(v))
        if v_norm == 0.0:
            return {k: torch.zeros_like(t) for k, t in v.items()}
        if self.base is None:
            self.base = gradient(self.loss_fn, self.params)[1]
            self.point = {k: torch.empty_like(t) for k, t in self.params.items()}
        r = self.epsilon * max(self.theta_norm, 1.0) / v_norm
        keys = list(self.params)
        point = [self.point[k] for k in keys]
        torch._foreach_copy_(point, [self.params[k] for k in keys])
        torch._foreach_add_(point, [v[k] for k in keys], alpha=r)
        hv = gradient(self.loss_fn, self.point)[1]
        products = [hv[k] for k in keys]
        torch._foreach_sub_(products, [self.base[k] for k in keys])
        torch._foreach_div_(products, r)
        return hv


class AutogradHVP:
    def __init__(self, loss_fn: LossFn, params: Params):
        self.leaves = {k: t.detach().requires_grad_() for k, t in params.items()}
        with sdpa_kernel(SDPBackend.MATH):
            loss = loss_fn(self.leaves)
            self.grads = torch.autograd.grad(loss, list(self.leaves.values()), create_graph=True)

    def __call__(self, v: Params) -> Params:
        hv = torch.autograd.grad(self.grads, list(self.leaves.values()), grad_outputs=[v[k] for k in self.leaves],
                                 retain_graph=True)
        return {k: h.detach() for k, h in zip(self.leaves, hv)}


def make_hvp(backend: str, loss_fn: LossFn, params: Params, epsilon: float = FD_EPSILON["fp32"]):
    if backend == "finite-difference":
        return FiniteDifferenceHVP(loss_fn, params, epsilon)
    if backend == "autograd":
        return AutogradHVP(loss_fn, params)
    raise ValueError(f"hvp backend {backend!r} not in {HVP_BACKENDS}")
