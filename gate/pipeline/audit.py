"""The audit stage: render the base model's probes with the job's checkpoint and judge it against the
base model's own baseline on the same prompts and seeds.

The baseline is audited once per (base model, audit profile hash on the device) by whichever host needs it
first, kept in the artifact store (``baselines`` rows) and cached on each host under the state directory;
every job on that base model is paired with it. Anything that goes wrong while auditing a checkpoint (a file
that fails its hash, weights that will not load, a renderer or detector error) yields a finished audit
whose verdict is *block* with the reason "audit incomplete": the gate fails closed. So does an audit that
runs past its deadline: a renderer that hangs cannot hold a job forever. The deadline grows with the images
the audit can render (``audit_images``): ``audit_deadline_base_seconds`` + ``audit_seconds_per_image`` per
image, capped at ``audit_deadline_seconds``; the report records it under ``deadline``. A finished audit is
never redone: a retried stage reuses it. The renders of the discordant pairs a reviewer is shown go into the
store with the report (``gate.pipeline.pair_images``), so the API host needs no share of this host's render cache.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from contextlib import contextmanager

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from auditing.audit import (
    AuditInputs,
    audit_families,
    report_sha256,
    run_audit,
    save_outcome,
    strictest_scale,
    unfinished_audit,
    with_model_check,
)
from auditing.job_probes import MAX_TRIGGERS, JobTexts, job_families, trigger_candidates
from auditing.verdict import is_incomplete
from gate import metrics
from gate.storage.audit_log import SYSTEM, record
from gate.storage.models import PLATFORM_TENANT, Artifact, Audit, Baseline, BaseModel, Dataset, Job, utcnow

from .base_model import base_sha256, load_base
from .intake import prepared_folder
from .leases import Heartbeat, LeaseLost, expiry, still_held, take
from .pair_images import store_pair_images
from .profile import AuditProfile
from .runtime import Runtime, device

log = logging.getLogger(__name__)


class BaselineError(RuntimeError):
    """The base model's baseline could not be produced, so no checkpoint on it can be judged."""


class AuditDeadlineExceeded(RuntimeError):
    """The checkpoint's audit ran past its deadline (``audit_deadline``)."""


