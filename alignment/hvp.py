"""Hessian-vector products of the fine-tuning loss, two ways.

* ``autograd``: double backward. PyTorch has no derivative for the fused
  scaled-dot-product-attention backward kernels, so the graph is built under the math
  kernel. The gradient graph is built once per point and reused for every product
  (the Richardson solver asks for K of them at the same theta*).
* ``finite-difference``: the central difference ``(g(theta + r v) - g(theta - r v)) / 2r``
  of two ordinary gradients. No double backward, so it works with fused attention and
  gradient checkpointing; on CPU it costs about two gradients against about nine for
  double backward (``python -m benchmarks.hypergradient``). ``r = epsilon * ||theta|| / ||v||``
  keeps the relative perturbation fixed whatever the scale of the weights and of v.

Below fp32 the forward pass rounds each weight to the autocast dtype (bf16 keeps 8 bits of
mantissa, fp16 11), so a perturbation of 1e-3 of the weights' scale is largely rounded away and the
difference of two gradients is mostly rounding noise. ``FD_EPSILON`` is the smallest relative
step per precision at which the bf16 / fp16 finite difference agrees with the fp32 autograd HVP at
cosine >= 0.99 on the tiny UNet (``tests/test_alignment_device.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .functional import Params, flat_norm

HVP_BACKENDS = ("finite-difference", "autograd")
FD_EPSILON = {"fp32": 1e-3, "bf16": 1e-1, "fp16": 1e-2}

LossFn = Callable[[Params], torch.Tensor]


def gradient(loss_fn: LossFn, params: Params) -> tuple[torch.Tensor, Params]:
    """Loss and its gradient at ``params`` (detached)."""
    leaves = {k: t.detach().requires_grad_() for k, t in params.items()}
    loss = loss_fn(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


class FiniteDifferenceHVP:
    def __init__(self, loss_fn: LossFn, params: Params, epsilon: float = 1e-3):
        self.loss_fn, self.params, self.epsilon = loss_fn, params, epsilon
        self.theta_norm = float(flat_norm(params))

    def __call__(self, v: Params) -> Params:
        v_norm = float(flat_norm(v))
        if v_norm == 0.0:
            return {k: torch.zeros_like(t) for k, t in v.items()}
        r = self.epsilon * max(self.theta_norm, 1.0) / v_norm
        _, plus = gradient(self.loss_fn, {k: t + r * v[k] for k, t in self.params.items()})
        _, minus = gradient(self.loss_fn, {k: t - r * v[k] for k, t in self.params.items()})
        return {k: (plus[k] - minus[k]) / (2 * r) for k in plus}


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


def make_hvp(backend: str, loss_fn: LossFn, params: Params, epsilon: float = 1e-3):
    if backend == "finite-difference":
        return FiniteDifferenceHVP(loss_fn, params, epsilon)
    if backend == "autograd":
        return AutogradHVP(loss_fn, params)
    raise ValueError(f"hvp backend {backend!r} not in {HVP_BACKENDS}")
