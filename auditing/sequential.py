"""Sequential auditing: render in rounds and stop once the verdict is settled.

Design: group-sequential with Bonferroni alpha spending (docs/sequential-audit.md).
``rounds`` looks at equal fractions of the probe images, taken in a fixed pseudo-random
order so that every prefix is a fair sample of the set. Each interim look judges with
intervals at confidence ``1 - share * alpha / (rounds - 1)`` (and McNemar at the same
reduced level) and may stop only on *pass* or *block*; the last look is the ordinary
full audit. By the union bound, the interim looks together add at most ``share * alpha``
to the error of the full audit, however the interim results turn out. Why not an
anytime-valid confidence sequence: renders come in batches anyway, a handful of planned
looks loses little, and the same exact/score intervals and verdict code serve both modes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

from .stats import PairedComparison, Rate, paired_comparison, rate
from .verdict import Verdict, VerdictPolicy, decide


@dataclass(frozen=True)
class SequentialPlan:
    rounds: int = 4
    interim_alpha_share: float = 0.5  # fraction of the error budget the interim looks may spend

    def __post_init__(self):
        if self.rounds < 2:
            raise ValueError(f"rounds must be >= 2 (got {self.rounds})")
        if not 0.0 < self.interim_alpha_share <= 1.0:
            raise ValueError(f"interim_alpha_share must be in (0, 1] (got {self.interim_alpha_share})")

    def looks(self, n: int) -> list[int]:
        """Cumulative image counts at each look; the last is n."""
        return sorted({max(1, math.ceil(n * k / self.rounds)) for k in range(1, self.rounds + 1)})

    def interim_policy(self, policy: VerdictPolicy) -> VerdictPolicy:
        spend = self.interim_alpha_share / (self.rounds - 1)
        return replace(policy, name=f"{policy.name} (interim look)",
                       confidence=1 - spend * (1 - policy.confidence), alpha=spend * policy.alpha)


def render_order(n: int, key: str) -> list[int]:
    """A fixed pseudo-random permutation of range(n), determined by ``key`` (the probe-set hash)."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{key}:{i}".encode()).digest())


@dataclass(frozen=True)
class Judgement:
    """A verdict and the figures it was reached on (what a report shows)."""

    verdict: Verdict
    checkpoint: Rate
    comparison: PairedComparison | None


def judge(policy: VerdictPolicy, flags: list[bool], base_flags: list[bool] | None) -> Judgement:
    """The verdict on the images seen so far, at the policy's confidence."""
    checkpoint = rate(flags, confidence=policy.confidence)
    comparison = None if base_flags is None else paired_comparison(base_flags, flags, policy.confidence)
    return Judgement(decide(policy, checkpoint, comparison), checkpoint, comparison)


def sequential_verdict(policy: VerdictPolicy, plan: SequentialPlan, flags: list[bool],
                       base_flags: list[bool] | None = None) -> tuple[Verdict, int]:
    """Replay the looks over per-image flags already in render order; return (verdict, images used).

    ``run_audit`` renders look by look and calls ``judge`` the same way; this replay is what
    the benchmark simulates.
    """
    looks = plan.looks(len(flags))
    interim = plan.interim_policy(policy)
    for m in looks[:-1]:
        verdict = judge(interim, flags[:m], None if base_flags is None else base_flags[:m]).verdict
        if verdict.decision != "flag":
            return verdict, m
    return judge(policy, flags, base_flags).verdict, len(flags)
