"""ADAPT: simulated downstream fine-tuning, and the distribution pi(C) it is drawn from.

ADAPT(theta, D, C) returns new effective weights theta* and never touches theta: it trains
its own copy (a ``lora`` configuration trains fresh LoRA factors on top of theta, as a customer
would, then merges them). Off the tape the optimisers update that copy and their moments in place
(``step_``), so a full Adam step holds the weights, two moments and one gradient, not a second set
of each; with ``differentiable=True`` the steps are functional (new tensors each step) and stay on
the autograd tape (exact "unrolled" hypergradients, tiny models only). ``proximal_gamma`` adds the Moreau model's own
proximal term ``||theta' - theta||^2 / (2 gamma)`` to every step's loss.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field

from auditing.config import ConfigError, record

from .functional import Params, lora_init, lora_merge

OPTIMISERS = ("sgd", "adam")
FT_LOSSES = ("standard", "prior")
METHODS = ("full", "lora")
SAMPLINGS = ("uniform", "stratified")


@dataclass(frozen=True)
class FineTuneConfig:
    """One downstream fine-tuning configuration C."""

    optimizer: str = "adam"
    learning_rate: float = 1e-5
    steps: int = 10
    loss: str = "standard"
    method: str = "full"
    batch_size: int = 4
    lora_rank: int = 4

    def __post_init__(self):
        for field, allowed in (("optimizer", OPTIMISERS), ("loss", FT_LOSSES), ("method", METHODS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} {getattr(self, field)!r} not in {allowed}")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1] (got {self.learning_rate})")
        for field in ("steps", "batch_size", "lora_rank"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1 (got {getattr(self, field)})")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AdamState:
    m: Params
    v: Params
    step: int


class Adam:
    """Adam (Kingma & Ba) in torch.optim.Adam's exact arithmetic, bias correction applied once."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps

    def init(self, params: Params) -> AdamState:
        return AdamState({k: torch.zeros_like(p) for k, p in params.items()},
                         {k: torch.zeros_like(p) for k, p in params.items()}, 0)

    def step(self, params: Params, grads: Params, state: AdamState) -> tuple[Params, AdamState]:
        b1, b2 = self.betas
        t = state.step + 1
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        new, m, v = {}, {}, {}
        for k, p in params.items():
            m[k] = torch.lerp(state.m[k], grads[k], 1 - b1)
            v[k] = torch.addcmul(state.v[k] * b2, grads[k], grads[k], value=1 - b2)
            denom = v[k].sqrt() / bc2 ** 0.5 + self.eps
            new[k] = torch.addcdiv(p, m[k], denom, value=-(self.lr / bc1))
        return new, AdamState(m, v, t)

    def step_(self, params: Params, grads: Params, state: AdamState) -> AdamState:
        """The same step in place on ``params`` and the moments (torch.optim.Adam's own in-place arithmetic)."""
        b1, b2 = self.betas
        t = state.step + 1
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        for k, p in params.items():
            state.m[k].lerp_(grads[k], 1 - b1)
            state.v[k].mul_(b2).addcmul_(grads[k], grads[k], value=1 - b2)
            denom = (state.v[k].sqrt() / bc2 ** 0.5).add_(self.eps)
            p.addcdiv_(state.m[k], denom, value=-(self.lr / bc1))
        return AdamState(state.m, state.v, t)


class SGD:
    def __init__(self, lr: float):
        self.lr = lr

    def init(self, params: Params) -> None:
        return None

    def step(self, params: Params, grads: Params, state: None) -> tuple[Params, None]:
        return {k: p - self.lr * grads[k] for k, p in params.items()}, None

    def step_(self, params: Params, grads: Params, state: None) -> None:
        for k, p in params.items():
            p.sub_(self.lr * grads[k])


