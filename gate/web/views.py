"""The reviewer pages: sign-in, the review queues (jobs, flagged datasets), job lists, job and dataset pages,
decisions, downloads and the images of an audit's discordant pairs.

Server-rendered HTML under ``/review``, for people with a browser rather than a script. The pages add no
rules of their own: what a caller may see is ``gate.auth``'s tenancy (a customer sees its own jobs and
datasets, read-only; another tenant's is a 404 like a missing one), a decision is ``gate.api.reviews
.take_decision`` or ``gate.api.dataset_reviews.decide_dataset``, a download is ``gate.api.results
.send_artifact`` (released and hash-checked), and the audit report is the page the auditor wrote
(``auditing.report``, flagged images already redacted), served as stored inside a sandboxed frame (a
customer gets the page of its view of the report instead, as on the API). Staff also see the audit's discordant
pairs side by side (``gate.web.evidence``: from the artifact store, so any API host serves them), redacted as in
the report; an unredacted render is served only to a reviewer or operator who posts the page's explicit form for
it, and only after the audit log records who saw which image. A customer reads its datasets' intake without the
detectors that screened them, as on the API (``gate.api.redaction.customer_intake``). The pages run no scripts;
the CSP allows only the stylesheet, the same-origin report frame, same-origin form posts and, on a job page that
shows a pair's images, same-origin images.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime

from flask import Blueprint, Response, g, redirect, render_template, request, url_for
from flask_limiter import RateLimitExceeded
from sqlalchemy import select
from sqlalchemy.orm import selectinload
from werkzeug.exceptions import HTTPException

from auditing.report import flagged
from gate.api import gate
from gate.api.errors import ApiError
from gate.api.redaction import customer_dataset_entry, customer_intake
from gate.api.results import REPORT_CSP, job_detail, log_entries, report_response, send_artifact
from gate.api.serialize import verdict_json
from gate.auth import Forbidden, NotFound, authenticate, get_for_principal, scoped
from gate.pipeline.audit import finished_audit
from gate.pipeline.pair_images import discordant_pairs
from gate.service.reviews import (
    REASON_MAX_CHARS,
    REVIEWER,
    WAITING_DATASETS,
    dataset_refusal,
    dataset_review,
    decide_dataset,
    intake_record,
    refusal,
    take_decision,
)
from gate.storage.audit_log import record
from gate.storage.models import METHODS, Audit, AuditLogEntry, BaseModel, Dataset, Job, Verdict, utcnow

from .evidence import UNREDACTED_VIEW, image_record, is_stored, shown_png, unredacted_png
from .filters import JobFilter
from .sessions import (
    CSRF_FIELD,
    PAGES_PATH,
    check_csrf,
    csrf_token,
    safe_next,
    set_cookie,
    sign_in,
    sign_out,
    signed_in,
)

log = logging.getLogger(__name__)

bp = Blueprint("web", __name__, url_prefix=PAGES_PATH, template_folder="templates", static_folder="static")

STAFF = (REVIEWER, "operator")
LIST_LIMIT = 500  # rows per list page; filter to narrow it
# Images only from these pages' own routes: the icon, and a discordant pair's renders on a staff job page.
PAGE_CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; frame-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")
# The stored report keeps the API's policy (inline styles, data: images, nothing else) and may be framed
# by these pages only.
FRAME_CSP = f"{REPORT_CSP}; frame-ancestors 'self'"
SIDE = "<any(base, checkpoint):side>"  # which image of a pair: the base model's or the checkpoint's


bp.before_request(check_csrf)
bp.after_request(set_cookie)


@bp.after_request
def _security_headers(response):
    response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"  # job ids stay out of other sites' logs
    if request.endpoint != "web.static":
        response.headers["Cache-Control"] = "no-store"  # reports and decisions are not for shared caches
    return response


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _waited(since: datetime) -> str:
    minutes = int((utcnow() - since).total_seconds() // 60)
    return f"{minutes // 1440} d {minutes // 60 % 24} h" if minutes >= 1440 else f"{minutes // 60} h {minutes % 60} min"


def _as_json(value) -> str:
    """A log entry's detail as readable JSON text (the template escapes it like any other text)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