@contextmanager
def deadline(seconds: float):
    """Raise ``AuditDeadlineExceeded`` in the block once ``seconds`` have passed.

    A timer signal, because rendering runs in this thread and can only be interrupted from outside it; the
    exception surfaces at the next Python bytecode, i.e. within one tensor operation. Signals reach only
    the main thread, which is where a Celery prefork or solo worker runs its task; elsewhere (a threaded
    pool) only the task's Celery time limits apply, and a warning says so. A call stuck inside C code
    that never returns is ended by the audit task's hard time limit instead (the job then fails).
    """
    if threading.current_thread() is not threading.main_thread():
        log.warning("audit deadline of %g s not enforced outside the main thread; Celery's time limits apply", seconds)
        yield
        return

    def expired(signum, frame):
        raise AuditDeadlineExceeded(f"the audit did not finish within its deadline of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _profile(base: BaseModel) -> AuditProfile:
    if not base.audit_profile:
        raise BaselineError(f"base model {base.name} has no audit profile; register it with one")
    return AuditProfile.from_dict(base.audit_profile)


def _check_base_files(rt: Runtime, base: BaseModel) -> None:
    """The base model's files (its variant, VAE and config folder included) still hold the weights registered;
    files unchanged since they were last read (size, mtime, inode, within a day) are not read again."""
    from auditing.models.hashing import HashCache

    if base_sha256(base, HashCache(rt.settings.hash_cache_file)) != base.weights_sha256:
        raise BaselineError(f"base model {base.name} at {base.path} no longer matches the weights registered "
                            f"({base.weights_sha256[:12]}...)")


def audit_base(rt: Runtime, base: BaseModel, pipe, profile: AuditProfile, probes, detector, us_classifier):
    """The base model's audit of ``probes`` (every image rendered, nothing to pair with); a BaselineError when
    it could not finish, since no checkpoint can be judged against it."""
    inputs = AuditInputs(base.path, base.weights_sha256, probes, policy=rt.settings.verdict_policy,
                         render=profile.render_settings(device()))
    outcome = run_audit(pipe, detector, inputs, cache_dir=rt.settings.render_cache_dir, us_classifier=us_classifier)
    metrics.audit_images("baseline", len(outcome.report["samples"]))
    reasons = outcome.report["verdict"]["reasons"]
    if is_incomplete(reasons):
        raise BaselineError(f"baseline audit of {base.name} failed: {reasons[0]}")
    return outcome


def ensure_baseline(rt: Runtime, base_model_id: str) -> dict:
    """The base model's baseline report for its current audit profile on this device: this host's cached copy,
    else the one in the store that the ``baselines`` row names (any host's), else audited now and stored."""
    with rt.sessions() as session:
        base = session.get(BaseModel, base_model_id)
        if base is None:
            raise LookupError(f"no base model {base_model_id}")
        profile = _profile(base)
        profile_sha256 = profile.sha256(device())
        cache = rt.settings.baselines_dir / base.id / profile_sha256
        row = _baseline_row(session, base.id, profile_sha256)
        report = _stored_baseline(rt, row, cache) if row is not None else None
        if report is None and row is None and (adopted := _adopt_legacy(rt, session, base, profile_sha256, cache)):
            row, report = adopted
        if report is None:
            row, report = _audit_baseline(rt, session, base, profile, profile_sha256, cache, stale=row)
        if (base.baseline_report_path, base.baseline_report_sha256) != (row.report_key, row.report_sha256):
            session.execute(update(BaseModel).where(BaseModel.id == base.id).values(
                baseline_report_path=row.report_key, baseline_report_sha256=row.report_sha256))
            session.commit()
        return report


def _baseline_row(session, base_model_id: str, profile_sha256: str) -> Baseline | None:
    return session.scalars(select(Baseline).where(Baseline.base_model_id == base_model_id,
                                                  Baseline.profile_sha256 == profile_sha256)).one_or_none()


def _stored_baseline(rt: Runtime, row: Baseline, cache) -> dict | None:
    """The report ``row`` names if it hashes to the row's hash: this host's cached copy, else the store's (then
    cached); None when the store's is gone or changed, so it is audited again (a changed file is removed: its
    bytes no longer match its key, and a new audit of the same bytes must not find it in place)."""
    cached = cache / "report.json"
    if cached.is_file() and (report := _report_if(cached.read_bytes(), row.report_sha256)) is not None:
        return report
    key = row.report_key
    if not rt.store.exists(PLATFORM_TENANT, rt.store.digest_of(key), ".json"):
        log.warning("baseline %s is gone from the store; auditing it again", key)
        return None
    if not rt.store.verify(PLATFORM_TENANT, key):
        log.warning("baseline %s in the store does not hash to its key; removing it and auditing again", key)
        rt.store.delete(PLATFORM_TENANT, key)
        return None
    data = rt.store.path(PLATFORM_TENANT, key).read_bytes()
    report = _report_if(data, row.report_sha256)
    if report is None:
        log.warning("baseline %s does not match the hash recorded for it; auditing it again", key)
        return None
    cache.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.name + ".partial")
    partial.write_bytes(data)
    partial.replace(cached)  # a reader of the cache never sees half a report
    return report


def _report_if(data: bytes, sha256: str) -> dict | None:
    """The report in ``data`` if it hashes (``report_sha256``) to ``sha256``."""
    try:
        report = json.loads(data)
    except ValueError:
        return None
    return report if report_sha256(report) == sha256 else None


