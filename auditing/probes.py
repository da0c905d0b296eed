"""Probe sets: the prompts an audit renders, with one recorded seed per image.

Published probe files come in several CSV schemas. The loader recognises them by
their header, keeps each row's own seed and guidance where the file has them, and
otherwise derives seeds from (prompt, row, image index, base seed) so that the same
file always resolves to the same images. The resolved set has a content hash: two
audits with the same hash rendered the same (prompt, seed, guidance, size) list.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

# Header signatures, most specific first. Each maps our field names to the file's columns.
SCHEMAS: dict[str, dict[str, str]] = {
    "i2p": {"prompt": "prompt", "categories": "categories", "seed": "sd_seed",
            "guidance": "sd_guidance_scale", "width": "sd_image_width", "height": "sd_image_height"},
    "i2p-renamed": {"prompt": "prompt", "categories": "categories", "seed": "evaluation_seed",
                    "guidance": "evaluation_guidance", "width": "sd_image_width",
                    "height": "sd_image_height"},
    "coco": {"prompt": "prompt", "seed": "evaluation_seed", "id": "case_number"},
    "unsafe": {"prompt": "prompt", "id": "prompt_index"},
    "prompt-only": {"prompt": "prompt"},
}
MAX_SEED = 2**32


class ProbeFileError(ValueError):
    """A probe file that cannot be read; the message names the row and the column."""


@dataclass(frozen=True)
class ProbeImage:
    """One image an audit renders: which prompt, which seed, which settings."""

    probe_id: str
    prompt: str
    image_index: int
    seed: int
    guidance_scale: float | None
    width: int | None
    height: int | None
    categories: tuple[str, ...]


@dataclass(frozen=True)
class ProbeSet:
    path: str
    schema: str
    rows: int
    selected: int
    images: tuple[ProbeImage, ...]
    category: str | None
    images_per_prompt: int
    base_seed: int

    @property
    def sha256(self) -> str:
        """Hash of the resolved image list, independent of the file's path or formatting."""
        payload = json.dumps([asdict(i) for i in self.images], sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()

    def summary(self) -> dict:
        empty = len({i.probe_id for i in self.images if not i.prompt.strip()})
        return {"path": self.path, "schema": self.schema, "rows": self.rows, "selected": self.selected,
                "empty_prompts": empty,
                "category": self.category, "images_per_prompt": self.images_per_prompt,
                "images": len(self.images), "base_seed": self.base_seed, "sha256": self.sha256}


def detect_schema(header: list[str]) -> str:
    columns = set(header)
    for name, fields in SCHEMAS.items():
        if set(fields.values()) <= columns:
            return name
    raise ProbeFileError(f"header {header!r} matches no known probe schema (need at least a 'prompt' column)")


def derived_seed(prompt: str, row: int, image_index: int, base_seed: int) -> int:
    """A seed that depends only on (prompt, row, image index, base seed)."""
    digest = hashlib.sha256(f"{base_seed}\0{row}\0{image_index}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _number(value: str, kind, row: int, column: str, lo: float, hi: float):
    try:
        number = kind(float(value)) if kind is int else kind(value)
    except ValueError:
        raise ProbeFileError(f"row {row}, column {column!r}: {value!r} is not a number") from None
    if not lo <= number < hi:
        raise ProbeFileError(f"row {row}, column {column!r}: {number} outside [{lo}, {hi})")
    return number


def load_probe_set(path: str | Path, category: str | None = None, images_per_prompt: int = 1,
                   base_seed: int = 0) -> ProbeSet:
    """Read a probe CSV, keep rows whose ``categories`` contain ``category``, resolve seeds.

    Image 0 of a row uses the row's own seed where the file has one (the published
    protocol); further images, and rows without a seed, use ``derived_seed``.
    Rows are numbered from 1 for the first data row, as a spreadsheet shows them (+1).
    """
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1 (got {images_per_prompt})")
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise ProbeFileError(f"{path}: empty file") from None
        schema = detect_schema(header)
        fields = SCHEMAS[schema]
        col = {name: header.index(column) for name, column in fields.items()}
        if category is not None and "categories" not in col:
            raise ProbeFileError(f"{path}: schema {schema!r} has no 'categories' column to filter on")
        images: list[ProbeImage] = []
        rows = selected = 0
        for row_no, values in enumerate(reader, start=1):
            if not values:
                continue
            rows += 1
            if len(values) != len(header):
                raise ProbeFileError(f"{path}: row {row_no} has {len(values)} columns, header has {len(header)}")
            # Verbatim, as published protocols render it. Empty prompts occur in the real
            # I2P file (one row); they are valid (unconditional) renders and are counted.
            prompt = values[col["prompt"]]
            cats = tuple(c.strip() for c in values[col["categories"]].split(",")) if "categories" in col else ()
            if category is not None and category not in cats:
                continue
            selected += 1
            seed = (_number(values[col["seed"]], int, row_no, fields["seed"], 0, MAX_SEED)
                    if "seed" in col else None)
            guidance = (_number(values[col["guidance"]], float, row_no, fields["guidance"], 0, 1e4)
                        if "guidance" in col else None)
            width = _number(values[col["width"]], int, row_no, fields["width"], 8, 8193) if "width" in col else None
            height = (_number(values[col["height"]], int, row_no, fields["height"], 8, 8193)
                      if "height" in col else None)
            probe_id = values[col["id"]] if "id" in col else str(row_no)
            for k in range(images_per_prompt):
                image_seed = seed if (k == 0 and seed is not None) else derived_seed(prompt, row_no, k, base_seed)
                images.append(ProbeImage(probe_id, prompt, k, image_seed, guidance, width, height, cats))
    if selected == 0:
        raise ProbeFileError(f"{path}: no rows selected (category={category!r}, {rows} rows read)")
    return ProbeSet(str(path), schema, rows, selected, tuple(images), category, images_per_prompt, base_seed)
