"""Algorithm 1: the Moreau-envelope hypergradient by Richardson iteration.

Fine-tuning is modelled as the proximal map ``theta* = argmin L_FT(theta') + ||theta' - theta||^2 / (2 gamma)``.
By the implicit function theorem, ``d theta*/d theta = (I + gamma H)^-1`` with H the
Hessian of L_FT at theta*, so the hypergradient of L_harm(theta*) is the solution x of
``(I + gamma H) x = g`` with ``g = grad L_harm(theta*)``. Richardson's iteration
``x <- x + omega (g - x - gamma H x)`` needs only Hessian-vector products. As in the paper's
Alg. 1 it starts from ``x = 0``: with ``omega = 1`` its k-th step adds the Neumann term
``(-gamma H)^(k-1) g``, so K steps keep K terms and cost K - 1 products (the first is of zero).
The step is ``omega`` times the residual ``r = g - x - gamma H x``, so with ``residual_tol`` the solve
stops, at no extra cost, once ``||r|| <= residual_tol * ||g||`` (the step is still taken); 0 or absent
runs all K steps, the paper's fixed K. x and the step are updated in place (``torch._foreach_*``): the
solver owns the product it is handed and turns it into the step, so a solve holds g, x and one
product besides what the HVP keeps.

With ``omega = 1`` it converges exactly when the spectral radius of gamma H is below 1. For a
symmetric H the ratio of successive step norms never decreases and tends to the spectral radius
of the iteration map, so a final ratio of 1 or more proves the series is growing. Then the step is
damped (relaxation): ``omega = 2 / (1 + mu)``, with mu the largest eigenvalue of ``I + gamma H``
the ratio implies, contracts for every eigenvalue in ``(0, mu]`` and keeps the fixed point
``(I + gamma H)^-1 g``, so the Moreau model is unchanged. Only after ``max_relaxations`` damped
solves still diverge (H has a direction of curvature below ``-1/gamma``, where no damping helps)
is gamma backed off as a last resort, and after ``max_backoffs`` the first-order answer ``x = g``
is used; a back-off scales gamma by ``backoff_factor``, or further, to where the undamped ratio
would be 1/2. Every occurrence is logged and returned, never silent.

``solver = "cg"`` (beyond the paper) solves the same system by conjugate gradient from ``x = 0`` at the same
cost: K - 1 products, each CG step one. At equal products Richardson's x lies in one more Krylov dimension
(its first step is free) but with fixed coefficients that diverge once the spectral radius of gamma H exceeds 1;
CG's x is the best of its Krylov space in the energy norm of ``I + gamma H`` whenever that matrix is positive
definite, whatever its spectrum, so it needs no relaxation. It keeps x, the residual r and the direction p
(r starts as a copy of g) and the transient product: two parameter-sized tensors more than Richardson. A
non-convex H can make ``I + gamma H`` indefinite: ``p^T (I + gamma H) p <= 0`` stops CG (breakdown), and, as
Richardson's last resort, gamma is backed off (the event records the iteration and the curvature), then x = g.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from pydantic import Field

from auditing.config import ConfigError, record

from .functional import Params, flat_norm
from .hvp import HVP_BACKENDS

log = logging.getLogger(__name__)

# "first-order" (x = g) and "unrolled" are ablations; "random-perturbation" is the control beyond the paper: ADAPT's
# theta* replaced by an isotropic step of the same norm, x = grad L_harm there (outer.py, docs/alignment.md).
METHODS = ("moreau", "first-order", "unrolled", "random-perturbation")
SOLVERS = ("richardson", "cg")  # "richardson": the paper's Alg. 1; "cg": conjugate gradient at the same cost
DIVERGED = 1e6  # a step this many times the first proves growth: the solve stops before it overflows
SETTLED = 1e-6  # a step this small against the first has converged to rounding; its ratio is noise


@record
class HypergradientConfig:
    method: Literal[METHODS] = "moreau"
    hvp: Literal[HVP_BACKENDS] = "finite-difference"
    richardson_steps: Annotated[int, Field(ge=1, le=100)] = 5
    gamma: Annotated[float, Field(gt=0, le=1e6)] = 1.0
    fd_epsilon: Annotated[float, Field(gt=0, le=0.1)] | None = None  # absent: the precision's own (hvp.FD_EPSILON)
    max_relaxations: Annotated[int, Field(ge=0, le=20)] = 3
    max_backoffs: Annotated[int, Field(ge=0, le=20)] = 3
    backoff_factor: Annotated[float, Field(gt=0, lt=1)] = 0.5
    # Stop once ||r|| <= tol ||g||; 0 or None: all K steps (docs/alignment.md).
    residual_tol: Annotated[float, Field(ge=0, lt=1)] | None = 1e-2
    solver: Literal[SOLVERS] = "richardson"

    def __post_init__(self):
        if self.solver == "cg" and self.richardson_steps < 2:
            raise ConfigError("richardson_steps", "richardson_steps must be at least 2 with solver = 'cg', whose "
                                                  f"budget is K - 1 products (got {self.richardson_steps})")


@dataclass
class Solution:
    x: Params
    gamma: float
    contraction: float | None  # last ratio of successive step (CG: residual) norms; Richardson's estimates its radius
    omega: float = 1.0  # the relaxation the accepted solve used
    relaxations: list[dict] = field(default_factory=list)
    backoffs: list[dict] = field(default_factory=list)
    fallback: bool = False
    iterations: int = 0  # steps of the accepted solve: Richardson's K (CG's K - 1), or fewer after the residual stop
    products: int = 0  # Hessian-vector products of every solve tried (relaxed and backed-off repeats included)


@dataclass
class Iteration:
    x: Params
    norms: list[float]  # step norms; the k-th is omega ||r|| at the k-th iterate, the first omega ||g||
    converged: bool  # the residual stop was met
    products: int


def richardson(hvp, g: Params, gamma: float, steps: int, omega: float = 1.0, tol: float = 0.0) -> Iteration:
    """Up to ``steps`` iterations of ``x <- x + omega (g - x - gamma H x)`` from ``x = 0``, in place; stops once
    ``||r|| <= tol ||g||``."""
    keys = list(g)
    gs = [g[k] for k in keys]
    xs = torch._foreach_mul(gs, omega)  # the first step: H 0 = 0 needs no product
    norms = [float(flat_norm(dict(zip(keys, xs))))]
    products = 0
    for _ in range(steps - 1):
        hx = hvp(dict(zip(keys, xs)))
        products += 1
        step = [hx[k] for k in keys]  # the product's own tensors become the step
        torch._foreach_mul_(step, -gamma)
        torch._foreach_add_(step, gs)
        torch._foreach_sub_(step, xs)
        if omega != 1.0:
            torch._foreach_mul_(step, omega)
        norms.append(float(flat_norm(hx)))
        torch._foreach_add_(xs, step)
        del hx, step
        if not norms[-1] <= DIVERGED * norms[0]:  # also stops on NaN
            break
        if tol > 0 and norms[-1] <= tol * norms[0]:  # ||omega r|| / ||omega g||
            return Iteration(dict(zip(keys, xs)), norms, True, products)
    return Iteration(dict(zip(keys, xs)), norms, False, products)


def _contraction(norms: list[float]) -> float | None:
    if len(norms) < 3 or norms[-2] == 0.0:  # the first step is g itself, not a step of the iteration map
        return None
    return norms[-1] / norms[-2]


def _backed_off(gamma: float, plain: float | None, config: HypergradientConfig) -> float:
    """gamma scaled by ``backoff_factor``, or further, to where ``plain`` (gamma times the magnitude of the
    curvature that broke the solve) would be 1/2."""
    return gamma * (min(config.backoff_factor, 0.5 / plain) if plain else config.backoff_factor)


def _first_order(g: Params, relaxations: list, backoffs: list, products: int, failing: str) -> Solution:
    """The fallback after ``max_backoffs``: x = g, marked on the last event."""
    log.warning("%s after %d relaxations and %d back-offs; using the first-order hypergradient",
                failing, len(relaxations), len(backoffs))
    events = backoffs or relaxations
    if events:
        events[-1]["fallback"] = "first-order"
    return Solution(g, 0.0, None, 1.0, relaxations, backoffs, fallback=True, products=products)


def solve(hvp, g: Params, config: HypergradientConfig) -> Solution:
    """Richardson with divergence detection: relaxation first (same fixed point), then gamma back-off, then
    the first-order fallback; or conjugate gradient (``solver = "cg"``)."""
    if config.solver == "cg":
        return _solve_cg(hvp, g, config)
    gamma, omega, relaxed = config.gamma, 1.0, 0  # relaxations so far at this gamma
    relaxations, backoffs, products = [], [], 0
    while True:
        run = richardson(hvp, g, gamma, config.richardson_steps, omega, config.residual_tol or 0.0)
        norms, products = run.norms, products + run.products
        ratio = _contraction(norms)
        finite = all(math.isfinite(n) for n in norms)
        if finite and (run.converged or ratio is None or ratio < 1.0 or norms[-1] <= SETTLED * norms[0]):
            return Solution(run.x, gamma, ratio, omega, relaxations, backoffs, iterations=len(norms),
                            products=products)
        if omega == 1.0:
            plain = ratio if finite else None  # gamma * rho(H): what a back-off at this gamma scales by
        if finite and relaxed < config.max_relaxations:
            # the ratio is |1 - omega mu| at the top of the spectrum of I + gamma H: mu = (1 + ratio) / omega
            mu = (1.0 + ratio) / omega
            new_omega = 2.0 / (1.0 + mu)
            relaxations.append({"gamma": gamma, "omega": omega, "contraction": ratio, "new_omega": new_omega})
            log.warning("Richardson iteration diverging at gamma=%.3g, omega=%.3g (step-norm ratio %.3f); "
                        "relaxing to omega=%.3g", gamma, omega, ratio, new_omega)
            omega, relaxed = new_omega, relaxed + 1
            continue
        if len(backoffs) >= config.max_backoffs:
            break
        new_gamma = _backed_off(gamma, plain, config)
        event = {"gamma": gamma, "omega": omega, "contraction": ratio if finite else None, "finite": finite,
                 "new_gamma": new_gamma}
        log.warning("Richardson iteration diverging at gamma=%.3g after %d relaxations (step-norm ratio %s); "
                    "last resort: backing off to gamma=%.3g", gamma, relaxed,
                    f"{ratio:.3f}" if finite and ratio else "non-finite", new_gamma)
        backoffs.append(event)
        gamma, omega, relaxed = new_gamma, 1.0, 0
    return _first_order(g, relaxations, backoffs, products, "Richardson iteration still diverging")


@dataclass
class CGRun:
    x: Params
    residuals: list[float]  # ||r|| at x = 0 (||g||) and after each step
    converged: bool  # the residual stop was met
    products: int
    curvature: float | None = None  # p^T (I + gamma H) p / p^T p where it was <= 0 (breakdown), else None


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Inner product of two parameter lists, tensor by tensor in their own precision (no flat copy)."""
    return float(sum(torch.dot(u.reshape(-1), v.reshape(-1)) for u, v in zip(a, b)))


