"""What a finished job offers: its audit report (JSON, and the reviewer page), its checkpoint, its history.

Reviewers and operators read the report as the auditor stored it; a customer reads its allow-listed view
(``gate.api.redaction``): the verdict, its reasons and aggregate figures, never the probe prompts, seeds,
per-image results or the gate's paths.

The checkpoint leaves the gate only when the job is ``released`` and the file matches its sha256
(``gate.service.downloads``); a withheld (blocked or rejected) checkpoint is never downloadable. The check
reads the file once per change of its (size, mtime, inode) and at least daily (``HashCache``), not on every
download. A LoRA is sent as the ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights`` reads;
a DreamBooth UNet as
``unet.zip``, the ``unet/`` folder (the base model's UNet config beside the weights) that
``UNet2DConditionModel.from_pretrained`` loads, streamed without a temporary copy.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

from flask import Blueprint, Response, current_app, g, jsonify, send_file, stream_with_context
from sqlalchemy import select

from auditing.models.hashing import HashCache
from auditing.report import render_html
from gate.auth import Principal, get_for_principal
from gate.pipeline.audit import finished_audit
from gate.service.downloads import releasable_checkpoint
from gate.storage.models import Artifact, AuditLogEntry, Dataset, Job, Review, Verdict

from . import gate
from .auth import current_principal, login_required
from .errors import ApiError
from .redaction import customer_reason, customer_report
from .serialize import job_json, review_json, verdict_json

bp = Blueprint("results", __name__, url_prefix="/v1/jobs")

DOWNLOAD_NAMES = {"lora": "pytorch_lora_weights.safetensors", "unet": "unet.zip"}
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' name, inside unet.zip
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so the same checkpoint always streams the same bytes
CHUNK_BYTES = 1 << 20
REPORT_MIMETYPES = {"json": "application/json", "html": "text/html"}
# The report page is self-contained: inline styles and data: images, nothing to fetch, nothing to run.
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _job(job_id: str) -> Job:
    return get_for_principal(g.db, Job, job_id, current_principal())


def _artifact(job: Job) -> Artifact | None:
    return g.db.scalars(select(Artifact).where(Artifact.job_id == job.id)).one_or_none()


def job_detail(job: Job, staff: bool) -> dict:
    """A job with its verdict, review and checkpoint: everything a customer or reviewer checks (the verdict's
    reasons as ``staff`` may read them)."""
    artifact = _artifact(job)
    return job_json(job, staff) | {
        "verdict": verdict_json(g.db.scalars(select(Verdict).where(Verdict.job_id == job.id)).one_or_none(), staff),
        "review": review_json(g.db.scalars(select(Review).where(Review.job_id == job.id)).one_or_none()),
        "artifact": None if artifact is None else {"kind": artifact.kind, "sha256": artifact.sha256,
                                                   "size_bytes": artifact.size_bytes,
                                                   "downloadable": job.status == "released"},
    }


def report_file(job: Job, suffix: str):
    """The stored report of the job's finished audit (``suffix`` "json" or "html"); 404 no_report before."""
    audit = finished_audit(g.db, job.id)
    if audit is None:
        raise ApiError(404, "no_report", f"job {job.id} has no finished audit yet (status {job.status})")
    key = audit.report_path if suffix == "json" else audit.html_path
    return gate().store.path(job.tenant_id, key)


def report_response(job: Job, principal: Principal, suffix: str):
    """The job's report (``suffix`` "json" or "html") as ``principal`` may read it: staff get the stored file
    byte for byte; a customer gets its view of the stored JSON, and the page rendered from that view, so the
    page can show nothing the view leaves out (the API's report routes and the reviewer pages' frame)."""
    if principal.cross_tenant:
        return send_file(report_file(job, suffix), mimetype=REPORT_MIMETYPES[suffix])
    view = customer_report(json.loads(report_file(job, "json").read_text()))
    if suffix == "json":
        return jsonify(view)
    return current_app.response_class(render_html(view), mimetype=REPORT_MIMETYPES["html"])


@bp.get("/<job_id>/report")
@login_required()
def report(job_id: str):
    return report_response(_job(job_id), current_principal(), "json")


@bp.get("/<job_id>/report.html")
@login_required()
def report_page(job_id: str):
    response = report_response(_job(job_id), current_principal(), "html")
    response.headers["Content-Security-Policy"] = REPORT_CSP
    return response


def send_artifact(job: Job):
    """The job's checkpoint as a download, if ``gate.service.downloads`` lets it leave (also the reviewer pages'
    download, ``gate.web``)."""
    row, weights = releasable_checkpoint(g.db, gate().store, job, HashCache(gate().settings.hash_cache_file))
    if row.kind == "unet":
        base = job.base_model  # a single-file base model's configs are in its config folder
        config = (Path(base.config_path or base.path) / "unet" / "config.json").read_bytes()
        return Response(stream_with_context(unet_folder_zip(config, weights)), mimetype="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{DOWNLOAD_NAMES["unet"]}"',
                                 "ETag": f'"{row.sha256}"'})
    return send_file(weights, mimetype="application/octet-stream", as_attachment=True,
                     download_name=DOWNLOAD_NAMES[row.kind], etag=row.sha256)


class _Sink(io.RawIOBase):
    """An unseekable stream that the zip writer fills and the response drains (zipfile then writes data
    descriptors instead of seeking back)."""

    def __init__(self):
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def unet_folder_zip(config: bytes, weights: Path) -> Iterator[bytes]:
    """``unet/config.json`` and ``unet/diffusion_pytorch_model.safetensors`` as an uncompressed zip, in chunks."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(zipfile.ZipInfo("unet/config.json", ZIP_DATE), config)
        with zf.open(zipfile.ZipInfo(f"unet/{UNET_WEIGHTS}", ZIP_DATE), "w", force_zip64=True) as out, \
                open(weights, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                out.write(chunk)
                yield sink.drain()
    yield sink.drain()


@bp.get("/<job_id>/artifact")
@login_required()
def artifact(job_id: str):
    return send_artifact(_job(job_id))


def log_entries(row: Job | Dataset, staff: bool) -> list[dict]:
    """The audit-log entries of a job or dataset, oldest first; the verdict's move carries the verdict's
    reasons, which a customer reads as on the verdict (``customer_reason``)."""
    entries = g.db.scalars(select(AuditLogEntry).where(AuditLogEntry.entity_type == row.__tablename__,
                                                       AuditLogEntry.entity_id == row.id)
                           .order_by(AuditLogEntry.id)).all()
    return [{"at": e.at.isoformat(), "actor_role": e.actor_role, "actor_key_id": e.actor_key_id, "action": e.action,
             "from_state": e.from_state, "to_state": e.to_state,
             "reason": e.reason if staff or e.reason is None else customer_reason(e.reason), "detail": e.detail}
            for e in entries]


@bp.get("/<job_id>/log")
@login_required()
def history(job_id: str):
    job = _job(job_id)
    return {"job": job.id, "entries": log_entries(job, current_principal().cross_tenant)}
