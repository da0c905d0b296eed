"""What a reviewer judges a paired audit on: its discordant pairs (``gate.pipeline.pair_images``), and their images.

The report records each image's render-cache key and pixel hash, and for a paired image its base model's image
and results, so the pages can show both sides. By default an image is shown as the report shows it
(``auditing.report.as_shown``: redacted when either detector flagged it); the unredacted render is read from the
artifact store, where the audit put the renders of the pairs a page shows (``store_pair_images``, key
``image_store_key`` in the report), so any host that shares the store serves them, whatever its own render cache
holds. It is served only behind a reviewer's explicit, logged action (``gate.web.views``). The retention sweep
removes those renders after ``render_cache_retention_hours``; a removed image is a 410 saying so, never a 500,
and a render whose bytes or pixels are not the ones the audit scored is refused (503).
"""

from __future__ import annotations

import io

from PIL import Image

from auditing.audit import image_sha256
from auditing.job_probes import PROFILE
from auditing.report import as_shown, flagged
from gate.api.errors import ApiError
from gate.pipeline.pair_images import STORE_KEY
from gate.storage.artifacts import PAIR_IMAGE_SUFFIX, CorruptArtifact, Store

SIDES = ("base", "checkpoint")
UNREDACTED_VIEW = "unredacted image viewed"  # the audit-log action, on the audit whose image was shown


def image_record(report: dict, index: int, side: str) -> dict:
    """The sample of one side of a pair (the checkpoint's sample ``index``, or its base partner) with the pair's
    prompt, seed and family; 404 if the report has no such paired image."""
    samples = report.get("samples", [])
    if side not in SIDES or not 0 <= index < len(samples) or samples[index].get("base") is None:
        raise ApiError(404, "no_such_image", f"the audit has no paired image {index} ({side})", field="index")
    pair = samples[index]
    return {**(pair if side == "checkpoint" else pair["base"]), "prompt": pair["prompt"], "seed": pair["seed"],
            "family": pair.get("family", PROFILE)}


def _store_key(store: Store, tenant_id: str, record: dict) -> str | None:
    """The store key the report recorded for the image, if it is one of the job's tenant's pair images (never a
    key of the report's choosing elsewhere)."""
    key = record.get(STORE_KEY)
    if not isinstance(key, str) or not key.endswith(PAIR_IMAGE_SUFFIX):
        return None
    try:
        return store.checked(tenant_id, key)
    except ValueError:
        return None


def is_stored(store: Store, tenant_id: str, record: dict) -> bool:
    """Whether the store still holds the image (the retention sweep has not removed it)."""
    key = _store_key(store, tenant_id, record)
    return key is not None and store.exists(tenant_id, store.digest_of(key), PAIR_IMAGE_SUFFIX)


def _read(store: Store, tenant_id: str, record: dict, retention_hours: int) -> tuple[bytes, Image.Image]:
    """The stored render's PNG and its image, checked to be the bytes stored and the pixels the audit scored."""
    key = _store_key(store, tenant_id, record)
    if key is None:
        raise ApiError(410, "image_gone", "the audit did not store this image (it predates stored pairs, or the "
                                          "render was not on the auditing host); only the report's redacted grid "
                                          "shows it")
    try:
        data = store.read(tenant_id, key)
    except FileNotFoundError:
        raise ApiError(410, "image_gone", f"the unredacted render is gone: the retention sweep removes the "
                                          f"renders kept for reviewers after {retention_hours} h "
                                          "(render_cache_retention_hours); the report's redacted grid stays") from None
    except CorruptArtifact:
        raise ApiError(503, "image_mismatch", "the stored render is not the file the audit stored; not shown") from None
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image_sha256(image) != record.get("image_sha256"):
        raise ApiError(503, "image_mismatch", "the stored render is not the image the audit scored; not shown")
    return data, image


def unredacted_png(store: Store, tenant_id: str, record: dict, retention_hours: int) -> bytes:
    """The render exactly as the auditor stored it (for the logged action only)."""
    return _read(store, tenant_id, record, retention_hours)[0]


def shown_png(store: Store, tenant_id: str, record: dict, retention_hours: int) -> bytes:
    """The image as the page shows it by default: redacted when flagged, as rendered otherwise."""
    data, image = _read(store, tenant_id, record, retention_hours)
    if not flagged(record):
        return data
    out = io.BytesIO()
    as_shown(image, record).save(out, format="PNG")
    return out.getvalue()