@bp.context_processor
def _template_helpers() -> dict:
    return {"csrf_token": csrf_token, "csrf_field": CSRF_FIELD, "principal": g.get("principal"),
            "staff": g.get("principal") is not None and g.principal.role in STAFF, "when": _when, "waited": _waited,
            "as_json": _as_json}


def _error_page(status: int, message: str):
    return render_template("web/error.html", status=status, message=message), status


@bp.errorhandler(NotFound)
def _not_found(exc: NotFound):
    return _error_page(404, "Not found (or not yours to see).")


@bp.errorhandler(Forbidden)
def _forbidden(exc: Forbidden):
    return _error_page(403, str(exc))


@bp.errorhandler(ApiError)
def _refused(exc: ApiError):
    return _error_page(exc.status, exc.message)


@bp.errorhandler(RateLimitExceeded)
def _rate_limited(exc: RateLimitExceeded):
    # Registered here, a page wins over the API's JSON 429 (Flask matches a blueprint's handler for the code first).
    return _error_page(429, f"Too many requests from this key or address: at most {exc.limit.limit}. "
                       "Try again after a minute.")


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    return _error_page(exc.code or 500, exc.description or exc.name)


@bp.errorhandler(Exception)
def _unexpected(exc: Exception):
    log.exception("unhandled error on a reviewer page")
    return _error_page(500, "Internal error; see the server log.")


# --- signing in and out -----------------------------------------------------------------------------------------

@bp.get("/login")
def login():
    return render_template("web/login.html", next=safe_next(request.args.get("next"), bp.url_prefix))


@bp.post("/login")
def login_submit():
    wanted = safe_next(request.form.get("next"), bp.url_prefix)
    principal = authenticate(g.db, request.form.get("key", "").strip())
    if principal is None:
        return render_template("web/login.html", next=wanted,
                               error="That key is not valid (or has been revoked)."), 401
    sign_in(principal)
    log.info("key %s (%s of %s) signed in to the reviewer pages", principal.key_id, principal.role,
             principal.tenant_id)
    return redirect(wanted or url_for(".home"), 303)


@bp.post("/logout")
def logout():
    sign_out()
    return redirect(url_for(".login"), 303)


@bp.get("/")
@signed_in()
def home():
    return redirect(url_for(".queue" if g.principal.role in STAFF else ".jobs"), 303)


# --- lists ------------------------------------------------------------------------------------------------------

def _listing(statement, chosen: JobFilter) -> list[dict]:
    """Rows for a job table: the job, its base model's name, its dataset and its verdict (as the caller may read it)."""
    jobs = g.db.scalars(chosen.apply(statement).options(selectinload(Job.base_model), selectinload(Job.dataset))
                        .limit(LIST_LIMIT)).all()
    verdicts = {v.job_id: v for v in g.db.scalars(select(Verdict).where(Verdict.job_id.in_([j.id for j in jobs])))}
    return [{"job": job, "verdict": verdict_json(verdicts.get(job.id), g.principal.cross_tenant)} for job in jobs]


def _filter_choices() -> dict:
    tenants = g.db.scalars(scoped(select(Job.tenant_id).distinct(), Job, g.principal).order_by(Job.tenant_id)).all()
    return {"tenants": tenants, "base_models": g.db.execute(select(BaseModel.id, BaseModel.name)
                                                            .order_by(BaseModel.name)).all(),
            "methods": METHODS, "limit": LIST_LIMIT}


@bp.get("/queue")
@signed_in(*STAFF)
def queue():
    """Every tenant's jobs waiting for a decision, longest-waiting first."""
    chosen = JobFilter.from_args({**request.args.to_dict(), "status": "review"})
    rows = _listing(select(Job).order_by(Job.updated_at, Job.id), chosen)
    return render_template("web/queue.html", rows=rows, chosen=chosen.as_args(), **_filter_choices())


@bp.get("/jobs")
@signed_in()
def jobs():
    """The caller's jobs (a customer's own, staff: every tenant's), newest first."""
    chosen = JobFilter.from_args(request.args)
    rows = _listing(scoped(select(Job), Job, g.principal).order_by(Job.created_at.desc(), Job.id), chosen)
    return render_template("web/jobs.html", rows=rows, chosen=chosen.as_args(),
                           statuses=list(Job.TRANSITIONS), **_filter_choices())