def adapt(theta: Params, loss_at: Callable[[Params, int], torch.Tensor], config: FineTuneConfig,
          generator: torch.Generator, lora_names: list[str] | None = None, proximal_gamma: float | None = None,
          differentiable: bool = False) -> Params:
    """Run ``config.steps`` optimiser steps of ``loss_at(params, step)`` from ``theta``; return theta*.

    ``lora_names`` are the weights a ``lora`` configuration adapts (the attention projections).
    """
    optimiser = Adam(config.learning_rate) if config.optimizer == "adam" else SGD(config.learning_rate)
    anchor = theta if differentiable else {k: t.detach() for k, t in theta.items()}
    if config.method == "lora":
        if not lora_names:
            raise ValueError("method 'lora' needs the names of the weights to adapt")
        trained = lora_init({n: anchor[n] for n in lora_names}, config.lora_rank, generator)
        scale = 1.0  # lora_alpha = rank, as customers' default adapter

        def effective(t: Params) -> Params:
            return lora_merge(anchor, t, scale)
    else:
        trained = dict(anchor)

        def effective(t: Params) -> Params:
            return t
    if differentiable:
        trained = {k: t if t.requires_grad else t.clone().requires_grad_() for k, t in trained.items()}
    elif config.method != "lora":  # fresh factors are ADAPT's own already; theta's weights are not
        trained = {k: t.clone() for k, t in trained.items()}
    state = optimiser.init(trained)
    for step in range(config.steps):
        leaves = trained if differentiable else {k: t.requires_grad_() for k, t in trained.items()}
        current = effective(leaves)
        loss = loss_at(current, step)
        if proximal_gamma is not None:
            loss = loss + sum(((current[k] - anchor[k]) ** 2).sum() for k in anchor) / (2 * proximal_gamma)
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), create_graph=differentiable)))
        del current, loss
        if differentiable:
            trained, state = optimiser.step(leaves, grads, state)
        else:
            with torch.no_grad():
                state = optimiser.step_(trained, grads, state)
        del grads
    if differentiable:
        return effective(trained)
    with torch.no_grad():
        return {k: t.detach() for k, t in effective({k: t.detach() for k, t in trained.items()}).items()}


def several(item):
    """The annotation of a non-empty tuple of ``item``, given as a TOML/YAML list."""
    return Annotated[tuple[item, ...], Field(strict=False, min_length=1)]


@record
class Distribution:
    """pi(C): a grid of fine-tuning configurations, sampled uniformly after exclusions.

    Defaults are the paper's grid. Its exclusion of "unstable combinations (large lr x
    many steps)" is made concrete as ``learning_rate * steps <= max_lr_steps``: with the
    default 1e-3 the pairs (1e-4, 20) and (1e-4, 30) are excluded. ``sampling = "stratified"``
    (beyond the paper; see ``ConfigSampler``) cycles through the (optimizer, method) classes.
    """

    learning_rates: several(Annotated[float, Field(gt=0, le=1)]) = (1e-4, 1e-5, 1e-6)
    steps: several(Annotated[int, Field(ge=1)]) = (5, 10, 20, 30)
    losses: several(Literal[FT_LOSSES]) = FT_LOSSES
    methods: several(Literal[METHODS]) = METHODS
    optimizers: several(Literal[OPTIMISERS]) = OPTIMISERS
    batch_sizes: several(Annotated[int, Field(ge=1)]) = (4,)
    lora_rank: Annotated[int, Field(ge=1)] = 4
    max_lr_steps: Annotated[float, Field(gt=0)] = 1e-3
    sampling: Literal[SAMPLINGS] = "uniform"

    def __post_init__(self):
        if not self.grid():
            raise ConfigError("max_lr_steps", f"max_lr_steps = {self.max_lr_steps:g} excludes every configuration")

    def grid(self) -> list[FineTuneConfig]:
        combos = itertools.product(self.optimizers, self.learning_rates, self.steps, self.losses, self.methods,
                                   self.batch_sizes)
        return [FineTuneConfig(o, lr, s, loss, m, b, self.lora_rank) for o, lr, s, loss, m, b in combos
                if lr * s <= self.max_lr_steps * (1 + 1e-9)]

    def sample(self, rng: random.Random) -> FineTuneConfig:
        return rng.choice(self.grid())


class ConfigSampler:
    """Draws the outer loop's C ~ pi(C) from the aligner's ``random.Random``.

    ``uniform`` (the paper) is ``Distribution.sample``. ``stratified`` partitions the grid into its
    (optimizer, method) classes, which move the model by very different amounts, and lets successive
    draws cycle through them in a shuffled order, a fresh permutation each time a cycle ends, so every
    class gets its share of samples whatever the class sizes; within a class C is drawn uniformly.
    ``pending`` (the rest of the current cycle) is the sampler's only state; checkpoints keep it.
    """

    def __init__(self, distribution: Distribution):
        self.distribution = distribution
        classes: dict[tuple[str, str], list[FineTuneConfig]] = {}
        for config in distribution.grid():
            classes.setdefault((config.optimizer, config.method), []).append(config)
        self.classes = list(classes.values())
        self.pending: list[int] = []

    def draw(self, rng: random.Random) -> FineTuneConfig:
        if self.distribution.sampling == "uniform":
            return self.distribution.sample(rng)
        if not self.pending:
            self.pending = list(range(len(self.classes)))
            rng.shuffle(self.pending)
        return rng.choice(self.classes[self.pending.pop(0)])
