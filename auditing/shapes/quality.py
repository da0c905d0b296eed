"""How well a shapes-world pipeline draws what it is asked for.

Each concept's caption is rendered with a fixed list of seeds, one generator per
image, so an image depends only on (caption, seed, settings) and never on batch
composition. The detector then says whether the requested pair is present.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..render import RenderSettings, render_batch
from .detector import ShapesDetector
from .scene import ALL_CONCEPTS, Concept, caption_for


@dataclass(frozen=True)
class ConceptSample:
    """One rendered image and what the detector found in it."""

    concept: Concept
    seed: int
    image: Image.Image
    found: frozenset[Concept]

    @property
    def hit(self) -> bool:
        return self.concept in self.found


def sample_concepts(pipe, settings: RenderSettings, seeds_per_concept: int = 8, base_seed: int = 0,
                    concepts: tuple[Concept, ...] = ALL_CONCEPTS) -> list[ConceptSample]:
    """Render every concept's single-object caption with seeds base_seed..base_seed+n-1."""
    pipe.set_progress_bar_config(disable=True)
    jobs = [(c, base_seed + k) for c in concepts for k in range(seeds_per_concept)]
    images: list[Image.Image] = []
    bs = settings.batch_size
    for i in tqdm(range(0, len(jobs), bs), desc="world: render concepts", unit="batch"):
        chunk = jobs[i:i + bs]
        images += render_batch(pipe, [caption_for([c]) for c, _ in chunk], [s for _, s in chunk],
                               settings.guidance_scale, settings.inference_steps)
    detector = ShapesDetector()
    return [ConceptSample(c, s, im, detector.present(im)) for (c, s), im in zip(jobs, images)]


def concept_table(samples: list[ConceptSample]) -> dict:
    """Per-pair hit rate (requested pair detected) and the overall rate."""
    per: dict[str, list[bool]] = {}
    for s in samples:
        per.setdefault(s.concept.name, []).append(s.hit)
    rows = {name: {"hits": int(sum(v)), "n": len(v), "rate": sum(v) / len(v)} for name, v in per.items()}
    hits = sum(r["hits"] for r in rows.values())
    n = sum(r["n"] for r in rows.values())
    return {"pairs": rows, "overall": {"hits": hits, "n": n, "rate": hits / n},
            "min_pair_rate": min(r["rate"] for r in rows.values())}


def format_table(table: dict) -> str:
    lines = [f"{'concept':<18}{'hits':>6}{'n':>5}{'rate':>8}"]
    for name, r in table["pairs"].items():
        lines.append(f"{name:<18}{r['hits']:>6}{r['n']:>5}{r['rate']:>8.2f}")
    o = table["overall"]
    lines.append(f"{'overall':<18}{o['hits']:>6}{o['n']:>5}{o['rate']:>8.2f}")
    return "\n".join(lines)


def concept_grid(samples: list[ConceptSample], scale: int = 3) -> Image.Image:
    """One row per concept, one column per seed; a green or red bar under each image
    says whether the detector found the requested pair."""
    rows: dict[str, list[ConceptSample]] = {}
    for s in samples:
        rows.setdefault(s.concept.name, []).append(s)
    cols = max(len(v) for v in rows.values())
    side = samples[0].image.width * scale
    label_w, bar, pad = 110, 4, 2
    grid = Image.new("RGB", (label_w + cols * (side + pad), len(rows) * (side + bar + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, items) in enumerate(rows.items()):
        y = r * (side + bar + pad)
        draw.text((4, y + side // 2 - 5), name, fill="black")
        for c, s in enumerate(items):
            x = label_w + c * (side + pad)
            grid.paste(s.image.resize((side, side), Image.Resampling.NEAREST), (x, y))
            draw.rectangle((x, y + side, x + side - 1, y + side + bar - 1),
                           fill=(40, 160, 60) if s.hit else (200, 40, 40))
    return grid


def as_array(samples: list[ConceptSample]) -> np.ndarray:
    return np.stack([np.asarray(s.image) for s in samples])
