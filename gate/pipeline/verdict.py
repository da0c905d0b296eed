"""The verdict stage: the job's finished audit becomes its one verdict, and the job's final state.

pass -> ``released`` (downloadable), flag -> ``review`` (a reviewer decides), block -> ``withheld``. The
verdict row (unique per job) and the job's transition commit together, so a stage that runs twice
leaves one verdict. A job that fails in any stage ends ``failed``: no verdict, nothing released.
"""

from __future__ import annotations

import json
import logging

from sqlalchemy.exc import IntegrityError

from gate import metrics
from gate.api.redaction import customer_reason
from gate.storage.audit_log import SYSTEM, IllegalTransition, StaleState, transition
from gate.storage.models import Job, Verdict, utcnow

from . import webhooks
from .audit import finished_audit
from .runtime import Runtime

log = logging.getLogger(__name__)

OUTCOME = {"pass": "released", "flag": "review", "block": "withheld"}
ERROR_MAX_CHARS = 2_000


def decide(rt: Runtime, job_id: str) -> str | None:
    """Record the verdict; returns the job's new state, or None if there was nothing to decide."""
    with metrics.stage("decide"), rt.sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"no job {job_id}")
        if job.status != "auditing":
            return None
        audit = finished_audit(session, job_id)
        if audit is None:
            log.info("job %s has no finished audit yet", job_id)
            return None
        report = json.loads(rt.store.path(job.tenant_id, audit.report_path).read_text())
        policy = report["verdict"]["policy"]
        session.add(Verdict(tenant_id=job.tenant_id, job_id=job_id, audit_id=audit.id, decision=audit.decision,
                            reasons=audit.reasons, policy_name=policy["name"], policy_version=policy["version"]))
        to_state = OUTCOME[audit.decision]
        try:
            transition(session, job, to_state, SYSTEM, reason="; ".join(audit.reasons),
                       detail={"verdict": audit.decision, "audit": audit.id, "rule": report["verdict"]["rule"]},
                       changes={"worker": None, "lease_expires_at": None, "stage": None, "progress": 1.0,
                                "finished_at": utcnow()})
            session.commit()
        except (StaleState, IntegrityError):
            session.rollback()
            log.info("job %s was decided by another worker", job_id)
            return None
        # What a customer may read of the verdict, as GET /v1/jobs/<id> shows it (gate.api.serialize.verdict_json).
        webhooks.announce(rt, job.tenant_id, job_id, "verdict",
                          {"decision": audit.decision, "reasons": [customer_reason(r) for r in audit.reasons],
                           "policy": f"{policy['name']} v{policy['version']}"})
        webhooks.announce(rt, job.tenant_id, job_id, "stage", {"status": to_state})
    log.info("job %s: verdict %s -> %s", job_id, audit.decision, to_state)
    return to_state


def fail(rt: Runtime, job_id: str, worker: str, error: str) -> bool:
    """Mark the job ``failed`` after an error in ``worker``'s stage, unless the job has moved on since
    (another worker holds it now, or it reached a final state)."""
    with rt.sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            return False
        try:
            transition(session, job, "failed", SYSTEM, reason=error[:ERROR_MAX_CHARS],
                       where=(Job.worker.is_(None) | (Job.worker == worker)),
                       changes={"worker": None, "lease_expires_at": None, "error": error[:ERROR_MAX_CHARS],
                                "finished_at": utcnow()})
            session.commit()
        except (IllegalTransition, StaleState):
            session.rollback()
            return False
        webhooks.announce(rt, job.tenant_id, job_id, "stage", {"status": "failed"})
    log.error("job %s failed: %s", job_id, error)
    return True
