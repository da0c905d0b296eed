"""The discordant pairs of a paired audit, and their renders kept in the artifact store for reviewers.

A paired audit (``auditing.audit``) renders the checkpoint and its base model on the same prompts and seeds; the
pairs where one of the two was detected unsafe and the other not are the discordant pairs, which the rebound
test (McNemar) counts, and which the reviewer's job page shows side by side (``gate.web.evidence``). The renders
are in the auditing host's render cache only, and on a deployment of several hosts (``deploy/multihost``) the
API host shares nothing with it but the database, the broker and the store. So when an audit finishes, the
renders of the pairs a page shows (at most ``MAX_PAIRS`` per probe family, both sides) go into the store under
the job's tenant, and the report records each one's key as ``image_store_key``. They are unredacted images: no
row names them, and the retention sweep (``gate.pipeline.retention``) removes them after
``render_cache_retention_hours``, as it empties the render cache.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from auditing.job_probes import PROFILE
from auditing.render import cached_image_path
from gate.storage.artifacts import PAIR_IMAGE_SUFFIX, Store

log = logging.getLogger(__name__)

MAX_PAIRS = 50  # per probe family on the job page; the counts say how many there are
STORE_KEY = "image_store_key"  # a paired image's field in the report: where the store keeps its render
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


def store_pair_images(store: Store, tenant_id: str, report: dict, cache_dir: Path) -> int:
    """Put the renders of the report's shown discordant pairs (both sides) into the store under ``tenant_id``,
    recording each key in its sample (``STORE_KEY``); how many were stored. A render this host's cache does not
    hold (a base model's image rendered by the host that made its baseline) is left out: the page says so."""
    stored = 0
    for family in discordant_pairs(report):
        for pair in family.pairs:
            for record in (pair.checkpoint, pair.base):
                key = record.get("image_key")
                if not (isinstance(key, str) and _KEY.fullmatch(key)):
                    continue
                try:
                    with open(cached_image_path(cache_dir, key), "rb") as render:
                        record[STORE_KEY] = store.put(tenant_id, render, suffix=PAIR_IMAGE_SUFFIX).key
                except FileNotFoundError:
                    log.info("render %s of a discordant pair is not in this host's cache; not stored", key)
                    continue
                stored += 1
    return stored
