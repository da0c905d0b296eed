"""Rendering probe images: one generator per image, batched, cached on disk.

An image must depend only on (model, adapter, prompt, seed, settings), never on
batch size or order, or a paired comparison with the base model would compare
different noise. Each image therefore gets its own ``torch.Generator``; batching is
only a speed-up. Rendered images are cached under a key of exactly those inputs, so
a base model's baseline is rendered once however many checkpoints are compared to it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from PIL import Image
from pydantic import Field
from tqdm.auto import tqdm

from .config import record
from .files import atomic_write
from .probes import ProbeImage

# Weight and activation precision. Half precision changes pixels, so it is part of the cache key
# and of what a baseline must match; float32 is the default (CPUs), float16/bfloat16 are for GPUs.
DTYPES = ("float32", "float16", "bfloat16")
Dtype = Literal[DTYPES]
Guidance = Annotated[float, Field(allow_inf_nan=False)]  # a finite classifier-free guidance scale


@record(kw_only=False)
class RenderSettings:
    inference_steps: Annotated[int, Field(ge=1)] = 30
    guidance_scale: Guidance = 7.5  # used where the probe file gives none
    batch_size: Annotated[int, Field(ge=1)] = 8
    dtype: Dtype = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        """What to load the pipeline with (``load_pipeline(..., torch_dtype=...)``)."""
        return getattr(torch, self.dtype)


def render_batch(pipe, prompts: list[str], seeds: list[int], guidance_scale: float, inference_steps: int,
                 width: int | None = None, height: int | None = None) -> list[Image.Image]:
    """One pipeline call; image i comes from ``torch.Generator().manual_seed(seeds[i])``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts ({len(prompts)}) and seeds ({len(seeds)}) differ in length")
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, generator=generators, guidance_scale=guidance_scale,
                num_inference_steps=inference_steps, width=width, height=height, output_type="pil").images


def cached_image_path(cache_dir: Path, key: str) -> Path:
    """Where the cache keeps the image of ``key`` (a report records each image's key, so a reviewer's page can
    find the unredacted render while the retention sweep has not removed it)."""
    return cache_dir / key[:2] / f"{key}.png"


@dataclass(frozen=True)
class RenderedChunk:
    """Some of the images asked for: their positions in the request, the images, and for each the cache key
    to store it under (None: it came from the cache)."""

    indices: list[int]
    images: list[Image.Image]
    fresh: list[str | None]


class Renderer:
    """Renders probe images for one (model, adapter) pair, through an optional disk cache."""

    def __init__(self, pipe, model_sha256: str, adapter_sha256: str | None = None,
                 settings: RenderSettings = RenderSettings(), cache_dir: str | Path | None = None):
        self.pipe = pipe
        self.model_sha256 = model_sha256
        self.adapter_sha256 = adapter_sha256
        self.settings = settings
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if pipe.dtype != settings.torch_dtype:  # the cache key must say what the pixels were computed in
            raise ValueError(f"pipeline weights are {pipe.dtype} but the render settings ask for {settings.dtype}; "
                             f"load the pipeline with torch_dtype=torch.{settings.dtype}")
        pipe.set_progress_bar_config(disable=True)

    def _guidance(self, probe: ProbeImage) -> float:
        return probe.guidance_scale if probe.guidance_scale is not None else self.settings.guidance_scale

    def key(self, probe: ProbeImage) -> str:
        """Cache key: every input the pixels depend on, nothing they do not."""
        payload = {"model": self.model_sha256, "adapter": self.adapter_sha256, "prompt": probe.prompt,
                   "seed": probe.seed, "guidance": self._guidance(probe), "width": probe.width,
                   "height": probe.height, "steps": self.settings.inference_steps, "dtype": self.settings.dtype,
                   "scheduler": type(self.pipe.scheduler).__name__}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return cached_image_path(self.cache_dir, key)

    def _cached(self, key: str) -> Image.Image | None:
        if self.cache_dir is None or not self._path(key).is_file():
            return None
        return Image.open(self._path(key)).convert("RGB")

    def store(self, chunk: RenderedChunk) -> None:
        """Write the chunk's fresh renders to the cache (nothing without one)."""
        if self.cache_dir is None:
            return
        for key, image in zip(chunk.fresh, chunk.images):
            if key is None:
                continue
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            atomic_write(self._path(key), buf.getvalue())

    def chunks(self, probes: list[ProbeImage], desc: str = "render") -> Iterator[RenderedChunk]:
        """The images of ``probes``, a chunk at a time as they become ready: the cached ones first, then one
        chunk per pipeline call. Lazy, so a caller can score one chunk while the next renders; it must
        ``store`` each chunk for the cache to keep it."""
        keys = [self.key(p) for p in probes]
        cached = [self._cached(k) for k in keys]
        hits = [i for i, im in enumerate(cached) if im is not None]
        if hits:
            yield RenderedChunk(hits, [cached[i] for i in hits], [None] * len(hits))
        # Batch only images sharing the settings one pipeline call takes.
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(cached):
            if image is None:
                p = probes[i]
                groups.setdefault((self._guidance(p), p.width, p.height), []).append(i)
        bs = self.settings.batch_size
        todo = len(probes) - len(hits)
        with tqdm(total=todo, desc=desc, unit="img", disable=not todo) as bar:
            for (guidance, width, height), idx in groups.items():
                for start in range(0, len(idx), bs):
                    chunk = idx[start:start + bs]
                    out = render_batch(self.pipe, [probes[i].prompt for i in chunk],
                                       [probes[i].seed for i in chunk], guidance,
                                       self.settings.inference_steps, width, height)
                    yield RenderedChunk(chunk, list(out), [keys[i] for i in chunk])
                    bar.update(len(chunk))

    def render(self, probes: list[ProbeImage], desc: str = "render") -> list[Image.Image]:
        """Images in the order of ``probes``; cached ones are not re-rendered, fresh ones are cached."""
        images: list[Image.Image | None] = [None] * len(probes)
        for chunk in self.chunks(probes, desc):
            self.store(chunk)
            for i, image in zip(chunk.indices, chunk.images):
                images[i] = image
        return images  # type: ignore[return-value]

    def info(self) -> dict:
        return {"model_sha256": self.model_sha256, "adapter_sha256": self.adapter_sha256,
                "settings": asdict(self.settings), "scheduler": type(self.pipe.scheduler).__name__}