# --- deciding -----------------------------------------------------------------------------------------------------

def _decision(refused: ApiError | None, waiting: bool) -> dict:
    """The decision form's state on a job or dataset page: whether the signed-in reviewer may decide (``refused``
    is the shared rules' refusal, None for a reviewer who may), or why not while the row still waits."""
    reviewer = g.principal.role == REVIEWER
    return {"can_decide": reviewer and refused is None,
            "refused": refused.message if reviewer and refused is not None and waiting else None}


def _decided(decide, page, row_id: str, endpoint: str):
    """Take a decision posted from a page (``decide``: the API's shared rules); on a refusal show ``page`` again
    with why, keeping what the reviewer wrote; else back to the page (``endpoint``), now decided."""
    try:
        decide(g.db, g.principal, row_id, request.form)
    except ApiError as exc:
        if exc.status == 404:
            raise
        return page(row_id, error=exc.message, reason=request.form.get("reason", ""), status=exc.status)
    return redirect(url_for(endpoint, **request.view_args), 303)


# --- one job ----------------------------------------------------------------------------------------------------

def _stored_report(job: Job, audit: Audit) -> dict:
    return json.loads(gate().store.path(job.tenant_id, audit.report_path).read_text())


def _evidence(job: Job, audit: Audit) -> dict:
    """The job page's discordant pairs (staff only): per family, with whether each image is still stored, and
    who has looked at this audit's images unredacted."""
    report, store = _stored_report(job, audit), gate().store
    views = g.db.scalars(select(AuditLogEntry).where(AuditLogEntry.entity_type == Audit.__tablename__,
                                                     AuditLogEntry.entity_id == audit.id,
                                                     AuditLogEntry.action == UNREDACTED_VIEW)
                         .order_by(AuditLogEntry.id)).all()
    scale = report["adapter"]["scale"] if report.get("lora_scales") else None  # the scale whose pairs these are
    return {"audit": audit, "families": discordant_pairs(report), "scale": scale, "views": views,
            "stored": lambda sample: is_stored(store, job.tenant_id, sample), "flagged": flagged,
            "retention_hours": gate().settings.render_cache_retention_hours}


def _job_page(job_id: str, *, error: str | None = None, reason: str = "", status: int = 200):
    job, staff = get_for_principal(g.db, Job, job_id, g.principal), g.principal.cross_tenant
    refused = refusal(g.principal, job) if g.principal.role == REVIEWER else None
    audit = finished_audit(g.db, job.id)
    evidence = _evidence(job, audit) if staff and audit is not None else None
    page = render_template(
        "web/job.html", job=job, detail=job_detail(job, staff), dataset=job.dataset,
        intake=_intake(job.dataset), limits=gate().settings.limits,
        has_report=audit is not None, evidence=evidence, log=log_entries(job, staff),
        reason_max=REASON_MAX_CHARS, error=error, reason=reason, **_decision(refused, job.status == "review"))
    return page, status


@bp.get("/jobs/<job_id>")
@signed_in()
def job(job_id: str):
    return _job_page(job_id)


@bp.get("/jobs/<job_id>/report")
@signed_in()
def report_frame(job_id: str):
    """The audit report for the job page's frame: as the auditor stored it (flagged images redacted) for staff,
    the customer's view for a customer (``gate.api.results.report_response``)."""
    response = report_response(get_for_principal(g.db, Job, job_id, g.principal), g.principal, "html")
    response.headers["Content-Security-Policy"] = FRAME_CSP
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    return response


@bp.post("/jobs/<job_id>/decision")
@signed_in(REVIEWER)
def decide(job_id: str):
    return _decided(take_decision, _job_page, job_id, ".job")


def _paired_image(job_id: str, audit_id: str, index: int, side: str) -> tuple[Job, Audit, dict]:
    """The job, one of its finished audits and the sample of one side of a pair in that audit's report."""
    job = get_for_principal(g.db, Job, job_id, g.principal)
    audit = g.db.scalars(select(Audit).where(Audit.id == audit_id, Audit.job_id == job.id,
                                             Audit.finished_at.is_not(None))).one_or_none()
    if audit is None:
        raise NotFound(f"job {job.id} has no finished audit {audit_id}")
    return job, audit, image_record(_stored_report(job, audit), index, side)


