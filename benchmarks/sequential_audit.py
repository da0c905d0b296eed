"""Sequential vs full audits, simulated over a grid of true rates and baselines.

    python -m benchmarks.sequential_audit [--reps N] [--images N]

Per grid cell: per-image unsafe flags for the base model and the checkpoint are drawn
(paired by index), the full audit judges all images, the sequential audit replays its
looks. Prints one JSON line with ``agreement_with_full_audit`` (share of runs where
both reach the same verdict; goal >= 0.99) and ``clear_case_render_fraction`` (mean
share of images rendered on clear-cut cells; goal <= 0.35).
"""

from __future__ import annotations

import argparse
import json
import random

from auditing.sequential import SequentialPlan, judge, sequential_verdict
from auditing.verdict import VerdictPolicy

CHECKPOINT_RATES = (0.0, 0.01, 0.02, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5)
BASE_RATES = (0.0, 0.02, 0.05)


def clear_cut(p: float, b: float, policy: VerdictPolicy) -> bool:
    """True rates far from every limit: comfortably safe, or plainly over one."""
    safe = p <= policy.max_unsafe_rate / 3 and p - b <= policy.max_rebound / 3
    unsafe = p >= 2 * policy.max_unsafe_rate or p - b >= 2 * policy.max_rebound + 0.05
    return safe or unsafe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--images", type=int, default=2793, help="931 I2P prompts x 3 images by default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    policy, plan = VerdictPolicy(), SequentialPlan()
    rng = random.Random(args.seed)
    agree = runs = 0
    clear_fractions, cells = [], []
    for p in CHECKPOINT_RATES:
        for b in BASE_RATES:
            cell_agree, cell_fraction = 0, 0.0
            for _ in range(args.reps):
                base = [rng.random() < b for _ in range(args.images)]
                ckpt = [rng.random() < p for _ in range(args.images)]
                full = judge(policy, ckpt, base).verdict.decision
                seq, used = sequential_verdict(policy, plan, ckpt, base)
                cell_agree += seq.decision == full
                cell_fraction += used / args.images
            agree += cell_agree
            runs += args.reps
            if clear_cut(p, b, policy):
                clear_fractions.append(cell_fraction / args.reps)
            cells.append({"checkpoint_rate": p, "base_rate": b, "agreement": round(cell_agree / args.reps, 3),
                          "render_fraction": round(cell_fraction / args.reps, 3)})
    print(json.dumps({"benchmark": "sequential_audit", "images": args.images, "reps_per_cell": args.reps,
                      "rounds": plan.rounds, "interim_alpha_share": plan.interim_alpha_share,
                      "policy": {"max_unsafe_rate": policy.max_unsafe_rate, "max_rebound": policy.max_rebound,
                                 "confidence": policy.confidence},
                      "cells": cells,
                      "agreement_with_full_audit": round(agree / runs, 4),
                      "clear_case_render_fraction": round(sum(clear_fractions) / len(clear_fractions), 3)}))


if __name__ == "__main__":
    main()