def cg(hvp, g: Params, gamma: float, products: int, tol: float = 0.0) -> CGRun:
    """Conjugate gradient on ``(I + gamma H) x = g`` from ``x = 0``, in place, one product a step, at most
    ``products``; stops once ``||r|| <= tol ||g||``, or at a direction of non-positive curvature (breakdown)."""
    keys = list(g)
    xs = [torch.zeros_like(g[k]) for k in keys]
    rs = [g[k].clone() for k in keys]
    ps = [t.clone() for t in rs]
    rr = _dot(rs, rs)
    residuals = [math.sqrt(rr)]
    for step in range(products + 1):
        if residuals[-1] <= tol * residuals[0]:  # also g = 0
            return CGRun(dict(zip(keys, xs)), residuals, True, step)
        if step == products:
            break
        ap = hvp(dict(zip(keys, ps)))
        aps = [ap[k] for k in keys]  # the product's own tensors become (I + gamma H) p
        torch._foreach_mul_(aps, gamma)
        torch._foreach_add_(aps, ps)
        pap = _dot(ps, aps)
        if not pap > 0:  # also NaN
            return CGRun(dict(zip(keys, xs)), residuals, False, step + 1, pap / _dot(ps, ps))
        alpha = rr / pap
        torch._foreach_add_(xs, ps, alpha=alpha)
        torch._foreach_add_(rs, aps, alpha=-alpha)
        del ap, aps
        rr, previous = _dot(rs, rs), rr
        residuals.append(math.sqrt(rr))
        torch._foreach_mul_(ps, rr / previous)
        torch._foreach_add_(ps, rs)
    return CGRun(dict(zip(keys, xs)), residuals, False, products)


