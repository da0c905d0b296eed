"""The reaper: hands jobs and hardening runs whose lease expired back to the queues, dispatches again those
whose message no worker started within the dispatch grace (``gate.pipeline.leases``), sends held jobs whose
tenant has a free dispatch slot (``gate.pipeline.fairness``), and now and then sweeps the artifact store of files
no row names (``gate.storage.sweep``).

It runs as its own small process beside each worker (``ftgate worker`` starts one; ``ftgate reaper`` runs
one alone), not as a thread in the worker: the prefork pool forks job processes from the worker's main
process, and a fork taken while another thread holds a lock leaves that lock held forever in the child.
Several reapers are harmless: each expiry is handed back by a compare-and-set, so exactly one wins.
"""

from __future__ import annotations

import logging
import os
import time

from gate.pipeline.fairness import dispatch_waiting
from gate.pipeline.intake import recover
from gate.pipeline.leases import reap, reconcile
from gate.pipeline.retention import sweep_retention
from gate.pipeline.runtime import Runtime
from gate.pipeline.webhooks import deliver_due
from gate.settings import Settings
from gate.storage.sweep import GRACE_S, sweep

log = logging.getLogger(__name__)


def sweep_store(rt: Runtime) -> None:
    """The artifact store's sweep and the retention sweep, on one listing of the store."""
    listing = list(rt.store.stored_files())
    sweep(rt.store, rt.sessions, listing=listing)
    sweep_retention(rt.settings, rt.sessions, rt.store, listing=listing)


def run_reaper(settings: Settings, parent_pid: int | None = None) -> None:
    """Reap and reconcile every third of a lease, and sweep the artifact store once per sweep grace period, until
    stopped; with ``parent_pid``, stop when that process is gone."""
    from .app import make_celery
    from .dispatch import CeleryDispatcher

    dispatcher = CeleryDispatcher(make_celery(settings))
    rt = Runtime.open(settings)
    interval = max(settings.lease_seconds / 3, 1.0)

    def requeue(kind: str, row_id: str, stage: str) -> None:
        if kind == "job":
            dispatcher.job(row_id, stage)
        else:
            dispatcher.alignment(row_id)

    log.info("reaper: checking leases every %.1f s", interval)
    next_sweep = time.monotonic()
    while parent_pid is None or os.getppid() == parent_pid:
        try:
            reap(rt.sessions, requeue, settings.max_attempts, settings.tenant_dispatch_share)
            reconcile(rt.sessions, requeue, settings.dispatch_grace_seconds)
            with rt.sessions() as session:  # slots freed by jobs cancelled, or started while no dispatch followed
                dispatch_waiting(session, dispatcher.job, settings.tenant_dispatch_share)
            recover(rt.sessions, dispatcher.dataset, settings.dispatch_grace_seconds, settings.max_attempts)
            if time.monotonic() >= next_sweep:
                sweep_store(rt)
                next_sweep = time.monotonic() + GRACE_S
            deliver_due(rt.sessions, settings)  # webhook attempts that are due, whichever process owed them
        except Exception:  # the database or broker is briefly away: try again next round
            log.exception("reaper pass failed; retrying")
        time.sleep(interval)