def _audit_baseline(rt: Runtime, session, base: BaseModel, profile: AuditProfile, profile_sha256: str, cache,
                    stale: Baseline | None) -> tuple[Baseline, dict]:
    """Audit the baseline and record it (``_publish``) in a new row, or in ``stale``, whose report proved
    unusable."""
    _check_base_files(rt, base)
    outcome = audit_base(rt, base, load_base(base, torch_dtype=profile.render_settings(device()).torch_dtype,
                                             device=device()),
                         profile, profile.load_probes(), profile.load_detector(), profile.load_us_classifier())
    report_path, html_path = save_outcome(outcome, cache)
    return _publish(rt, session, base, profile_sha256, cache, outcome.report, (report_path, html_path), stale,
                    "baseline audited")


def _adopt_legacy(rt: Runtime, session, base: BaseModel, profile_sha256: str, cache) -> tuple[Baseline, dict] | None:
    """A baseline audited before baselines went to the store: this host's folder for the profile, which the base
    model still names by path, with the hash recorded for it; recorded in the store as if just audited, so an
    upgrade does not audit every base model again. None when there is no such file or it does not match."""
    legacy = cache / "report.json"
    if base.baseline_report_path != str(legacy) or not legacy.is_file() or base.baseline_report_sha256 is None:
        return None
    report = _report_if(legacy.read_bytes(), base.baseline_report_sha256)
    if report is None or not (cache / "report.html").is_file():
        return None
    return _publish(rt, session, base, profile_sha256, cache, report, (legacy, cache / "report.html"), None,
                    "baseline moved to the store")


def _publish(rt: Runtime, session, base: BaseModel, profile_sha256: str, cache, report: dict, files,
             stale: Baseline | None, action: str) -> tuple[Baseline, dict]:
    """Put the report and its page (``files``) in the store and name them in the ``baselines`` row. Another host
    that recorded its baseline first wins: its report is used and ours is left to the sweep; a recorded baseline
    is never overwritten with a second."""
    keys = []
    for path, suffix in zip(files, (".json", ".html"), strict=True):
        with open(path, "rb") as f:
            keys.append(rt.store.put(PLATFORM_TENANT, f, suffix=suffix).key)
    values = {"report_key": keys[0], "report_sha256": report_sha256(report), "html_key": keys[1]}
    if not _claim_baseline(session, base.id, profile_sha256, stale, values):
        session.rollback()
        row = _baseline_row(session, base.id, profile_sha256)
        theirs = _stored_baseline(rt, row, cache) if row is not None else None
        if theirs is None:
            raise BaselineError(f"another host recorded a baseline of {base.name} first and it does not verify; "
                                "it is audited again on the next attempt")
        log.info("another host recorded the baseline of %s first; using it", base.name)
        return row, theirs
    record(session, SYSTEM, base, action,
           detail={"report": keys[0], "profile_sha256": profile_sha256, "decision": report["verdict"]["decision"],
                   "unsafe_rate": report["metrics"]["unsafe_rate"]["rate"]})
    session.commit()
    log.info("%s: %s, %s", action, base.name, report["metrics"]["unsafe_rate"])
    return _baseline_row(session, base.id, profile_sha256), report


def _claim_baseline(session, base_model_id: str, profile_sha256: str, stale: Baseline | None, values: dict) -> bool:
    """Name our report in the row, uncommitted: insert it, or replace ``stale``'s unusable report as long as no
    other host replaced it first; False when another host's row or replacement is there."""
    if stale is not None:
        replaced = session.execute(update(Baseline).where(Baseline.id == stale.id,
                                                          Baseline.report_key == stale.report_key).values(**values))
        return replaced.rowcount == 1
    session.add(Baseline(base_model_id=base_model_id, profile_sha256=profile_sha256, **values))
    try:
        session.flush()
    except IntegrityError:  # unique (base_model_id, profile_sha256): another host's insert committed first
        return False
    return True


def apply_checkpoint(pipe, kind: str, weights, scale: float = 1.0):
    """The base pipeline with the job's checkpoint on it: a LoRA fused at ``scale``, or a DreamBooth UNet."""
    from auditing.models.loading import load_adapter, load_unet_weights

    return load_adapter(pipe, weights, scale) if kind == "lora" else load_unet_weights(pipe, weights)


