"""``/v1/datasets``: a customer uploads a zip; it is checked, re-encoded and scanned before any row exists.

A refused upload leaves no row and no file: the intake writes into a hidden partial folder it removes
on failure, and the row, the stored zip and the audit entry are committed together only afterwards;
if that commit fails the folder and a newly stored zip are removed again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import fields

from flask import Blueprint, g, request

from gate.auth import CUSTOMER, get_for_principal
from gate.intake import IntakeLimits, ingest
from gate.settings import Limits
from gate.storage.audit_log import record
from gate.storage.models import Dataset, new_id

from . import gate
from .auth import current_principal, login_required
from .dataset_reviews import dataset_detail
from .errors import ApiError
from .quotas import check_dataset_quota
from .serialize import dataset_json

log = logging.getLogger(__name__)

bp = Blueprint("datasets", __name__, url_prefix="/v1/datasets")
NAME_MAX_CHARS = 200
UPLOAD_SUFFIX = ".zip"
# The settings' limits that the intake applies too (same names, same meaning); the rest keep intake defaults.
SHARED_LIMITS = tuple(sorted({f.name for f in fields(Limits)} & {f.name for f in fields(IntakeLimits)}))


def intake_limits(limits: Limits) -> IntakeLimits:
    return IntakeLimits(**{name: getattr(limits, name) for name in SHARED_LIMITS})


@bp.post("")
@login_required(CUSTOMER)
def upload():
    principal, app = current_principal(), gate()
    file = request.files.get("file")
    if file is None:
        raise ApiError(400, "missing_file", "send the dataset zip as the multipart field 'file'", field="file")
    name = (request.form.get("name") or file.filename or "dataset")[:NAME_MAX_CHARS]
    dataset_id = new_id()
    folder = app.settings.dataset_folder(principal.tenant_id, dataset_id)
    stream = file.stream
    check_dataset_quota(g.db, principal.tenant_id, app.settings.limits, stream.seek(0, os.SEEK_END))
    stream.seek(0)
    result = ingest(stream, intake_limits(app.settings.limits), folder, app.scanner)
    stored_new = False
    try:
        stream.seek(0)
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
        stored_new = not app.store.exists(principal.tenant_id, digest, UPLOAD_SUFFIX)
        stream.seek(0)
        stored = app.store.put(principal.tenant_id, stream, suffix=UPLOAD_SUFFIX)
        row = Dataset(id=dataset_id, tenant_id=principal.tenant_id, name=name, status=result.status,
                      content_sha256=stored.sha256, artifact_path=stored.key, size_bytes=stored.size_bytes,
                      image_count=result.images, contamination_ratio=result.contamination)
        g.db.add(row)
        record(g.db, principal, row, "created", to_state=result.status,
               detail={"images": result.images, "unsafe_images": result.unsafe_images,
                       "flagged": list(result.flagged), "layout": result.layout,
                       "scanner": app.scanner.info()})
        g.db.commit()
    except BaseException:
        g.db.rollback()
        shutil.rmtree(folder, ignore_errors=True)
        if stored_new:
            app.store.delete(principal.tenant_id, app.store.key(principal.tenant_id, digest, UPLOAD_SUFFIX))
        raise
    log.info("dataset %s of %s %s: %d images, contamination %.3f", row.id, row.tenant_id, row.status,
             row.image_count, row.contamination_ratio)
    return {**dataset_json(row), "flagged_files": list(result.flagged)}, 201


@bp.get("/<dataset_id>")
@login_required()
def get(dataset_id: str):
    return dataset_detail(g.db, get_for_principal(g.db, Dataset, dataset_id, current_principal()))
