"""Rates with confidence intervals, and the paired comparison with the base model.

Published evaluators report point estimates. A gate that blocks customers' work
needs to say how sure it is, so every rate carries an interval, and a checkpoint is
compared with its base model on identical (prompt, seed) pairs: the pairing removes
prompt-to-prompt variation, and only discordant pairs carry information about a
difference (McNemar).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

METHODS = ("wilson", "exact")


@dataclass(frozen=True)
class Rate:
    """hits out of n, with a two-sided interval at ``confidence``."""

    hits: int
    n: int
    lo: float
    hi: float
    confidence: float
    method: str

    @property
    def rate(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    def as_dict(self) -> dict:
        return asdict(self) | {"rate": self.rate}


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1) (got {confidence})")


def _z(confidence: float) -> float:
    _check_confidence(confidence)
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(hits: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval: good coverage near 0 and 1, where safety rates live."""
    _check_counts(hits, n)
    z = _z(confidence)
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exact ends where the closed form only rounds to them.
    lo = 0.0 if hits == 0 else max(0.0, centre - half)
    hi = 1.0 if hits == n else min(1.0, centre + half)
    return lo, hi


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (stable for n in the thousands)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _bisect(f, lo: float, hi: float, iterations: int = 60) -> float:
    """Root of a function increasing from negative to positive on [lo, hi]."""
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t critical value: P(|T| <= t) = ``confidence`` with ``df`` degrees of freedom,
    from the closed form of P(|T| <= t) for integer df (Abramowitz & Stegun 26.7.3-4)."""
    def central(t: float) -> float:
        theta = math.atan(t / math.sqrt(df))
        c2 = math.cos(theta) ** 2
        term, total = 1.0, 1.0
        if df % 2:
            for k in range(1, (df - 1) // 2):
                term *= c2 * 2 * k / (2 * k + 1)
                total += term
            return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total

    hi = 1.0
    while central(hi) < confidence:
        hi *= 2
    return _bisect(lambda t: central(t) - confidence, 0.0, hi)


def exact_interval(hits: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval: guaranteed coverage, wider than Wilson."""
    _check_counts(hits, n)
    _check_confidence(confidence)
    alpha = 1 - confidence
    lo = 0.0 if hits == 0 else _bisect(lambda p: (1 - binom_cdf(hits - 1, n, p)) - alpha / 2, 0.0, 1.0)
    hi = 1.0 if hits == n else _bisect(lambda p: alpha / 2 - binom_cdf(hits, n, p), 0.0, 1.0)
    return lo, hi


def _check_counts(hits: int, n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    if not 0 <= hits <= n:
        raise ValueError(f"hits must be in [0, n={n}] (got {hits})")


def rate(flags: list[bool], confidence: float = 0.95, method: str = "wilson") -> Rate:
    """The unsafe rate of a list of per-image flags."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} not in {METHODS}")
    hits, n = sum(bool(f) for f in flags), len(flags)
    lo, hi = (wilson_interval if method == "wilson" else exact_interval)(hits, n, confidence)
    return Rate(hits, n, lo, hi, confidence, method)


@dataclass(frozen=True)
class PairedComparison:
    """Checkpoint vs base on the same n (prompt, seed) pairs.

    ``only_base``: unsafe from the base, safe from the checkpoint; ``only_checkpoint``: the
    reverse. ``rebound`` = checkpoint rate - base rate, with an Agresti-Min interval;
    ``p_value``: exact one-sided McNemar test of "the checkpoint is no more unsafe".
    """

    n: int
    both: int
    only_base: int
    only_checkpoint: int
    rebound: float
    lo: float
    hi: float
    p_value: float
    confidence: float

    def as_dict(self) -> dict:
        return asdict(self)


def mcnemar_one_sided(only_base: int, only_checkpoint: int) -> float:
    """P(at least ``only_checkpoint`` of the discordant pairs favour 'checkpoint unsafe')
    when each discordant pair is a fair coin (no rebound)."""
    discordant = only_base + only_checkpoint
    if discordant == 0:
        return 1.0
    return 1.0 - binom_cdf(only_checkpoint - 1, discordant, 0.5)


def paired_comparison(base: list[bool], checkpoint: list[bool], confidence: float = 0.95) -> PairedComparison:
    """Compare per-image flags aligned by (prompt, seed)."""
    if len(base) != len(checkpoint):
        raise ValueError(f"paired lists differ in length: base {len(base)}, checkpoint {len(checkpoint)}")
    n = len(base)
    if n < 1:
        raise ValueError("paired comparison needs at least one pair")
    both = sum(1 for b, c in zip(base, checkpoint) if b and c)
    only_base = sum(1 for b, c in zip(base, checkpoint) if b and not c)
    only_ckpt = sum(1 for b, c in zip(base, checkpoint) if c and not b)
    # Agresti & Min (2005): add 1/2 to each of the four cells (n grows by 2), then Wald on
    # the difference of marginals, which only the discordant cells determine.
    b, c, m = only_base + 0.5, only_ckpt + 0.5, n + 2.0
    diff = (c - b) / m
    var = ((b + c) - (c - b) ** 2 / m) / m**2
    half = _z(confidence) * math.sqrt(max(var, 0.0))
    rebound = (only_ckpt - only_base) / n
    return PairedComparison(n, both, only_base, only_ckpt, rebound, max(-1.0, diff - half),
                            min(1.0, diff + half), mcnemar_one_sided(only_base, only_ckpt), confidence)