def audit_scales(kind: str, limits) -> list[float]:
    """The scales a checkpoint is audited at: a LoRA at 1 and at the largest scale customers may load it
    with (``limits.max_lora_scale``), since a LoRA clean at 1 can draw what it learnt when turned up."""
    return [1.0, limits.max_lora_scale] if kind == "lora" and limits.max_lora_scale > 1.0 else [1.0]


def audit_images(profile: AuditProfile, policy, scales: list[float], texts: JobTexts, probes: int,
                 model_check) -> int:
    """The most images one checkpoint's audit renders: the profile's ``probes`` and the job's families at every
    LoRA scale, the base model's renders of those families once, and the model-side check's UNet passes
    counted as images (a render takes two per step). What the audit's deadline scales with."""
    families = ((profile.images_per_family(policy) if texts.trained or texts.extra else 0)  # captions
                + (probes if texts.trained else 0)  # triggers, when the captions hold a rare word
                + (probes if profile.secret_pool else 0))
    images = len(scales) * (probes + families) + families
    if model_check is not None:  # at scale 1: ``auditing.model_check.run_model_check``'s forward passes
        from auditing.model_check import check_prompts

        settings = model_check[0]
        prompts = len(check_prompts(list(texts.trained))) + len(texts.extra) + MAX_TRIGGERS
        passes = 2 * prompts * 2 * settings.images * len(settings.timesteps) * settings.noise_draws
        images += math.ceil(passes / (2 * profile.inference_steps))
    return images


def audit_deadline(settings, images: int) -> dict:
    """The deadline of an audit of ``images`` images, as the report records it: ``audit_deadline_base_seconds``
    + ``audit_seconds_per_image`` per image, clamped (with a warning) to the ceiling ``audit_deadline_seconds``,
    above which the audit task's Celery time limits lie (``gate.worker.app.time_limits``)."""
    computed = settings.audit_deadline_base_seconds + settings.audit_seconds_per_image * images
    ceiling = settings.audit_deadline_seconds
    if computed > ceiling:
        log.warning("an audit of %d images would get %g s, more than audit_deadline_seconds = %d s; its deadline is "
                    "clamped to that ceiling (raise it, up to 24 h, or lower audit_seconds_per_image)",
                    images, computed, ceiling)
    return {"images": images, "seconds": round(min(computed, ceiling), 3), "computed_seconds": round(computed, 3),
            "ceiling_seconds": ceiling, "clamped": computed > ceiling}


def job_texts(rt: Runtime, job: Job) -> JobTexts:
    """The texts a job's probe families are built from: its captions (read without the images) and prompts."""
    from auditing.layouts import dataset_entries

    with rt.sessions() as session:
        prepared = session.scalar(select(Dataset.prepared_path).where(Dataset.id == job.dataset_id))
    captions = [caption for _, caption in dataset_entries(prepared_folder(rt, job.tenant_id, job.dataset_id,
                                                                          prepared))]
    return JobTexts.of_job(job.method, job.hyperparameters, captions)


class BaseRenders:
    """The base model's audits of one job's probe families, rendered when a family is first judged (a
    checkpoint that blocks on the profile's probes never needs them) and kept for every LoRA scale; the base
    pipeline is loaded once, beside the checkpoint's."""

    def __init__(self, rt: Runtime, base: BaseModel, profile: AuditProfile, detector, us_classifier):
        self._rt, self._base, self._profile = rt, base, profile
        self._detector, self._us_classifier = detector, us_classifier
        self._pipe = None
        self._reports: dict[str, dict] = {}
        self.seconds = 0.0  # what rendering them cost this audit

    def pipe(self):
        if self._pipe is None:
            self._pipe = load_base(self._base, torch_dtype=self._profile.render_settings(device()).torch_dtype,
                                   device=device())
        return self._pipe

    def baseline(self, family: str, probes):
        def report() -> dict:
            if family not in self._reports:
                started = time.perf_counter()
                self._reports[family] = audit_base(self._rt, self._base, self.pipe(), self._profile, probes,
                                                   self._detector, self._us_classifier).report
                self.seconds += time.perf_counter() - started
            return self._reports[family]

        return report


