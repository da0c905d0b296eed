"""Algorithm 1: the Moreau-envelope hypergradient by Richardson iteration.

Fine-tuning is modelled as the proximal map ``theta* = argmin L_FT(theta') + ||theta' - theta||^2 / (2 gamma)``.
By the implicit function theorem, ``d theta*/d theta = (I + gamma H)^-1`` with H the
Hessian of L_FT at theta*, so the hypergradient of L_harm(theta*) is the solution x of
``(H + I/gamma) x = (1/gamma) g`` with ``g = grad L_harm(theta*)``. Richardson's
iteration ``x <- g - gamma H x`` from ``x = g`` needs only Hessian-vector products.

Its k-th step adds the Neumann term ``(-gamma H)^k g``, so it converges exactly when the
spectral radius of gamma H is below 1 (for this step size; plain Richardson on H with step
gamma has the familiar bound gamma * lambda_max < 2). For a symmetric H the ratio of
successive step norms ``||x_{k+1} - x_k|| / ||x_k - x_{k-1}||`` never decreases and tends to
that radius, so a final ratio of 1 or more proves the series is growing. Then gamma is
backed off (the Moreau model with a smaller step) by ``backoff_factor``, or further, to
where the measured ratio would be 1/2, and the solve repeated; after
``max_backoffs`` the first-order answer ``x = g`` is used. Every occurrence is logged and
returned, never silent.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from .functional import Params, axpy, flat_norm
from .hvp import HVP_BACKENDS

log = logging.getLogger(__name__)

METHODS = ("moreau", "first-order", "unrolled")


@dataclass(frozen=True)
class HypergradientConfig:
    method: str = "moreau"
    hvp: str = "finite-difference"
    richardson_steps: int = 5
    gamma: float = 1.0
    fd_epsilon: float = 1e-3
    max_backoffs: int = 3
    backoff_factor: float = 0.5

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"hypergradient.method {self.method!r} not in {METHODS}")
        if self.hvp not in HVP_BACKENDS:
            raise ValueError(f"hypergradient.hvp {self.hvp!r} not in {HVP_BACKENDS}")
        if not 1 <= self.richardson_steps <= 100:
            raise ValueError(f"hypergradient.richardson_steps must be in [1, 100] (got {self.richardson_steps})")
        if not 0 < self.gamma <= 1e6:
            raise ValueError(f"hypergradient.gamma must be in (0, 1e6] (got {self.gamma})")
        if not 0 < self.fd_epsilon <= 0.1:
            raise ValueError(f"hypergradient.fd_epsilon must be in (0, 0.1] (got {self.fd_epsilon})")
        if not 0 <= self.max_backoffs <= 20:
            raise ValueError(f"hypergradient.max_backoffs must be in [0, 20] (got {self.max_backoffs})")
        if not 0 < self.backoff_factor < 1:
            raise ValueError(f"hypergradient.backoff_factor must be in (0, 1) (got {self.backoff_factor})")


@dataclass
class Solution:
    x: Params
    gamma: float
    contraction: float | None  # last ratio of successive step norms, an estimate of rho(gamma H)
    backoffs: list[dict] = field(default_factory=list)
    fallback: bool = False


def richardson(hvp, g: Params, gamma: float, steps: int) -> tuple[Params, list[float]]:
    """``steps`` iterations of ``x <- g - gamma H x`` from ``x = g``; returns x and the step norms."""
    x = g
    norms = []
    for _ in range(steps):
        x_next = axpy(-gamma, hvp(x), g)
        norms.append(float(flat_norm({k: x_next[k] - x[k] for k in x})))
        x = x_next
    return x, norms


def _contraction(norms: list[float]) -> float | None:
    if len(norms) < 2 or norms[-2] == 0.0:
        return None
    return norms[-1] / norms[-2]


def solve(hvp, g: Params, config: HypergradientConfig) -> Solution:
    """Richardson with divergence detection, gamma back-off and first-order fallback."""
    gamma = config.gamma
    backoffs = []
    for _ in range(config.max_backoffs + 1):
        x, norms = richardson(hvp, g, gamma, config.richardson_steps)
        ratio = _contraction(norms)
        finite = all(math.isfinite(n) for n in norms)
        if finite and (ratio is None or ratio < 1.0):
            return Solution(x, gamma, ratio, backoffs)
        new_gamma = gamma * (min(config.backoff_factor, 0.5 / ratio) if finite and ratio else config.backoff_factor)
        event = {"gamma": gamma, "contraction": ratio if finite else None, "finite": finite, "new_gamma": new_gamma}
        log.warning("Richardson iteration diverging at gamma=%.3g (step-norm ratio %s); backing off to gamma=%.3g",
                    gamma, f"{ratio:.3f}" if finite and ratio else "non-finite", new_gamma)
        backoffs.append(event)
        gamma = new_gamma
    log.warning("Richardson iteration still diverging after %d back-offs; using the first-order hypergradient",
                config.max_backoffs)
    backoffs[-1]["fallback"] = "first-order"
    return Solution(g, 0.0, None, backoffs, fallback=True)
