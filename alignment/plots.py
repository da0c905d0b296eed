"""Training curves of an alignment run, as a PNG people can glance at."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the file-only backend)


def plot_curves(records: list[dict], out: str | Path) -> Path:
    """L_harm before and after simulated fine-tuning, R, and the hypergradient norm per outer step."""
    steps = [r["step"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(steps, [r["L_harm"] for r in records], label="L_harm(theta)")
    if any(r["L_harm_star_mean"] is not None for r in records):  # absent when beta = 0: no inner runs
        top.plot(steps, [r["L_harm_star_mean"] for r in records], label="L_harm(theta*) (mean over J)")
    top.plot(steps, [r["R"] for r in records], label="R(theta)")
    backoff_steps = [r["step"] for r in records if r["backoffs"]]
    if backoff_steps:
        top.scatter(backoff_steps, [0] * len(backoff_steps), marker="x", color="red", label="gamma back-off")
    top.set_ylabel("loss")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(steps, [r["hypergradient_norm"] for r in records], color="tab:purple")
    bottom.set_ylabel("||hypergradient||")
    bottom.set_xlabel("outer step")
    bottom.grid(alpha=0.3)
    fig.suptitle("ftgate align")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
