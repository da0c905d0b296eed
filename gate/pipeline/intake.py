"""The intake stage: a received upload checked, re-encoded and scanned on a worker, never in the request.

An upload is committed ``received`` with its zip in the tenant's store; this stage takes the row by
compare-and-set with a lease (``gate.pipeline.leases``), reads the zip from the store, ingests it into a scratch
folder (``gate.intake.ingest``: archive checks, bounded re-encoding, NudeNet), screens the result with the
detector of every registered base model's audit profile as well (the concept that model was hardened against:
the shapes world's for the world, NudeNet for real weights), stores the prepared set as a zip in the store and
records, in one transaction with its status, the figures per detector; the strictest detector decides. The same
stage screens an ``accepted`` dataset that a job's base model needs screened with a detector it never saw
(status ``screening``, set at job creation by ``gate.service.datasets``).

A customer's bad upload ends ``rejected``; a fault of the service (a scanner that cannot score, the store or the
broker away) is not the customer's: the row keeps its status, the lease is released and the stage is retried,
at most ``max_attempts`` times, then ``failed`` (an upload) or back to ``accepted`` without the screen (which a
job on that base model then asks for again). Nothing half-written survives: the scratch folder goes with the
stage, and a prepared zip whose row never committed is removed. Hosts share only the database and the store:
training and auditing read the prepared set through ``prepared_folder``, a local cache filled from the store.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from auditing.detectors.base import Detector
from gate.intake import RECORD, IntakeError, IntakeLimits, Screening, ingest, screen, strictest
from gate.intake.scan import STRICTNESS
from gate.settings import Limits
from gate.storage.audit_log import SYSTEM, IllegalTransition, StaleState, record, transition
from gate.storage.clock import db_time
from gate.storage.models import BaseModel, Dataset

from .leases import Heartbeat, LeaseLost, still_held, take
from .profile import AuditProfile
from .runtime import Runtime

log = logging.getLogger(__name__)

INTAKE_STATES = ("received", "screening")  # what waits for this stage
INTAKE_SCANNER = ("nudenet", {})  # every upload's scanner, whatever base models exist
PREPARED_SUFFIX = ".zip"
RETRY = "retry"  # what ``run`` returns when a fault of the service left the row for another attempt
FAULT_BACKOFF_S = 30  # before a faulted attempt is tried again (its dispatch is recorded: the reaper is the net)
ERROR_MAX_CHARS = 2000
# The settings' limits that the intake applies too (same names, same meaning); the rest keep intake defaults.
SHARED_LIMITS = tuple(sorted({f.name for f in fields(Limits)} & {f.name for f in fields(IntakeLimits)}))
_PROFILE_DEFAULTS = {f.name: f.default for f in fields(AuditProfile)}

DetectorLoader = Callable[..., Detector]  # ``load_detector(name, **options)``


def intake_limits(limits: Limits) -> IntakeLimits:
    return IntakeLimits(**{name: getattr(limits, name) for name in SHARED_LIMITS})


def detector_key(name: str, options: dict) -> str:
    """How a detector's figures are keyed on a dataset: its name, and its options when it has any."""
    return name if not options else f"{name}:{json.dumps(options, sort_keys=True, separators=(',', ':'))}"


def profile_detector(base_model: BaseModel) -> tuple[str, dict]:
    """The detector a base model's checkpoints are audited with (its profile's; the profile's default without)."""
    profile = base_model.audit_profile or {}
    return profile.get("detector", _PROFILE_DEFAULTS["detector"]), dict(profile.get("detector_options") or {})


def required_detectors(session: Session) -> dict[str, tuple[str, dict]]:
    """NudeNet and every registered base model's detector, by ``detector_key``."""
    wanted = {detector_key(*INTAKE_SCANNER): INTAKE_SCANNER}
    for base_model in session.scalars(select(BaseModel)):
        name, options = profile_detector(base_model)
        wanted[detector_key(name, options)] = (name, options)
    return wanted


def screened(dataset: Dataset) -> dict[str, dict]:
    """The dataset's figures per detector so far."""
    return dict((dataset.intake or {}).get("scans", {}))


