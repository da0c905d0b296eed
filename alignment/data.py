"""The three data sets hardening reads, encoded once.

* harmful: what L_harm unlearns. A folder of (image, caption) pairs (caption folder or
  imagefolder layout), or a probe CSV (I2P, Unsafe, prompt-only) whose prompts are
  rendered by the base model itself, through the auditor's disk-cached renderer.
* preservation: prompts (with images) on which R distils the original model; also the
  class images of prior-preservation fine-tuning configurations.
* finetune: the pool simulated customer fine-tuning draws from (D_FT). Like the paper's (App. B.4)
  it may mix several sets, harmful ones among them, each with its share of the examples drawn.

Each set is recorded with the content hash of what was read, for the manifest.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from PIL import Image
from pydantic import BeforeValidator, Field, TypeAdapter

from auditing.config import ConfigError, record, text
from auditing.layouts import load_examples
from auditing.models.conditioning import encode_text
from auditing.models.examples import encode_images
from auditing.models.hashing import tree_sha256
from auditing.probes import load_probe_set
from auditing.render import Renderer, RenderSettings

from .functional import Batch

log = logging.getLogger(__name__)

PROBE_SUFFIXES = (".csv",)
FINETUNE_SAMPLING = ("resample", "fixed")


_SETS = TypeAdapter(Annotated[tuple[str, ...], Field(strict=False)])


def _one_or_several(value):
    """``finetune`` as given: one set (a string), or a mixture (a list, kept a tuple even of one set)."""
    if isinstance(value, (list, tuple)):
        return _SETS.validate_python(value)
    if not isinstance(value, str):
        raise ConfigError("finetune", f"finetune must name a folder or a probe CSV, or list several (got {value!r})")
    return value


@record(kw_only=False)
class DataConfig:
    harmful: text()
    preservation: text()
    finetune: Annotated[str | tuple[str, ...], BeforeValidator(_one_or_several)]
    # One per finetune set; absent: equal shares.
    finetune_shares: Annotated[tuple[Annotated[float, Field(gt=0, le=1)], ...], Field(strict=False)] | None = None
    harmful_category: str | None = None
    preservation_category: str | None = None
    images_per_prompt: Annotated[int, Field(ge=1, le=64)] = 1
    max_examples: Annotated[int, Field(ge=1, le=100_000)] = 512
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 4
    # "fixed": the same fine-tuning batches every outer step (an ablation).
    finetune_sampling: Literal[FINETUNE_SAMPLING] = "resample"

    def __post_init__(self):
        sets = self.finetune_sets()
        if not sets or not all(s.strip() for s in sets):
            raise ConfigError("finetune", f"finetune must name a folder or a probe CSV, or list several "
                              f"(got {self.finetune!r})")
        shares = self.shares()
        if len(shares) != len(sets):
            raise ConfigError("finetune_shares", f"finetune_shares must have one share per finetune set "
                              f"({len(sets)}; got {len(shares)})")
        if not math.isclose(sum(shares), 1.0, abs_tol=1e-6):
            raise ConfigError("finetune_shares", f"finetune_shares must sum to 1 (got {list(shares)})")

    def finetune_sets(self) -> tuple[str, ...]:
        return (self.finetune,) if isinstance(self.finetune, str) else self.finetune

    def shares(self) -> tuple[float, ...]:
        n = len(self.finetune_sets())
        return self.finetune_shares if self.finetune_shares is not None else (1.0 / n,) * n


@dataclass(frozen=True)
class EncodedSet:
    """Encoded examples; ``parts`` are (start, stop, share) of a mixture's sets (empty for one set)."""

    batch: Batch
    prompts: tuple[str, ...]
    source: dict | list
    parts: tuple[tuple[int, int, float], ...] = ()

    def draw(self, rng: random.Random, size: int) -> torch.Tensor:
        """Indices of a batch: distinct examples of one set, or of a mixture each example's set by its share."""
        if not self.parts:
            return torch.tensor(rng.sample(range(len(self.batch)), min(size, len(self.batch))))
        chosen = rng.choices(self.parts, weights=[share for _, _, share in self.parts], k=size)
        return torch.tensor([rng.randrange(start, stop) for start, stop, _ in chosen])


@dataclass(frozen=True)
class AlignmentData:
    harmful: EncodedSet
    preservation: EncodedSet
    finetune: EncodedSet

    def sources(self) -> dict:
        return {name: getattr(self, name).source for name in ("harmful", "preservation", "finetune")}


def _read(pipe, model_sha256: str, source: Path, category: str | None, images_per_prompt: int, max_examples: int,
          render: RenderSettings, cache_dir: Path | None) -> tuple[list[Image.Image], list[str], dict]:
    if source.suffix.lower() in PROBE_SUFFIXES:
        probes = load_probe_set(source, category=category, images_per_prompt=images_per_prompt)
        images = list(probes.images)[:max_examples]
        renderer = Renderer(pipe, model_sha256, settings=render, cache_dir=cache_dir)
        rendered = renderer.render(images, desc=f"align: render {source.name}")
        info = {"path": str(source), "kind": "probes", "schema": probes.schema, "category": category,
                "sha256": probes.sha256, "rendered_by": model_sha256, "render": renderer.info()}
        return rendered, [p.prompt for p in images], info
    examples = load_examples(source)[:max_examples]
    info = {"path": str(source), "kind": "folder", "sha256": tree_sha256(source)}
    return [im for im, _ in examples], [c for _, c in examples], info


def load_data(pipe, model_sha256: str, config: DataConfig, render: RenderSettings,
              cache_dir: Path | None = None) -> AlignmentData:
    """Read, (render,) and encode the three sets, whose paths the caller has resolved."""

    def encode(name: str, value: str, category: str | None) -> EncodedSet:
        path = Path(value)
        if not path.exists():
            raise FileNotFoundError(f"data.{name}: {path} does not exist")
        images, prompts, info = _read(pipe, model_sha256, path, category, config.images_per_prompt,
                                      config.max_examples, render, cache_dir)
        info["examples"] = len(images)
        log.info("data.%s: %d examples from %s", name, len(images), path)
        return EncodedSet(Batch(encode_images(pipe, images), encode_text(pipe, prompts).hidden), tuple(prompts), info)

    harmful = encode("harmful", config.harmful, config.harmful_category)
    preservation = encode("preservation", config.preservation, config.preservation_category)
    if isinstance(config.finetune, str):
        return AlignmentData(harmful, preservation, encode("finetune", config.finetune, None))
    mixture = [encode("finetune", value, None) for value in config.finetune]
    parts, start = [], 0
    for part, share in zip(mixture, config.shares()):
        parts.append((start, start + len(part.batch), share))
        start += len(part.batch)
    batch = Batch(torch.cat([p.batch.latents for p in mixture]), torch.cat([p.batch.cond for p in mixture]))
    sources = [{**p.source, "share": share} for p, share in zip(mixture, config.shares())]
    finetune = EncodedSet(batch, sum((p.prompts for p in mixture), ()), sources, tuple(parts))
    return AlignmentData(harmful, preservation, finetune)
