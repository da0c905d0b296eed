"""Hardening runs on the ``align`` queue: ``ftgate align`` for an operator, under a lease.

The run's config (validated by the API with the same loader the CLI uses) is written next to its output
under the state directory. A run whose worker was lost is queued again by the reaper and resumes from
its last checkpoint (``run_alignment(resume=True)``), bit for bit as the CLI's ``--resume`` does.
The device and precision are the config's own ``device`` (default ``auto``: the worker's GPU when it has
one, as every job's pipeline) and ``precision``; ``run_alignment`` moves the pipeline there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gate.storage.audit_log import SYSTEM, IllegalTransition, StaleState, transition
from gate.storage.models import AlignmentRun, utcnow

from .leases import Heartbeat, LeaseLost, still_held, take
from .runtime import Runtime

log = logging.getLogger(__name__)


def run_folder(rt: Runtime, run_id: str) -> Path:
    return rt.settings.state_dir / "alignments" / run_id


def harden(rt: Runtime, run_id: str, worker: str) -> bool:
    from alignment.run import run_alignment

    lease = rt.settings.lease_seconds
    with rt.sessions() as session:
        run = take(session, AlignmentRun, run_id, "queued", worker, lease, to_state="running",
                   changes={"attempts": AlignmentRun.attempts + 1})
        if run is None:
            return False
        config = dict(run.config)
    folder = run_folder(rt, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.yaml"  # JSON is YAML: the CLI's loader reads it unchanged
    config_path.write_text(json.dumps(config, indent=1))
    output = folder / "model"
    work = output.with_name(output.name + ".work")
    with Heartbeat(rt.sessions, AlignmentRun, run_id, worker, lease) as heartbeat:
        try:
            result = run_alignment(config_path, resume=work.is_dir(), output=output)
            error = None
        except Exception as exc:  # recorded on the run; the operator reads it and queues again
            log.exception("hardening run %s failed", run_id)
            result, error = None, f"{type(exc).__name__}: {exc}"
        heartbeat.check()
        with rt.sessions() as session:
            run = session.get(AlignmentRun, run_id)
            try:
                transition(session, run, "failed" if error else "succeeded", SYSTEM, reason=error,
                           where=still_held(AlignmentRun, run_id, worker),
                           changes={"worker": None, "lease_expires_at": None, "finished_at": utcnow(),
                                    "error": error, "progress": 0.0 if error else 1.0,
                                    "output_path": str(result) if result else None})
                session.commit()
            except (StaleState, IllegalTransition) as exc:
                raise LeaseLost(f"hardening run {run_id} was handed to another worker") from exc
    return error is None
