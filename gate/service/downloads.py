"""What may leave the gate: a job's checkpoint, only when the job is ``released`` (its audit passed, or a reviewer
approved it) and the stored file still matches its sha256. Anything else - training, auditing, waiting for
review, withheld, failed - is refused, and a corrupt file is never sent (fail closed)."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from auditing.models.hashing import HashCache
from gate.storage.artifacts import Store
from gate.storage.models import Artifact, Job

from .errors import ApiError

log = logging.getLogger(__name__)


def releasable_checkpoint(session: Session, store: Store, job: Job, hashes: HashCache) -> tuple[Artifact, Path]:
    """The job's checkpoint row and its file, if it may be downloaded; else a 403 ``artifact_withheld``, or a 503
    ``artifact_corrupt`` when the file fails its hash check (``hashes`` spares re-reading an unchanged file)."""
    row = session.scalars(select(Artifact).where(Artifact.job_id == job.id)).one_or_none()
    if job.status != "released" or row is None:
        raise ApiError(403, "artifact_withheld", f"job {job.id} is {job.status}: its checkpoint is released only "
                                                 "after a passing audit or a reviewer's approval")
    if not store.verify(job.tenant_id, row.path, hashes):
        log.error("artifact %s of job %s fails its sha256 check; refusing to serve it", row.path, job.id)
        raise ApiError(503, "artifact_corrupt", "the stored checkpoint does not match its hash; an operator "
                                                "has been alerted")
    return row, store.path(job.tenant_id, row.path)
