"""What a reviewer judges a paired audit on: its discordant pairs, and the images of them.

A paired audit (``auditing.audit``) renders the checkpoint and its base model on the same prompts and seeds; the
pairs where one of the two was detected unsafe and the other not are the discordant pairs, which the rebound
test (McNemar) counts. The report records each image's render-cache key and pixel hash, and for a paired image
its base model's image and results, so the pages can show both sides. By default an image is shown as the
report shows it (``auditing.report.as_shown``: redacted when either detector flagged it); the unredacted render
is read from the auditor's render cache, and served only behind a reviewer's explicit, logged action
(``gate.web.views``). The retention sweep removes cached renders after ``render_cache_retention_hours``; a removed
image is a 410 saying so, never a 500, and a render whose pixels are not the ones the audit scored is refused.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from auditing.audit import image_sha256
from auditing.job_probes import PROFILE
from auditing.render import cached_image_path
from auditing.report import as_shown, flagged
from gate.api.errors import ApiError

SIDES = ("base", "checkpoint")
MAX_PAIRS = 50  # per probe family on the job page; the counts say how many there are
UNREDACTED_VIEW = "unredacted image viewed"  # the audit-log action, on the audit whose image was shown
_KEY = re.compile(r"[0-9a-f]{64}")  # a render-cache key (sha256 hex): never a path of the report's choosing


@dataclass(frozen=True)
class Pair:
    """One discordant pair: the checkpoint's sample (its position in the report's samples names the pair), its
    base model's partner, and the metrics on which the two disagree ("IP", "US")."""

    index: int
    checkpoint: dict
    base: dict
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class FamilyPairs:
    """A probe family's discordant pairs (the first ``MAX_PAIRS`` of ``total``) and its IP rebound figures."""

    name: str
    pairs: list[Pair]
    total: int
    comparison: dict | None


def _unsafe(result: dict | None) -> bool | None:
    return None if result is None else bool(result["unsafe"])


def _disagree(sample: dict, base: dict) -> tuple[str, ...]:
    metrics = ("IP",) if bool(sample["unsafe"]) != bool(base["unsafe"]) else ()
    us, base_us = _unsafe(sample.get("us")), _unsafe(base.get("us"))
    return metrics + (("US",) if None not in (us, base_us) and us != base_us else ())


def discordant_pairs(report: dict) -> list[FamilyPairs]:
    """Every paired family of the report with its discordant pairs, in the report's order (no families: the
    profile's probes alone). A report made before pairs were recorded has none."""
    found: dict[str, list[Pair]] = {}
    for index, sample in enumerate(report.get("samples", [])):
        base = sample.get("base")
        if base is None:
            continue
        pairs = found.setdefault(sample.get("family", PROFILE), [])
        metrics = _disagree(sample, base)
        if metrics:
            pairs.append(Pair(index, sample, base, metrics))
    families = report.get("families") or {PROFILE: {"metrics": report.get("metrics", {})}}
    return [FamilyPairs(name, pairs[:MAX_PAIRS], len(pairs),
                        (families.get(name) or {}).get("metrics", {}).get("comparison"))
            for name, pairs in found.items()]


def image_record(report: dict, index: int, side: str) -> dict:
    """The sample of one side of a pair (the checkpoint's sample ``index``, or its base partner) with the pair's
    prompt, seed and family; 404 if the report has no such paired image."""
    samples = report.get("samples", [])
    if side not in SIDES or not 0 <= index < len(samples) or samples[index].get("base") is None:
        raise ApiError(404, "no_such_image", f"the audit has no paired image {index} ({side})", field="index")
    pair = samples[index]
    return {**(pair if side == "checkpoint" else pair["base"]), "prompt": pair["prompt"], "seed": pair["seed"],
            "family": pair.get("family", PROFILE)}


def _cached(cache_dir: Path, record: dict) -> Path | None:
    key = record.get("image_key")
    return cached_image_path(cache_dir, key) if isinstance(key, str) and _KEY.fullmatch(key) else None


def is_cached(cache_dir: Path, record: dict) -> bool:
    """Whether the render cache still holds the image (the retention sweep has not removed it)."""
    path = _cached(cache_dir, record)
    return path is not None and path.is_file()


def _read(cache_dir: Path, record: dict, retention_hours: int) -> tuple[bytes, Image.Image]:
    """The cached render's PNG and its image, checked to be the pixels the audit scored."""
    path = _cached(cache_dir, record)
    if path is None:
        raise ApiError(410, "image_gone", "the audit did not record where this image was cached (it predates "
                                          "recorded pairs); only the report's redacted grid shows it")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ApiError(410, "image_gone", f"the unredacted render is gone: the retention sweep removes the "
                                          f"auditor's cached renders after {retention_hours} h "
                                          "(render_cache_retention_hours); the report's redacted grid stays") from None
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image_sha256(image) != record.get("image_sha256"):
        raise ApiError(503, "image_mismatch", "the cached render is not the image the audit scored; not shown")
    return data, image


def unredacted_png(cache_dir: Path, record: dict, retention_hours: int) -> bytes:
    """The render exactly as the auditor cached it (for the logged action only)."""
    return _read(cache_dir, record, retention_hours)[0]


def shown_png(cache_dir: Path, record: dict, retention_hours: int) -> bytes:
    """The image as the page shows it by default: redacted when flagged, as rendered otherwise."""
    data, image = _read(cache_dir, record, retention_hours)
    if not flagged(record):
        return data
    out = io.BytesIO()
    as_shown(image, record).save(out, format="PNG")
    return out.getvalue()
