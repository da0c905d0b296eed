"""The retention sweep: what jobs leave on the workers' disk is removed once it is old enough.

A job's scratch folder (``settings.jobs_dir/<job>``: each attempt's training outputs, with the intermediate
checkpoints no audit ever looked at, and the audit's files) matters only while the job runs: by then the
checkpoint and reports that count are in the artifact store. A failed job's resumable training state is kept
longer, since an operator who queues the job again resumes from it. The render cache holds the auditor's
unredacted images and is kept shortest, and so are the renders of discordant pairs that audits put in the
artifact store for reviewers (``gate.pipeline.pair_images``), unredacted too. Ages are file modification times
(an object's last write in a bucket), file by file, so whatever was written recently stays; the folder of a job
still running (``ACTIVE_JOB_STATES``) is not touched, whatever its age. Expired reviewer-page sessions are
deleted too, and so are webhook deliveries settled (``delivered`` or ``abandoned``) more than
``webhook_retention_hours`` after they were owed, with their delivery log; a pending one is never deleted.
Run by every reaper beside the artifact store's sweep (``gate.storage.sweep``); several at once are harmless.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session, sessionmaker

from gate.settings import Settings
from gate.storage.artifacts import PAIR_IMAGE_SUFFIX, Store
from gate.storage.models import ACTIVE_JOB_STATES, Job, WebhookDelivery, WebhookOutbox, WebSession, utcnow
from gate.storage.sweep import Listing

from .train import TRAINING_STATE

log = logging.getLogger(__name__)

HOUR_S = 3600
SETTLED_WEBHOOKS = ("delivered", "abandoned")  # nothing more will be attempted; ``pending`` ones are owed


@dataclass(frozen=True)
class Removed:
    scratch_files: int
    training_state_files: int
    render_cache_files: int
    sessions: int
    pair_images: int = 0
    webhooks: int = 0
    webhook_deliveries: int = 0


def sweep_retention(settings: Settings, sessions: sessionmaker[Session], store: Store,
                    listing: Listing | None = None) -> Removed:
    """Remove job files, cached renders and the pairs' renders in ``store`` older than their retention settings,
    expired sessions, and settled webhook deliveries past theirs. ``listing`` is ``store.stored_files()`` when
    the caller has already listed the store."""
    now = time.time()
    with sessions() as session:
        # Read before the folders are listed: a job created meanwhile has only new files, which stay.
        active = set(session.scalars(select(Job.id).where(Job.status.in_(ACTIVE_JOB_STATES))))
        expired = session.execute(delete(WebSession).where(WebSession.expires_at <= utcnow())).rowcount
        webhooks, deliveries = _settled_webhooks(session, utcnow() - timedelta(hours=settings.webhook_retention_hours))
        session.commit()
    scratch_cutoff = now - settings.scratch_retention_hours * HOUR_S
    state_cutoff = now - settings.training_state_retention_hours * HOUR_S
    scratch = state = 0
    for folder in _folders(settings.jobs_dir):
        if folder.name in active:
            continue
        state_folder = folder / TRAINING_STATE
        for path in _remove_older(folder, lambda p: state_cutoff if p.is_relative_to(state_folder) else scratch_cutoff):
            if path.is_relative_to(state_folder):
                state += 1
            else:
                scratch += 1
    render_cutoff = now - settings.render_cache_retention_hours * HOUR_S
    cache = len(_remove_older(settings.render_cache_dir, lambda p: render_cutoff))
    pairs = 0
    for name, at in store.stored_files() if listing is None else listing:
        if name.endswith(PAIR_IMAGE_SUFFIX) and at < render_cutoff:
            store.remove(name)
            pairs += 1
    removed = Removed(scratch, state, cache, expired, pairs, webhooks, deliveries)
    if any(vars(removed).values()):
        log.info("retention sweep removed %s", removed)
    return removed


def _settled_webhooks(session: Session, before) -> tuple[int, int]:
    """Delete the outbox rows settled and owed before ``before``, and their deliveries' log (uncommitted): how
    many of each. A settled row never changes again, so no attempt races this."""
    old = (WebhookOutbox.state.in_(SETTLED_WEBHOOKS), WebhookOutbox.created_at < before)
    deliveries = session.execute(delete(WebhookDelivery).where(exists().where(
        WebhookOutbox.job_id == WebhookDelivery.job_id, WebhookOutbox.event_seq == WebhookDelivery.event_seq,
        *old))).rowcount
    return session.execute(delete(WebhookOutbox).where(*old)).rowcount, deliveries


def _folders(path: Path) -> list[Path]:
    try:
        return [child for child in path.iterdir() if child.is_dir() and not child.is_symlink()]
    except FileNotFoundError:
        return []


def _remove_older(root: Path, cutoff_of: Callable[[Path], float]) -> list[Path]:
    """Remove the files under ``root`` last modified before ``cutoff_of(file)``, then the folders left empty
    (``root`` too); the files removed. Links are removed as files, never followed."""
    removed = []
    for folder, subfolders, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder, name)
            try:
                if path.lstat().st_mtime < cutoff_of(path):
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:  # another sweeper got there first
                continue
        for name in subfolders:
            _remove_if_empty(Path(folder, name))
    _remove_if_empty(root)
    return removed


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (or gone, or a link): leave it
        pass
