"""``/v1/datasets``: a customer uploads a zip; it is stored and its intake is left to a worker.

The request does only what is cheap and must be answered at once: the upload's size and the tenant's quotas.
The zip goes into the tenant's content-addressed store and the row is committed ``received`` with its audit
entry (a newly stored zip is removed again if that commit fails); the intake (archive checks, re-encoding,
scans: ``gate.pipeline.intake``) is dispatched and the answer is 202. The client follows
``GET /v1/datasets/<id>`` until the status is ``accepted``, ``flagged``, ``rejected`` or ``failed``; a customer
reads the intake's decision and figures, not which detectors screened the data (``gate.api.redaction``). A dispatch the
broker refuses strands nothing: the row's dispatch is recorded, and the reaper sends it again.
"""

from __future__ import annotations

import hashlib
import logging

from flask import Blueprint, g, request

from gate.auth import CUSTOMER, get_for_principal
from gate.intake.archive import open_upload
from gate.pipeline.intake import PREPARED_SUFFIX, intake_limits
from gate.service.quotas import check_dataset_quota
from gate.storage.audit_log import record
from gate.storage.models import Dataset

from . import gate
from .auth import current_principal, login_required
from .dataset_reviews import dataset_detail
from .errors import ApiError

log = logging.getLogger(__name__)

bp = Blueprint("datasets", __name__, url_prefix="/v1/datasets")
NAME_MAX_CHARS = 200
UPLOAD_SUFFIX = PREPARED_SUFFIX  # both are zips; their contents, hence their keys, differ


@bp.post("")
@login_required(CUSTOMER)
def upload():
    principal, app = current_principal(), gate()
    file = request.files.get("file")
    if file is None:
        raise ApiError(400, "missing_file", "send the dataset zip as the multipart field 'file'", field="file")
    name = (request.form.get("name") or file.filename or "dataset")[:NAME_MAX_CHARS]
    limits = app.settings.limits
    with open_upload(file.stream, intake_limits(limits)) as (stream, size):  # a 413 too_large past the limit
        check_dataset_quota(g.db, principal.tenant_id, limits, size)
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
        stored_new = not app.store.exists(principal.tenant_id, digest, UPLOAD_SUFFIX)
        stream.seek(0)
        stored = app.store.put(principal.tenant_id, stream, suffix=UPLOAD_SUFFIX, max_bytes=limits.max_upload_bytes)
    try:
        row = Dataset(tenant_id=principal.tenant_id, name=name, status="received", content_sha256=stored.sha256,
                      artifact_path=stored.key, size_bytes=stored.size_bytes)
        g.db.add(row)
        record(g.db, principal, row, "created", to_state="received",
               detail={"size_bytes": stored.size_bytes, "content_sha256": stored.sha256})
        g.db.commit()
    except BaseException:
        g.db.rollback()
        if stored_new:
            app.store.delete(principal.tenant_id, stored.key)
        raise
    try:
        app.dispatcher.dataset(row.id)
    except Exception:  # the broker is away: the reaper dispatches a received dataset whose dispatch is overdue
        log.exception("dataset %s: its intake could not be dispatched; the reaper will send it again", row.id)
    log.info("dataset %s of %s received: %d bytes", row.id, row.tenant_id, row.size_bytes)
    g.db.refresh(row)  # as it stands now: ``received``, unless a worker was quicker than this answer
    return dataset_detail(g.db, row, staff=False), 202, {"Location": f"/v1/datasets/{row.id}"}


@bp.get("/<dataset_id>")
@login_required()
def get(dataset_id: str):
    principal = current_principal()
    return dataset_detail(g.db, get_for_principal(g.db, Dataset, dataset_id, principal), principal.cross_tenant)
