"""Sweeping the artifact store of files no row names.

A process killed between storing a file and committing the row that names it (``kill -9`` of a worker
just after its checkpoint or report landed in the store) leaves the file behind, and on a GPU the retried
job's checkpoint differs, so nothing ever names it; a put killed mid-stream leaves its temporary file.
The sweep removes both once they are older than a grace period far longer than any store-then-commit
window (milliseconds): a file whose row is about to commit is never touched, and a put of bytes already
stored refreshes the file's time for the same reason (``ArtifactStore.put``). Run by every reaper
(``gate.worker.reaper``); several sweeping at once is harmless. The renders kept for reviewers
(``PAIR_IMAGE_SUFFIX``), which no row names, are the retention sweep's to remove by age
(``gate.pipeline.retention``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import select, union
from sqlalchemy.orm import Session, sessionmaker

from .artifacts import PAIR_IMAGE_SUFFIX, Store
from .models import Artifact, Audit, Baseline, Dataset, JobEvent

log = logging.getLogger(__name__)

GRACE_S = 3600.0

Listing = list[tuple[str, float]]  # a store's files as ``stored_files()`` yields them: (name, modification time)


@dataclass(frozen=True)
class Swept:
    unreferenced: int
    partial: int


def referenced_keys(session: Session) -> set[str]:
    """Every store key a row names: checkpoints, audit reports (JSON and HTML), dataset uploads and prepared
    sets, job events' sample grids, base models' baselines (report and page)."""
    named = union(select(Artifact.path), select(Audit.report_path), select(Audit.html_path),
                  select(Dataset.artifact_path), select(Dataset.prepared_path), select(JobEvent.artifact_key),
                  select(Baseline.report_key), select(Baseline.html_key))
    return {key for key in session.scalars(named) if key}


def sweep(store: Store, sessions: sessionmaker[Session], grace_s: float = GRACE_S,
          listing: Listing | None = None) -> Swept:
    """Remove stored files no row names and temporary files, both older than ``grace_s`` seconds. ``listing``
    is ``store.stored_files()`` when the caller has already listed the store (a bucket listing is paid per
    request)."""
    cutoff = time.time() - grace_s  # taken before the keys: a file stored after the query is newer than it
    with sessions() as session:
        keys = referenced_keys(session)
    unreferenced = [(key, at) for key, at in (store.stored_files() if listing is None else listing)
                    if key not in keys and not key.endswith(PAIR_IMAGE_SUFFIX)]
    return Swept(_remove_older(store, unreferenced, cutoff, "no row names it"),
                 _remove_older(store, store.partial_files(), cutoff, "a put that never finished"))


def _remove_older(store: Store, files, cutoff: float, why: str) -> int:
    """Remove the ``(name, time)`` files last touched before ``cutoff``; how many."""
    removed = 0
    for name, at in files:
        if at >= cutoff:
            continue
        store.remove(name)
        removed += 1
        log.warning("swept %s: %s", name, why)
    return removed