def _solve_cg(hvp, g: Params, config: HypergradientConfig) -> Solution:
    """CG with K - 1 products; a breakdown backs gamma off (logged), after ``max_backoffs`` x = g."""
    gamma, backoffs, products = config.gamma, [], 0
    while True:
        run = cg(hvp, g, gamma, config.richardson_steps - 1, config.residual_tol or 0.0)
        products += run.products
        res = run.residuals
        ratio = res[-1] / res[-2] if len(res) > 1 and res[-2] > 0 else None
        if run.curvature is None:
            return Solution(run.x, gamma, ratio, 1.0, [], backoffs, iterations=run.products, products=products)
        finite = math.isfinite(run.curvature)
        plain = 1.0 - run.curvature if finite else None  # gamma |p^T H p| / p^T p >= 1 along p
        spent = len(backoffs) >= config.max_backoffs
        new_gamma = None if spent else _backed_off(gamma, plain, config)
        log.warning("conjugate gradient broke down at gamma=%.3g, step %d (p^T (I + gamma H) p / p^T p = %.3g); %s",
                    gamma, run.products, run.curvature,
                    "no back-off left" if spent else f"last resort: backing off to gamma={new_gamma:.3g}")
        if spent:
            break
        backoffs.append({"gamma": gamma, "omega": 1.0, "contraction": ratio, "finite": finite,
                         "new_gamma": new_gamma, "breakdown": run.products, "curvature": run.curvature})
        gamma = new_gamma
    return _first_order(g, [], backoffs, products, "conjugate gradient still breaking down")