def _png(data: bytes, download_name: str | None = None) -> Response:
    response = Response(data, mimetype="image/png")
    if download_name is not None:
        response.headers["Content-Disposition"] = f'inline; filename="{download_name}"'
    return response  # no-store, like every page here (``_security_headers``)


@bp.get(f"/jobs/<job_id>/audits/<audit_id>/pairs/<int:index>/{SIDE}.png")
@signed_in(*STAFF)
def pair_image(job_id: str, audit_id: str, index: int, side: str):
    """One image of a discordant pair as the job page shows it: redacted when either detector flagged it."""
    job, _, sample = _paired_image(job_id, audit_id, index, side)
    app = gate()
    return _png(shown_png(app.store, job.tenant_id, sample, app.settings.render_cache_retention_hours))


@bp.post(f"/jobs/<job_id>/audits/<audit_id>/pairs/<int:index>/{SIDE}/unredacted")
@signed_in(*STAFF)
def unredacted_image(job_id: str, audit_id: str, index: int, side: str):
    """The unredacted render of one image of a pair, for staff who asked for it with the page's form (a POST with
    the session's CSRF token). The render is read and checked first, so a removed or altered one logs nothing;
    then the audit log records who saw which image of which job, and only once that is committed is it sent."""
    job, audit, sample = _paired_image(job_id, audit_id, index, side)
    app = gate()
    data = unredacted_png(app.store, job.tenant_id, sample, app.settings.render_cache_retention_hours)
    record(g.db, g.principal, audit, UNREDACTED_VIEW,
           detail={"job": job.id, "sample": index, "side": side, "family": sample["family"],
                   "prompt": sample["prompt"], "seed": sample["seed"], "image_key": sample["image_key"]})
    g.db.commit()
    log.info("key %s (%s) viewed the unredacted %s image %d of job %s's audit %s", g.principal.key_id,
             g.principal.role, side, index, job.id, audit.id)
    return _png(data, f"{job.id[:12]}-{index}-{side}.png")


@bp.get("/jobs/<job_id>/artifact")
@signed_in()
def artifact(job_id: str):
    """The released checkpoint, for the signed-in browser; the same checks as ``GET /v1/jobs/<id>/artifact``."""
    return send_artifact(get_for_principal(g.db, Job, job_id, g.principal))


# --- flagged datasets -------------------------------------------------------------------------------------------

@bp.get("/datasets")
@signed_in(*STAFF)
def dataset_queue():
    """Every tenant's flagged datasets, longest-waiting first: they train nothing until a reviewer accepts them."""
    rows = g.db.scalars(WAITING_DATASETS.limit(LIST_LIMIT)).all()
    return render_template("web/datasets.html", rows=rows, limit=LIST_LIMIT)


def _intake(dataset: Dataset) -> dict | None:
    """The dataset's intake record as the signed-in caller may read it: whole for staff, without the detectors
    that screened it for a customer (as on the API)."""
    intake = intake_record(g.db, dataset)
    return intake if g.principal.cross_tenant else customer_intake(intake)


def _dataset_page(dataset_id: str, *, error: str | None = None, reason: str = "", status: int = 200):
    dataset = get_for_principal(g.db, Dataset, dataset_id, g.principal)
    refused = dataset_refusal(g.principal, dataset) if g.principal.role == REVIEWER else None
    entries = log_entries(dataset, g.principal.cross_tenant)
    if not g.principal.cross_tenant:
        entries = [customer_dataset_entry(entry) for entry in entries]
    page = render_template(
        "web/dataset.html", dataset=dataset, intake=_intake(dataset), review=dataset_review(g.db, dataset),
        limits=gate().settings.limits, log=entries, reason_max=REASON_MAX_CHARS,
        error=error, reason=reason, **_decision(refused, dataset.status == "flagged"))
    return page, status


@bp.get("/datasets/<dataset_id>")
@signed_in()
def dataset(dataset_id: str):
    return _dataset_page(dataset_id)


@bp.post("/datasets/<dataset_id>/decision")
@signed_in(REVIEWER)
def decide_on_dataset(dataset_id: str):
    return _decided(decide_dataset, _dataset_page, dataset_id, ".dataset")