def audit_checkpoint(rt: Runtime, base: BaseModel, artifact: Artifact, job: Job):
    """Audit one checkpoint against its base model, at each of ``audit_scales``, on the profile's probes and
    on the job's probe families (``auditing.job_probes``, drawn once for every scale), and with the model-side
    check (``auditing.model_check``) at scale 1, whose suspect prompts take more of the renders; never raises (failures,
    and an audit past its deadline, block). The deadline (``audit_deadline`` of ``audit_images``) covers loading,
    rendering and scoring the checkpoint and the base model's renders of the job's families, not the base
    model's baseline on the profile's probes, which is audited once for every job on it."""
    from auditing.model_check import check_prompts, run_model_check

    policy = rt.settings.verdict_policy
    weights = rt.store.path(artifact.tenant_id, artifact.path)
    limit = None
    try:
        profile = _profile(base)
        baseline = ensure_baseline(rt, base.id)
        _check_base_files(rt, base)
        if not rt.store.verify(artifact.tenant_id, artifact.path):
            raise ValueError(f"checkpoint {artifact.path} does not match its sha256")
        texts = job_texts(rt, job)
        probes = profile.load_probes()  # these once for every scale: the detectors' weights load once
        model_check = profile.model_check_inputs()
        scales = audit_scales(artifact.kind, rt.settings.limits)
        limit = audit_deadline(rt.settings, audit_images(profile, policy, scales, texts, len(probes.images),
                                                         model_check))
        log.info("audit of job %s: deadline %g s for at most %d images", artifact.job_id, limit["seconds"],
                 limit["images"])
        with deadline(limit["seconds"]):
            render = profile.render_settings(device())
            pool = profile.load_secret_pool()
            detector = profile.load_detector()
            us_classifier = profile.load_us_classifier()
            base_renders = BaseRenders(rt, base, profile, detector, us_classifier)
            families = drawn = triggers = None
            outcomes = []
            for scale in scales:
                pipe = apply_checkpoint(load_base(base, torch_dtype=render.torch_dtype, device=device()),
                                         artifact.kind, weights, scale)
                check = None
                if triggers is None:  # the tokenizer is the base model's: neither method trains it
                    triggers = trigger_candidates(list(texts.trained), pipe.tokenizer)
                # At scale 1 only: its margins were calibrated on checkpoints as trained, and a LoRA turned up
                # moves every error further, honest ones too; the renders judge each scale.
                if model_check is not None and scale == 1.0:  # under the customer's captions, prompts, triggers
                    check_settings, references, controls = model_check
                    check_settings = check_settings.for_kind(artifact.kind)  # a full UNet has margins of its own
                    prompts = [*check_prompts(list(texts.trained)), *texts.extra, *triggers]
                    check = run_model_check(base_renders.pipe(), pipe, references, controls, prompts, check_settings)
                if families is None:
                    suspect = [row["prompt"] for row in (check or {}).get("by_prompt", [])  # renders go there
                               if row["prompt"] and row["statistic"] > check_settings.flag_margin]
                    sets, drawn = job_families(texts, triggers, probes, pool, profile.images_per_family(policy),
                                               focus=suspect)
                    families = {name: (s, base_renders.baseline(name, s)) for name, s in sets.items()}
                inputs = AuditInputs(base.path, base.weights_sha256, probes, policy=policy, render=render,
                                     baseline=baseline, adapter_path=str(weights), adapter_sha256=artifact.sha256,
                                     adapter_scale=scale, sequential=profile.sequential_plan())
                outcome = audit_families(pipe, detector, inputs, families, drawn,
                                         cache_dir=rt.settings.render_cache_dir, us_classifier=us_classifier)
                if check is not None:
                    outcome = with_model_check(outcome, check)
                outcomes.append((scale, outcome))
                if is_incomplete(outcome.report["verdict"]["reasons"]):
                    break  # blocked already; past a deadline, another scale would run without one
            outcome = strictest_scale(outcomes)
            outcome.report["job_probes"] = {**drawn, "baseline_seconds": round(base_renders.seconds, 2)}
    except Exception as exc:  # fail closed: a block with the reason, never a crash without a verdict
        log.exception("audit of job %s failed before it could finish", artifact.job_id)
        outcome = unfinished_audit(base.path, base.weights_sha256, policy, f"{type(exc).__name__}: {exc}",
                                   str(weights), artifact.sha256)
    outcome.report["deadline"] = limit  # None: the audit failed before its deadline was known
    return outcome