def _load_detector(name: str, **options) -> Detector:
    from auditing.detectors.registry import load_detector

    return load_detector(name, **options)


def _summary(scans: dict[str, dict], base: dict) -> dict:
    """The dataset's figures: ``base`` (layout, images) and the per-detector ``scans``, with the deciding
    (strictest, then most contaminated) detector's figures on top and every detector's flagged files."""
    deciding = max(scans.values(), key=lambda s: (STRICTNESS.index(s["status"]), s["contamination"]))
    flagged = sorted({name for s in scans.values() for name in s["flagged"]})
    return {**base, "scans": scans, "scanner": deciding["scanner"], "unsafe_images": deciding["unsafe_images"],
            "contamination": deciding["contamination"], "flagged": flagged}


def _zip_folder(folder: Path, out: Path) -> None:
    """The prepared caption folder as one stored (uncompressed: PNGs are compressed already) zip."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.iterdir()):
            zf.writestr(zipfile.ZipInfo(path.name, date_time=(1980, 1, 1, 0, 0, 0)), path.read_bytes())


def prepared_folder(rt: Runtime, tenant_id: str, dataset_id: str, key: str | None) -> Path:
    """The dataset's prepared caption folder on this host: the local cache, filled from the store (checked
    against the key's sha256) when absent, so a host that did not run the intake needs no shared filesystem."""
    folder = rt.settings.dataset_folder(tenant_id, dataset_id)
    if folder.is_dir():
        return folder
    if key is None:
        raise LookupError(f"dataset {dataset_id} has no prepared set in the store")
    if not rt.store.verify(tenant_id, key):
        raise RuntimeError(f"the stored prepared set {key} of dataset {dataset_id} does not match its sha256")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.partial-{secrets.token_hex(8)}"
    staging.mkdir()
    try:
        with zipfile.ZipFile(rt.store.path(tenant_id, key)) as zf:
            for info in zf.infolist():
                if "/" in info.filename or "\\" in info.filename or info.filename.startswith("."):
                    raise RuntimeError(f"the stored prepared set {key} holds an unexpected member {info.filename!r}")
                (staging / info.filename).write_bytes(zf.read(info))
        os.replace(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if folder.is_dir():  # another process on this host materialised it first
            return folder
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("dataset %s materialised from the store into %s", dataset_id, folder)
    return folder


def run(rt: Runtime, dataset_id: str, worker: str, load: DetectorLoader = _load_detector) -> str | None:
    """Run the intake stage on a ``received`` or ``screening`` dataset: its new status, ``RETRY`` when a fault of
    the service left it for another attempt, or None when it is not (or no longer) this worker's to do."""
    lease = rt.settings.lease_seconds
    with rt.sessions() as session:
        row = session.get(Dataset, dataset_id)
        if row is None:
            raise LookupError(f"no dataset {dataset_id}")
        status = row.status
        if status not in INTAKE_STATES:
            log.info("dataset %s is %s: no intake to do", dataset_id, status)
            return None
        taken = take(session, Dataset, dataset_id, status, worker, lease, changes={"attempts": Dataset.attempts + 1})
        if taken is None:
            return None
        session.refresh(row)
        tenant, upload_key, prepared_key, done = row.tenant_id, row.artifact_path, row.prepared_path, screened(row)
        base = {k: v for k, v in (row.intake or {}).items() if k in ("layout", "images", "upload_bytes", "ignored")}
        wanted = {k: v for k, v in required_detectors(session).items() if k not in done}
    scratch = rt.settings.state_dir / "intake" / f"{dataset_id}-{secrets.token_hex(4)}"
    limits = intake_limits(rt.settings.limits)
    try:
        with Heartbeat(rt.sessions, Dataset, dataset_id, worker, lease) as heartbeat:
            try:
                if status == "received":
                    folder = scratch / "prepared"
                    base, scans = _ingest(rt.store.path(tenant, upload_key), folder, limits, wanted, load, heartbeat)
                else:
                    folder = prepared_folder(rt, tenant, dataset_id, prepared_key)
                    scans = _screen(folder, limits, wanted, load, heartbeat)
            except IntakeError as refused:
                heartbeat.check()
                refusal = {**base, "scans": done, "refusal": refused.as_dict()}
                return _finish(rt, dataset_id, worker, "rejected", refusal)
            # Only this run's scans decide: the earlier ones decided before, and a reviewer may have cleared them.
            decided = strictest(s.status for s in scans.values())
            summary = _summary(done | {key: s.as_dict() for key, s in scans.items()}, base)
            if decided == "rejected":
                refused = next(s for s in scans.values() if s.status == "rejected")
                summary["refusal"] = refused.refusal(limits).as_dict()
            elif status == "received":
                _zip_folder(folder, scratch / f"prepared{PREPARED_SUFFIX}")
                with open(scratch / f"prepared{PREPARED_SUFFIX}", "rb") as prepared:
                    prepared_key = rt.store.put(tenant, prepared, suffix=PREPARED_SUFFIX).key
            heartbeat.check()
            return _finish(rt, dataset_id, worker, decided, summary, prepared_key if decided != "rejected" else None)
    except LeaseLost:
        raise
    except Exception as exc:  # the service's fault: a scanner that cannot score, the store away, ...
        log.exception("intake of dataset %s failed on %s", dataset_id, worker)
        return _fault(rt, dataset_id, worker, status, f"{type(exc).__name__}: {exc}"[:ERROR_MAX_CHARS])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _ingest(upload: Path, folder: Path, limits: IntakeLimits, wanted: dict[str, tuple[str, dict]],
            load: DetectorLoader, heartbeat: Heartbeat) -> tuple[dict, dict[str, Screening]]:
    """Ingest with NudeNet, then screen with every other wanted detector; raises ``IntakeError`` when refused."""
    key = detector_key(*INTAKE_SCANNER)
    scanner = load(INTAKE_SCANNER[0], **INTAKE_SCANNER[1])
    result = ingest(upload, limits, folder, scanner)
    heartbeat.check()
    written = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    base = {"layout": result.layout, "images": result.images, "upload_bytes": written["upload_bytes"],
            "ignored": written["ignored"]}
    scans = {key: Screening(scanner.info(), result.status, result.images, result.unsafe_images, result.contamination,
                            result.flagged)}
    others = {k: v for k, v in wanted.items() if k != key}
    return base, scans | _screen(folder, limits, others, load, heartbeat)


def _screen(folder: Path, limits: IntakeLimits, wanted: dict[str, tuple[str, dict]], load: DetectorLoader,
            heartbeat: Heartbeat) -> dict[str, Screening]:
    scans = {}
    for key, (name, options) in wanted.items():
        scans[key] = screen(folder, load(name, **options), limits)
        heartbeat.check()
    return scans


def _finish(rt: Runtime, dataset_id: str, worker: str, status: str, summary: dict,
            prepared_key: str | None = None) -> str:
    """Record the stage's result with the status, while this worker holds the lease; else remove what it stored."""
    changes = {"worker": None, "lease_expires_at": None, "error": None, "intake": summary}
    if "contamination" in summary:
        changes |= {"image_count": summary["images"], "contamination_ratio": summary["contamination"]}
    if prepared_key is not None:
        changes["prepared_path"] = prepared_key
    with rt.sessions() as session:
        row = session.get(Dataset, dataset_id)
        new_prepared = prepared_key is not None and prepared_key != row.prepared_path
        try:
            transition(session, row, status, SYSTEM, where=still_held(Dataset, dataset_id, worker),
                       detail={k: summary[k] for k in ("images", "unsafe_images", "flagged", "scanner", "refusal")
                               if k in summary}, changes=changes)
            session.commit()
        except (StaleState, IllegalTransition) as exc:
            session.rollback()
            if new_prepared and session.scalars(select(Dataset.id).where(Dataset.prepared_path == prepared_key)
                                                ).first() is None:
                rt.store.delete(row.tenant_id, prepared_key)
            raise LeaseLost(f"dataset {dataset_id} moved on while this worker took it in") from exc
    log.info("dataset %s %s by %s", dataset_id, status, worker)
    return status


def _give_up(session: Session, row: Dataset, reason: str, where) -> str:
    """The last attempt failed: an upload ends ``failed``; a screening goes back to ``accepted`` without the
    screen (a job on that base model asks for it again). The caller commits."""
    to_state = "failed" if row.status == "received" else "accepted"
    transition(session, row, to_state, SYSTEM, reason=reason, where=where,
               changes={"worker": None, "lease_expires_at": None, "error": reason})
    return to_state


def _fault(rt: Runtime, dataset_id: str, worker: str, status: str, error: str) -> str:
    """Release the lease after a fault of the service; ``RETRY``, or the terminal status after the last attempt."""
    max_attempts = rt.settings.max_attempts
    held = still_held(Dataset, dataset_id, worker)
    with rt.sessions() as session:
        row = session.get(Dataset, dataset_id)
        try:
            if row.attempts >= max_attempts:
                outcome = _give_up(session, row, f"gave up after {row.attempts} attempts (max_attempts "
                                                 f"{max_attempts}); the last: {error}", held)
            else:
                result = session.execute(update(Dataset).where(held, Dataset.status == status).values(
                    worker=None, lease_expires_at=None, error=error, dispatched_at=db_time()))
                if result.rowcount != 1:
                    raise StaleState(dataset_id)
                record(session, SYSTEM, row, "intake fault", reason=error, detail={"attempt": row.attempts})
                outcome = RETRY
            session.commit()
        except StaleState as exc:
            session.rollback()
            raise LeaseLost(f"dataset {dataset_id} moved on while this worker took it in") from exc
    log.warning("dataset %s: %s after attempt %d (%s)", dataset_id, outcome, row.attempts, error)
    return outcome


def recover(sessions: sessionmaker[Session], requeue: Callable[[str], None], grace_seconds: int,
            max_attempts: int) -> int:
    """The reaper's part for datasets: a lease that expired (its worker died) is released, or the dataset given
    up at ``max_attempts``; a dataset that waits for this stage with nobody on it past ``grace_seconds`` of its
    dispatch (the message was lost, or never sent) is dispatched again. Returns how many were handed on."""
    again: list[str] = []
    with sessions() as session:
        expired = select(Dataset).where(Dataset.status.in_(INTAKE_STATES), Dataset.lease_expires_at < db_time())
        for row in session.scalars(expired).all():
            reason = f"lease of worker {row.worker} expired at {row.lease_expires_at.isoformat()}"
            unchanged = Dataset.lease_expires_at == row.lease_expires_at
            try:
                if row.attempts >= max_attempts:
                    _give_up(session, row, f"gave up after {row.attempts} attempts (max_attempts {max_attempts}); "
                                           f"the last: {reason}", unchanged)
                else:
                    result = session.execute(update(Dataset).where(Dataset.id == row.id, Dataset.status == row.status,
                                                                   unchanged)
                                             .values(worker=None, lease_expires_at=None, dispatched_at=db_time()))
                    if result.rowcount != 1:
                        raise StaleState(row.id)
                    record(session, SYSTEM, row, "lease expired", reason=reason)
                    again.append(row.id)
                session.commit()
            except StaleState:
                session.rollback()  # renewed meanwhile, or another reaper got there first
        overdue = session.scalars(update(Dataset).where(Dataset.status.in_(INTAKE_STATES),
                                                        Dataset.lease_expires_at.is_(None),
                                                        Dataset.dispatched_at < db_time(-grace_seconds))
                                  .values(dispatched_at=db_time()).returning(Dataset.id)).all()
        for row_id in overdue:
            record(session, SYSTEM, session.get(Dataset, row_id), "dispatched again",
                   reason=f"no worker started its intake within {grace_seconds} s of its dispatch")
            again.append(row_id)
        session.commit()
    for row_id in again:
        try:
            requeue(row_id)
        except Exception:  # the broker is away: dispatched_at stands, and the next round sends it again
            log.exception("could not dispatch the intake of dataset %s; the reaper will send it again", row_id)
    return len(again)
