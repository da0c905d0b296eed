"""The objective's terms: unlearning losses L_harm, preservation R, and fine-tuning losses.

Every loss takes the noise draw as an argument (a ``Draw``): the Hessian-vector products
of the hypergradient differentiate one fixed function, so the fine-tuning loss must not
draw new noise between evaluations, and L_harm(theta) and L_harm(theta*) of one outer
step are compared on the same noise.

Unlearning losses (paper Eq. 2 and Tab. 9), all minimised:

* ``ga``: gradient ascent, the negated denoising loss on harmful pairs. Unbounded ascent
  diverges (the loss can grow without limit while the weights blow up), so with
  ``harm_bound`` set each example's loss is clipped at the bound: once an example's
  error exceeds it, that example stops pushing.
* ``esd``: erased stable diffusion's negative guidance: regress the prediction for the
  harmful prompt onto ``e0(x,'') - eta (e0(x,c) - e0(x,''))`` of the frozen original.
* ``ablation``: concept ablation: regress onto the original's prediction for an anchor
  prompt (default the empty caption), so the concept's prompt draws the anchor instead.
  In the shapes world, raising the denoising error does not by itself stop a model drawing a
  concept, while a substitution target does (docs/alignment.md, "Unlearning losses").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from auditing.models.denoising import add_noise, denoising_loss

from .functional import Batch, Denoiser, Params

HARM_LOSSES = ("ga", "esd", "ablation")


@dataclass(frozen=True)
class Draw:
    """Noisy inputs for one batch: what the UNet sees and the denoising target."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor

    @classmethod
    def sample(cls, scheduler, latents: torch.Tensor, generator: torch.Generator) -> Draw:
        nb = add_noise(scheduler, latents, generator=generator)
        return cls(nb.noisy, nb.timesteps, nb.target)


@dataclass(frozen=True)
class HarmLoss:
    kind: str = "ga"
    bound: float | None = None
    eta: float = 1.0
    anchor: torch.Tensor | None = None  # text states of the anchor prompt (ablation)
    empty: torch.Tensor | None = None  # text states of the empty caption (esd)

    def __call__(self, model: Denoiser, params: Params, theta0: Params, batch: Batch, draw: Draw) -> torch.Tensor:
        pred = model(params, draw.noisy, draw.timesteps, batch.cond)
        if self.kind == "ga":
            per_example = denoising_loss(pred, draw.target, reduction="none")
            if self.bound is not None:
                per_example = per_example.clamp(max=self.bound)
            return -per_example.mean()
        with torch.no_grad():
            if self.kind == "esd":
                n = len(batch)
                e_empty = model(theta0, draw.noisy, draw.timesteps, self.empty.expand(n, -1, -1))
                e_cond = model(theta0, draw.noisy, draw.timesteps, batch.cond)
                target = e_empty - self.eta * (e_cond - e_empty)
            elif self.kind == "ablation":
                target = model(theta0, draw.noisy, draw.timesteps, self.anchor.expand(len(batch), -1, -1))
            else:
                raise ValueError(f"harm loss {self.kind!r} not in {HARM_LOSSES}")
        return denoising_loss(pred, target)


def preservation_loss(model: Denoiser, params: Params, theta0: Params, batch: Batch, draw: Draw) -> torch.Tensor:
    """R: distil the original's noise predictions on preservation prompts."""
    pred = model(params, draw.noisy, draw.timesteps, batch.cond)
    with torch.no_grad():
        teacher = model(theta0, draw.noisy, draw.timesteps, batch.cond)
    return denoising_loss(pred, teacher)


@dataclass(frozen=True)
class FineTuneBatch:
    """What one simulated fine-tuning step trains on: customer data, and class images for prior loss."""

    data: Batch
    draw: Draw
    prior: Batch | None = None
    prior_draw: Draw | None = None


def finetune_loss(model: Denoiser, params: Params, batch: FineTuneBatch, prior_weight: float = 1.0) -> torch.Tensor:
    """Standard denoising loss, plus DreamBooth's prior-preservation term when class images are given."""
    d = batch.draw
    loss = denoising_loss(model(params, d.noisy, d.timesteps, batch.data.cond), d.target)
    if batch.prior is not None:
        p = batch.prior_draw
        loss = loss + prior_weight * denoising_loss(model(params, p.noisy, p.timesteps, batch.prior.cond), p.target)
    return loss