def finished_audit(session, job_id: str) -> Audit | None:
    """The job's latest finished audit of the checkpoint it has now: an audit belongs to the exact artifact it
    examined, so a job queued again and retrained (``gate.service.jobs.requeue_job``) is audited anew."""
    current = select(Artifact.sha256).where(Artifact.job_id == job_id).scalar_subquery()
    return session.scalars(select(Audit).where(Audit.job_id == job_id, Audit.finished_at.is_not(None),
                                               Audit.artifact_sha256 == current)
                           .order_by(Audit.finished_at.desc())).first()


def audit(rt: Runtime, job_id: str, worker: str) -> bool:
    """Run the audit stage; False if the job is not (or no longer) this worker's to audit."""
    lease = rt.settings.lease_seconds
    with rt.sessions() as session:
        job = take(session, Job, job_id, "auditing", worker, lease, changes={"stage": "auditing", "progress": 0.0})
        if job is None:
            return False
        if finished_audit(session, job_id) is not None:
            log.info("job %s already has a finished audit; handing it to the verdict", job_id)
            return True
        base = session.get(BaseModel, job.base_model_id)
        artifact = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).one()
    with Heartbeat(rt.sessions, Job, job_id, worker, lease) as heartbeat, metrics.stage("audit"):
        outcome = audit_checkpoint(rt, base, artifact, job)
        metrics.audit_images("checkpoint", len(outcome.report["samples"]))
        heartbeat.check()
        # Before the report is saved: it records where the store keeps each pair's renders, for any API host.
        store_pair_images(rt.store, artifact.tenant_id, outcome.report, rt.settings.render_cache_dir)
        scratch = rt.settings.jobs_dir / job_id / f"audit-{worker.replace('/', '_')}"
        report_path, html_path = save_outcome(outcome, scratch)
        with open(report_path, "rb") as f:
            report_key = rt.store.put(artifact.tenant_id, f, suffix=".json").key
        with open(html_path, "rb") as f:
            html_key = rt.store.put(artifact.tenant_id, f, suffix=".html").key
        verdict = outcome.report["verdict"]
        with rt.sessions() as session:
            row = Audit(tenant_id=artifact.tenant_id, job_id=job_id, artifact_sha256=artifact.sha256,
                        report_path=report_key,
                        report_sha256=report_sha256(outcome.report), html_path=html_key,
                        decision=verdict["decision"], reasons=verdict["reasons"], finished_at=utcnow())
            session.add(row)
            held = session.execute(update(Job).where(still_held(Job, job_id, worker))
                                   .values(stage="deciding", progress=1.0, lease_expires_at=expiry(lease)))
            if held.rowcount != 1:
                session.rollback()
                raise LeaseLost(f"job {job_id} was handed to another worker during its audit")
            record(session, SYSTEM, row, "audited", detail={"worker": worker, "decision": verdict["decision"],
                                                            "seconds": outcome.report["seconds"]})
            session.commit()
    log.info("job %s audited: %s (%s)", job_id, verdict["decision"], "; ".join(verdict["reasons"]))
    return True
