"""The API after a job has run: checkpoint gating, reviews, reports, tenancy and roles on every route,
metrics and hardening runs.

No training runs here: jobs are created through ``POST /v1/jobs`` and then moved along their life cycle
with ``gate.storage.audit_log.transition``; their checkpoint, audit, report and verdict are written
directly (rows through the ORM, files through the ``ArtifactStore``), as the workers would.
"""

from __future__ import annotations

import functools
import io
import json
import tempfile
import tomllib
from datetime import UTC, datetime
from html import escape as html_escape
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from sqlalchemy import select
from test_api import Env, RedScanner, good_zip, registrable_model
from werkzeug.http import parse_options_header

from auditing.audit import AuditInputs, run_audit
from auditing.detectors.base import DetectorResult
from auditing.probes import load_probe_set
from auditing.report import render_html
from auditing.verdict import INCOMPLETE
from gate.api.redaction import FAILED_FOR_CUSTOMER
from gate.auth import create_key
from gate.storage.artifacts import ArtifactStore
from gate.storage.audit_log import SYSTEM, transition
from gate.storage.models import (
    AlignmentRun,
    Artifact,
    Audit,
    BaseModel,
    Dataset,
    Job,
    Review,
    Verdict,
)

ROOT = Path(__file__).resolve().parents[1]
MISSING_ID = "0" * 32  # the shape of a real id (uuid4 hex), and never one
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
# How a job reaches each state from ``queued`` (the life cycle in gate.storage.models.JOB_TRANSITIONS).
PATHS = {
    "queued": (),
    "training": ("training",),
    "auditing": ("training", "auditing"),
    "review": ("training", "auditing", "review"),
    "released": ("training", "auditing", "released"),
    "withheld": ("training", "auditing", "withheld"),
    "failed": ("failed",),
    "cancelled": ("cancelled",),
}
VERDICT_OF = {"review": "flag", "released": "pass", "withheld": "block"}


# --- environment ----------------------------------------------------------------------------------------------

@pytest.fixture
def env(tmp_path, migrated) -> Env:
    return Env(tmp_path, migrated)


def get(env: Env, path: str, who: str | None = None):
    return env.client.get(path, headers=env.headers(who) if who else {})


def error(response) -> dict:
    assert response.is_json, (response.status_code, response.get_data(as_text=True)[:200])
    return response.json["error"]


def dataset_of(env: Env, who: str = "a") -> str:
    """One uploaded (accepted) dataset per tenant and environment."""
    uploaded = env.__dict__.setdefault("uploaded_datasets", {})
    if who not in uploaded:
        r = env.upload(good_zip(), who=who)
        assert r.status_code == 202, r.json
        uploaded[who] = r.json["id"]
    return uploaded[who]


def move(env: Env, job_id: str, state: str) -> None:
    """Move a queued job to ``state`` the way the workers do (compare-and-set transitions, logged)."""
    with env.sessions() as s:
        job = s.get(Job, job_id)
        assert job.status == "queued", job.status
        for step in PATHS[state]:
            changes = {"finished_at": datetime.now(UTC)} if step in ("released", "withheld", "cancelled") else None
            transition(s, job, step, SYSTEM, changes=changes)
        s.commit()


def add_artifact(env: Env, job_id: str, data: bytes, kind: str = "lora") -> str:
    """The job's checkpoint: a stored file and its Artifact row. Returns the store key."""
    with env.sessions() as s:
        job = s.get(Job, job_id)
        stored = ArtifactStore(env.settings.artifacts_dir).put(job.tenant_id, io.BytesIO(data), suffix=".safetensors")
        s.add(Artifact(tenant_id=job.tenant_id, job_id=job.id, kind=kind, sha256=stored.sha256, path=stored.key,
                       size_bytes=stored.size_bytes))
        s.commit()
    return stored.key


# A real audit's inputs: probe prompts with their own seeds (an I2P-schema file), the gate's paths.
PROBE_ROWS = (("a probe prompt no customer may read", "sexual", 918273645),
              ("another probe prompt kept from customers", "violence", 564738291))
MODEL_PATH = "/srv/ftgate/models/sd-hardened"
ADAPTER_PATH = "/var/lib/ftgate/artifacts/tenants/acme/0f/adapter.safetensors"


class FlatPipe:
    """A stand-in diffusers pipeline, so a real audit runs without a model: each image is one flat colour chosen
    by its seed (red for odd seeds, which the scanner below calls unsafe)."""

    dtype = torch.float32
    scheduler = None

    def set_progress_bar_config(self, **_) -> None:
        pass

    def __call__(self, prompts, generator, **_):
        return SimpleNamespace(images=[Image.new("RGB", (8, 8), (255, 0, 0) if g.initial_seed() % 2 else (0, 0, 255))
                                       for g in generator])


class RawRedScanner(RedScanner):
    """The red scanner with raw output (per-label scores, boxes), as real detectors report it."""

    def detect(self, images):
        return [DetectorResult(r.score, r.unsafe, {"labels": {"RED_PIXEL_SHARE": r.score}, "boxes": [[1, 1, 4, 4]]})
                for r in super().detect(images)]


@functools.cache
def real_audit() -> tuple[dict, tuple[Image.Image, ...]]:
    """A report made by ``auditing.audit.run_audit`` (paired with a baseline, per-category rates) and its images:
    what the audit stage stores, without a model."""
    with tempfile.TemporaryDirectory() as folder:
        probes = Path(folder) / "i2p-probes.csv"
        rows = "".join(f"{prompt},{category},{seed},7.5,512,512\n" for prompt, category, seed in PROBE_ROWS)
        probes.write_text(f"prompt,categories,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height\n{rows}")
        probe_set = load_probe_set(probes, images_per_prompt=2)
    baseline = run_audit(FlatPipe(), RawRedScanner(), AuditInputs(MODEL_PATH, "1" * 64, probe_set)).report
    outcome = run_audit(FlatPipe(), RawRedScanner(), AuditInputs(MODEL_PATH, "1" * 64, probe_set, baseline=baseline,
                                                                 adapter_path=ADAPTER_PATH, adapter_sha256="2" * 64))
    return outcome.report, tuple(outcome.images)


def add_audit(env: Env, job_id: str, decision: str, *, verdict: bool = True, finished: bool = True,
              reasons: list[str] | None = None) -> tuple[dict, bytes]:
    """A finished audit of the job with its stored report.json / report.html (a real report, its verdict set to
    ``decision`` and ``reasons``), and (optionally) the verdict. Returns the report as stored and the page's
    bytes."""
    if reasons is None:
        reasons = [] if decision == "pass" else [f"unsafe rate above the base model's ({decision})"]
    with env.sessions() as s:
        audited = s.scalars(select(Artifact.sha256).where(Artifact.job_id == job_id)).one_or_none()
    if audited is None:  # an audit examines a checkpoint: the job gets one
        add_artifact(env, job_id, f"weights of {job_id}".encode())
    with env.sessions() as s:
        audited = s.scalars(select(Artifact.sha256).where(Artifact.job_id == job_id)).one()
        job = s.get(Job, job_id)
        report, images = real_audit()
        report = {**report, "verdict": {**report["verdict"], "decision": decision, "reasons": reasons}}
        html = render_html(report, list(images)).encode()
        store = ArtifactStore(env.settings.artifacts_dir)
        report_file = store.put(job.tenant_id, io.BytesIO(json.dumps(report).encode()), suffix=".json")
        html_file = store.put(job.tenant_id, io.BytesIO(html), suffix=".html")
        audit = Audit(tenant_id=job.tenant_id, job_id=job.id, artifact_sha256=audited, report_path=report_file.key,
                      report_sha256=report_file.sha256, html_path=html_file.key, decision=decision, reasons=reasons,
                      finished_at=datetime.now(UTC) if finished else None)
        s.add(audit)
        s.flush()
        if verdict:
            s.add(Verdict(tenant_id=job.tenant_id, job_id=job.id, audit_id=audit.id, decision=decision,
                          reasons=reasons, policy_name="default", policy_version=3))
        s.commit()
    return report, html


def make_job(env: Env, state: str = "queued", *, who: str = "a", method: str = "lora",
             checkpoint: bytes | None = None, audit: str | None = None) -> str:
    """A job of ``who``'s tenant in ``state``, with a checkpoint (kind from the method) and an audit if asked.
    A job that went through auditing to review/released/withheld gets the matching audit by default."""
    hyperparameters = ({"instance_prompt": "a sks square", "steps": 10} if method == "dreambooth"
                       else {"steps": 100, "rank": 4})
    r = env.job(dataset_of(env, who), who=who, method=method, hyperparameters=hyperparameters)
    assert r.status_code == 201, r.json
    job_id = r.json["id"]
    if checkpoint is not None:
        add_artifact(env, job_id, checkpoint, kind="unet" if method == "dreambooth" else "lora")
    audit = audit or VERDICT_OF.get(state)
    if audit is not None:
        add_audit(env, job_id, audit)
    move(env, job_id, state)
    return job_id


def status_of(env: Env, job_id: str) -> str:
    with env.sessions() as s:
        return s.get(Job, job_id).status


def dataset_status(env: Env, dataset_id: str) -> str:
    with env.sessions() as s:
        return s.get(Dataset, dataset_id).status


# --- 1. checkpoint gating -------------------------------------------------------------------------------------

@pytest.mark.parametrize("state", ["queued", "training", "auditing", "review", "withheld", "failed", "cancelled"])
def test_artifact_is_withheld_unless_released(env, state):
    """In every state but ``released`` the checkpoint is refused (403 artifact_withheld) to its owner and to
    staff alike, and the job says it is not downloadable."""
    job_id = make_job(env, state, checkpoint=b"weights of a job that is " + state.encode())
    assert status_of(env, job_id) == state
    for who in ("a", "rev", "op"):
        r = get(env, f"/v1/jobs/{job_id}/artifact", who)
        assert r.status_code == 403, (state, who, r.status_code)
        assert error(r)["reason"] == "artifact_withheld"
        assert b"weights of a job" not in r.data
    detail = get(env, f"/v1/jobs/{job_id}", "a").json
    assert detail["status"] == state
    assert detail["artifact"]["downloadable"] is False and detail["artifact"]["kind"] == "lora"


def test_released_lora_downloads_exact_bytes_under_its_diffusers_name(env):
    """A released LoRA is served byte for byte, as the attachment ``pipe.load_lora_weights`` looks for."""
    data = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"lora" * 1000
    job_id = make_job(env, "released", checkpoint=data)
    detail = get(env, f"/v1/jobs/{job_id}", "a").json
    assert detail["artifact"] == {"kind": "lora", "sha256": detail["artifact"]["sha256"], "size_bytes": len(data),
                                  "downloadable": True}
    r = get(env, f"/v1/jobs/{job_id}/artifact", "a")
    assert r.status_code == 200 and r.data == data
    disposition, options = parse_options_header(r.headers["Content-Disposition"])
    assert disposition == "attachment" and options["filename"] == "pytorch_lora_weights.safetensors"
    assert r.headers["Content-Type"] == "application/octet-stream"


def test_released_dreambooth_downloads_as_a_unet_folder_plain_diffusers_loads(env, tmp_path):
    """A released DreamBooth UNet comes as ``unet.zip``: the base model's UNet config beside the weights, a
    folder ``UNet2DConditionModel.from_pretrained`` loads."""
    import zipfile

    from diffusers import UNet2DConditionModel
    from safetensors.torch import save

    from auditing.models.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline(seed=4).unet
    with env.sessions() as s:
        base = Path(s.get(BaseModel, env.base_model_id).path)
    unet.save_config(base / "unet")  # the base model's unet/config.json
    data = save({k: v.contiguous() for k, v in unet.state_dict().items()})
    job_id = make_job(env, "released", method="dreambooth", checkpoint=data)
    r = get(env, f"/v1/jobs/{job_id}/artifact", "a")
    assert r.status_code == 200 and r.mimetype == "application/zip"
    assert parse_options_header(r.headers["Content-Disposition"])[1]["filename"] == "unet.zip"
    assert get(env, f"/v1/jobs/{job_id}/artifact", "a").data == r.data  # the same bytes every time
    with zipfile.ZipFile(io.BytesIO(r.data)) as zf:
        assert sorted(zf.namelist()) == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
        assert zf.read("unet/diffusion_pytorch_model.safetensors") == data
        zf.extractall(tmp_path / "download")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "download" / "unet", local_files_only=True)
    for name, tensor in unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_released_job_without_checkpoint_row_is_withheld(env):
    """``released`` alone is not enough: with no Artifact row there is nothing to send (403, not 500)."""
    job_id = make_job(env, "released")
    with env.sessions() as s:  # the row lost after the audit
        s.delete(s.scalars(select(Artifact).where(Artifact.job_id == job_id)).one())
        s.commit()
    r = get(env, f"/v1/jobs/{job_id}/artifact", "a")
    assert r.status_code == 403 and error(r)["reason"] == "artifact_withheld"
    assert get(env, f"/v1/jobs/{job_id}", "a").json["artifact"] is None


def test_corrupt_checkpoint_is_not_served(env):
    """A stored checkpoint that no longer matches its sha256 is refused with 503 artifact_corrupt (fail closed)."""
    data = b"the released weights" * 100
    job_id = make_job(env, "released", checkpoint=data)
    assert get(env, f"/v1/jobs/{job_id}/artifact", "a").data == data
    with env.sessions() as s:
        key = s.scalars(select(Artifact.path).where(Artifact.job_id == job_id)).one()
    path = env.settings.artifacts_dir / key
    path.write_bytes(b"tampered" + data[8:])  # same size, other bytes
    r = get(env, f"/v1/jobs/{job_id}/artifact", "a")
    assert r.status_code == 503 and error(r)["reason"] == "artifact_corrupt"
    assert b"tampered" not in r.data and b"released weights" not in r.data


def test_a_download_reads_the_checkpoint_only_when_it_changed(env, monkeypatch):
    import auditing.models.hashing as hashing

    job_id = make_job(env, "released", checkpoint=b"weights" * 100)
    reads, real = [], hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda path: reads.append(path) or real(path))
    for _ in range(3):
        assert get(env, f"/v1/jobs/{job_id}/artifact", "a").status_code == 200
    assert len(reads) == 1  # the first download hashes the file, the others find it unchanged


# --- 2. reviews -----------------------------------------------------------------------------------------------

def test_review_queue_lists_only_jobs_in_review_for_staff(env):
    """Reviewers and operators see every tenant's jobs in review (and only those); customers may not look."""
    waiting_a = make_job(env, "review", checkpoint=b"a's flagged weights")
    waiting_b = make_job(env, "review", who="b", checkpoint=b"b's flagged weights")
    make_job(env, "released", checkpoint=b"released weights")
    make_job(env, "withheld")
    for who in ("rev", "op"):
        r = get(env, "/v1/reviews", who)
        assert r.status_code == 200
        assert sorted(j["id"] for j in r.json["jobs"]) == sorted([waiting_a, waiting_b])
        assert {j["verdict"]["decision"] for j in r.json["jobs"]} == {"flag"}
    for who in ("a", "b"):
        r = get(env, "/v1/reviews", who)
        assert r.status_code == 403 and error(r)["reason"] == "forbidden"


@pytest.mark.parametrize("body, field", [
    ({"decision": "approve"}, "reason"),
    ({"decision": "approve", "reason": ""}, "reason"),
    ({"decision": "approve", "reason": "   \n\t"}, "reason"),
    ({"decision": "approve", "reason": "x" * 2001}, "reason"),
    ({"decision": "approve", "reason": 42}, "reason"),
    ({"reason": "fine"}, "decision"),
    ({"decision": "maybe", "reason": "fine"}, "decision"),
    ({"decision": "APPROVE", "reason": "fine"}, "decision"),
    ({"decision": "released", "reason": "fine"}, "decision"),
])
def test_invalid_review_is_400_naming_the_field_and_changes_nothing(env, body, field):
    """A review without a usable reason or decision is refused, naming the field; the job stays in review."""
    job_id = make_job(env, "review", checkpoint=b"flagged weights")
    r = env.client.post(f"/v1/reviews/{job_id}", headers=env.headers("rev"), json=body)
    assert r.status_code == 400 and error(r)["field"] == field and error(r)["reason"] == "invalid_request"
    assert status_of(env, job_id) == "review" and env.count(Review) == 0


def test_review_body_must_be_a_json_object(env):
    """A review that is not a JSON object is a 400; the job stays in review."""
    job_id = make_job(env, "review")
    r = env.client.post(f"/v1/reviews/{job_id}", headers=env.headers("rev"), data="approve",
                        content_type="text/plain")
    assert r.status_code == 400 and status_of(env, job_id) == "review"


def test_approval_releases_the_checkpoint_and_is_logged(env):
    """Only a reviewer may decide; approval releases the job, records the review and logs who and why;
    the job cannot be decided twice."""
    data = b"flagged but fine weights" * 50
    job_id = make_job(env, "review", checkpoint=data)
    assert error(get(env, f"/v1/jobs/{job_id}/artifact", "a"))["reason"] == "artifact_withheld"
    for who in ("a", "b", "op"):
        r = env.client.post(f"/v1/reviews/{job_id}", headers=env.headers(who),
                            json={"decision": "approve", "reason": "self-approval"})
        assert r.status_code == 403 and error(r)["reason"] == "forbidden", who
    assert status_of(env, job_id) == "review" and env.count(Review) == 0

    reason = "detector false positive: the red shapes are stop signs"
    r = env.client.post(f"/v1/reviews/{job_id}", headers=env.headers("rev"),
                        json={"decision": "approve", "reason": f"  {reason}  "})
    assert r.status_code == 200, r.json
    assert r.json["status"] == "released" and r.json["artifact"]["downloadable"] is True
    assert r.json["review"]["decision"] == "approve" and r.json["review"]["reason"] == reason
    assert r.json["review"]["reviewer"] == env.keys["rev"].key_id
    assert status_of(env, job_id) == "released"
    assert job_id not in [j["id"] for j in get(env, "/v1/reviews", "rev").json["jobs"]]

    download = get(env, f"/v1/jobs/{job_id}/artifact", "a")
    assert download.status_code == 200 and download.data == data

    entries = get(env, f"/v1/jobs/{job_id}/log", "a").json["entries"]
    decided = [e for e in entries if e["actor_role"] == "reviewer"]
    assert len(decided) == 1
    assert decided[0]["actor_key_id"] == env.keys["rev"].key_id and decided[0]["reason"] == reason
    assert (decided[0]["from_state"], decided[0]["to_state"]) == ("review", "released")
    assert entries[-1] == decided[0]  # the decision is the job's last move

    again = env.client.post(f"/v1/reviews/{job_id}", headers=env.headers("rev"),
                            json={"decision": "reject", "reason": "changed my mind"})
    assert again.status_code == 409 and error(again)["reason"] == "not_in_review"
    assert status_of(env, job_id) == "released" and env.count(Review) == 1


def test_rejection_withholds_the_checkpoint_for_good(env):
    """A rejected job is withheld: its checkpoint stays refused, and the rejection is logged with its reason."""
    job_id = make_job(env, "review", checkpoint=b"unsafe weights")
    reason = "r" * 2000  # the longest reason allowed
    r = env.client.post(f"/v1/reviews/{job_id}", headers=env.headers("rev"),
                        json={"decision": "reject", "reason": reason})
    assert r.status_code == 200 and r.json["status"] == "withheld"
    assert r.json["artifact"]["downloadable"] is False and r.json["review"]["decision"] == "reject"
    for who in ("a", "rev", "op"):
        refused = get(env, f"/v1/jobs/{job_id}/artifact", who)
        assert refused.status_code == 403 and error(refused)["reason"] == "artifact_withheld"
    last = get(env, f"/v1/jobs/{job_id}/log", "a").json["entries"][-1]
    assert (last["actor_role"], last["to_state"], last["reason"]) == ("reviewer", "withheld", reason)
    event = get(env, f"/v1/jobs/{job_id}/events", "a").json["events"][-1]  # the customer follows the decision
    assert (event["kind"], event["data"]) == ("stage", {"status": "withheld", "review": "reject"})
    again = env.client.post(f"/v1/reviews/{job_id}", headers=env.headers("rev"),
                            json={"decision": "approve", "reason": "let it out"})
    assert again.status_code == 409 and status_of(env, job_id) == "withheld"
    assert get(env, f"/v1/jobs/{job_id}/artifact", "a").status_code == 403


@pytest.mark.parametrize("state", ["queued", "auditing", "released", "withheld", "failed"])
def test_review_of_a_job_not_in_review_is_409(env, state):
    """Only a job in review takes a decision: a reviewer cannot release (or withhold) any other."""
    job_id = make_job(env, state, checkpoint=b"weights")
    r = env.client.post(f"/v1/reviews/{job_id}", headers=env.headers("rev"),
                        json={"decision": "approve", "reason": "ok"})
    assert r.status_code == 409 and error(r)["reason"] == "not_in_review"
    assert status_of(env, job_id) == state and env.count(Review) == 0


@pytest.mark.parametrize(("error", "shown"), [
    ("RuntimeError: /srv/ftgate/jobs/x/training-state: No space left on device", FAILED_FOR_CUSTOMER),
    ("gave up after 3 attempts (max_attempts 3); the last: lease of worker ftgate-train@gpu7 expired at ...",
     FAILED_FOR_CUSTOMER),
    ("could not be queued (OperationalError); submit it again", None),  # written for the customer: verbatim
])
def test_a_failed_jobs_error_reaches_the_customer_only_as_written_for_them(env, error, shown):
    """An exception's text or a worker's name is the operator's; the customer reads that the job failed."""
    job_id = make_job(env, "failed")
    with env.sessions() as s:
        s.get(Job, job_id).error = error
        s.commit()
    shown = error if shown is None else shown
    assert get(env, f"/v1/jobs/{job_id}", "a").json["error"] == shown
    assert [j["error"] for j in get(env, "/v1/jobs", "a").json["jobs"]] == [shown]
    assert get(env, f"/v1/jobs/{job_id}", "op").json["error"] == error


def test_review_of_a_missing_job_is_404(env):
    """A valid review of an id that names no job is a 404 not_found."""
    r = env.client.post(f"/v1/reviews/{MISSING_ID}", headers=env.headers("rev"),
                        json={"decision": "approve", "reason": "ok"})
    assert r.status_code == 404 and error(r)["reason"] == "not_found"


def test_reviewer_cannot_approve_a_job_of_its_own_tenant(env):
    """Separation of duties: a flagged checkpoint must be cleared by someone outside the customer's tenant."""
    with env.sessions() as s:
        inside = create_key(s, "acme", "reviewer", SYSTEM, name="acme's own reviewer")
        s.commit()
    job_id = make_job(env, "review", checkpoint=b"acme's flagged weights")
    r = env.client.post(f"/v1/reviews/{job_id}", headers={"Authorization": f"Bearer {inside.key}"},
                        json={"decision": "approve", "reason": "looks fine to us"})
    assert r.status_code in (403, 404)
    assert status_of(env, job_id) == "review"


# --- 3. tenant isolation --------------------------------------------------------------------------------------

def job_paths(job_id: str) -> list[str]:
    return [f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/report", f"/v1/jobs/{job_id}/report.html",
            f"/v1/jobs/{job_id}/artifact", f"/v1/jobs/{job_id}/log"]


def test_another_tenants_rows_look_missing_on_every_endpoint(env):
    """Tenant B's customer gets exactly the 404 a missing id gets for A's dataset, job, report, page,
    released checkpoint and log: nothing tells it the id exists. Staff see A's rows."""
    data = b"acme's released weights"
    dataset = dataset_of(env, "a")
    job_id = make_job(env, "released", checkpoint=data)
    assert get(env, f"/v1/jobs/{job_id}/artifact", "a").data == data  # it is downloadable, by its owner
    pairs = [(f"/v1/datasets/{dataset}", f"/v1/datasets/{MISSING_ID}")]
    pairs += list(zip(job_paths(job_id), job_paths(MISSING_ID), strict=True))
    for path, missing_path in pairs:
        theirs, missing = get(env, path, "b"), get(env, missing_path, "b")
        assert missing.status_code == 404 and error(missing)["reason"] == "not_found", missing_path
        assert theirs.status_code == 404, (path, theirs.status_code)
        # The same body as for a missing id, but for the id itself (which the caller sent).
        real_id = dataset if path.startswith("/v1/datasets") else job_id
        assert theirs.json == json.loads(json.dumps(missing.json).replace(MISSING_ID, real_id)), path
        assert data not in theirs.data and b"verdict" not in theirs.data
        for staff in ("rev", "op"):
            assert get(env, path, staff).status_code == 200, (path, staff)
        assert get(env, path, "a").status_code == 200, path


def test_job_lists_are_scoped_to_the_tenant(env):
    """A customer's job list holds its own jobs only; staff see every tenant's."""
    a_jobs = {make_job(env, "queued"), make_job(env, "released", checkpoint=b"w")}
    b_jobs = {make_job(env, "queued", who="b")}
    assert {j["id"] for j in get(env, "/v1/jobs", "a").json["jobs"]} == a_jobs
    assert {j["id"] for j in get(env, "/v1/jobs", "b").json["jobs"]} == b_jobs
    for staff in ("rev", "op"):
        assert {j["id"] for j in get(env, "/v1/jobs", staff).json["jobs"]} == a_jobs | b_jobs


def test_customer_cannot_start_a_job_on_another_tenants_dataset(env):
    """A job on another tenant's dataset is a 404 naming the dataset field; no job row is created."""
    r = env.job(dataset_of(env, "a"), who="b")
    assert r.status_code == 404 and error(r)["field"] == "dataset" and env.count(Job) == 0


# --- 4. roles on every route ----------------------------------------------------------------------------------

# (method, route rule) -> expected status for customer (the rows' owner), reviewer, operator, and no key.
C, R, OP, NONE = "customer", "reviewer", "operator", None
ROLE_TABLE: dict[tuple[str, str], dict[str | None, int]] = {
    ("POST", "/v1/datasets"): {C: 202, R: 403, OP: 403, NONE: 401},
    ("GET", "/v1/datasets/<dataset_id>"): {C: 200, R: 200, OP: 200, NONE: 401},
    ("GET", "/v1/dataset-reviews"): {C: 403, R: 200, OP: 200, NONE: 401},
    ("POST", "/v1/datasets/<dataset_id>/review"): {C: 403, R: 200, OP: 403, NONE: 401},
    ("POST", "/v1/jobs"): {C: 201, R: 403, OP: 403, NONE: 401},
    ("GET", "/v1/jobs"): {C: 200, R: 200, OP: 200, NONE: 401},
    ("GET", "/v1/jobs/<job_id>"): {C: 200, R: 200, OP: 200, NONE: 401},
    ("GET", "/v1/jobs/<job_id>/report"): {C: 200, R: 200, OP: 200, NONE: 401},
    ("GET", "/v1/jobs/<job_id>/report.html"): {C: 200, R: 200, OP: 200, NONE: 401},
    ("GET", "/v1/jobs/<job_id>/artifact"): {C: 200, R: 200, OP: 200, NONE: 401},
    ("GET", "/v1/jobs/<job_id>/log"): {C: 200, R: 200, OP: 200, NONE: 401},
    ("GET", "/v1/jobs/<job_id>/events"): {C: 200, R: 200, OP: 200, NONE: 401},
    ("GET", "/v1/jobs/<job_id>/events/<seq>/image"): {C: 404, R: 404, OP: 404, NONE: 401},  # no sample event
    ("POST", "/v1/jobs/<job_id>/cancel"): {C: 409, R: 403, OP: 403, NONE: 401},  # the job is in review
    ("POST", "/v1/jobs/<job_id>/requeue"): {C: 403, R: 403, OP: 409, NONE: 401},  # not failed
    ("POST", "/v1/webhook-secret"): {C: 201, R: 403, OP: 403, NONE: 401},
    ("GET", "/v1/webhook"): {C: 200, R: 403, OP: 403, NONE: 401},
    ("PUT", "/v1/webhook"): {C: 400, R: 403, OP: 403, NONE: 401},  # no body
    ("GET", "/v1/reviews"): {C: 403, R: 200, OP: 200, NONE: 401},
    ("POST", "/v1/reviews/<job_id>"): {C: 403, R: 200, OP: 403, NONE: 401},
    ("POST", "/v1/base-models"): {C: 403, R: 403, OP: 201, NONE: 401},
    ("GET", "/v1/base-models"): {C: 200, R: 200, OP: 200, NONE: 401},
    ("GET", "/v1/base-models/<base_model_id>"): {C: 200, R: 200, OP: 200, NONE: 401},
    ("POST", "/v1/alignments"): {C: 403, R: 403, OP: 201, NONE: 401},
    ("GET", "/v1/alignments/<run_id>"): {C: 403, R: 403, OP: 200, NONE: 401},
    ("GET", "/healthz"): {C: 200, R: 200, OP: 200, NONE: 200},
    ("GET", "/metrics"): {C: 403, R: 403, OP: 200, NONE: 401},
    ("GET", "/openapi.json"): {C: 200, R: 200, OP: 200, NONE: 200},
}
WHO = {C: "a", R: "rev", OP: "op", NONE: None}
COUNTED = (Dataset, Job, Review, BaseModel, AlignmentRun)


def alignment_config() -> dict:
    return tomllib.loads((ROOT / "alignment" / "configs" / "shapes-world.toml").read_text())


def test_role_table_covers_every_route(env):
    """Every route of the app has its expected statuses in ROLE_TABLE (a new route must be added to it)."""
    routes = {(method, rule.rule) for rule in env.app.url_map.iter_rules()
              if rule.endpoint != "static" and not rule.endpoint.startswith("web.")  # pages: tests/test_web.py
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes == set(ROLE_TABLE)


@pytest.mark.parametrize("role", [C, R, OP, NONE], ids=["customer", "reviewer", "operator", "no-key"])
def test_roles_on_every_route(env, role, tmp_path):
    """Each route answers each role as ROLE_TABLE says; a refused request (401/403) creates or changes nothing
    and says why in the standard error body."""
    model, probes = registrable_model(tmp_path)
    dataset = dataset_of(env, "a")
    flagged = env.upload(good_zip(n=20, red=1)).json["id"]
    released = make_job(env, "released", checkpoint=b"released weights")
    in_review = make_job(env, "review", checkpoint=b"flagged weights")
    with env.sessions() as s:
        run = AlignmentRun(name="harden sd-tiny", config=alignment_config())
        s.add(run)
        s.commit()
        run_id = run.id
    ids = {"dataset_id": dataset, "job_id": released, "base_model_id": env.base_model_id, "run_id": run_id,
           "seq": "1"}
    requests = {
        ("POST", "/v1/datasets"): dict(data={"file": (io.BytesIO(good_zip(n=2)), "more.zip")},
                                       content_type="multipart/form-data"),
        ("POST", "/v1/jobs"): dict(json={"base_model": env.base_model_id, "dataset": dataset, "method": "lora"}),
        ("POST", "/v1/reviews/<job_id>"): dict(json={"decision": "approve", "reason": "benign"}),
        ("POST", "/v1/datasets/<dataset_id>/review"): dict(json={"decision": "accept", "reason": "a false positive"}),
        ("POST", "/v1/base-models"): dict(json={"name": "sd-hardened", "path": str(model),
                                                "audit_profile": {"probes": str(probes), "detector": "shapes"}}),
        ("POST", "/v1/alignments"): dict(json={"name": "again", "config": alignment_config()}),
        ("POST", "/v1/jobs/<job_id>/requeue"): dict(json={"reason": "the worker host was repaired"}),
    }
    decided = {"job_id": in_review, "dataset_id": flagged}  # what the POSTs under an id decide on
    headers = env.headers(WHO[role]) if WHO[role] else {}
    failures = []
    for (method, rule), expected in ROLE_TABLE.items():
        path = rule
        for name, value in ids.items():
            path = path.replace(f"<{name}>", decided[name] if method == "POST" and name in decided else value)
        before = {model_.__name__: env.count(model_) for model_ in COUNTED}
        before_status = status_of(env, in_review), dataset_status(env, flagged)
        r = env.client.open(path, method=method, headers=headers, **requests.get((method, rule), {}))
        if r.status_code != expected[role]:
            failures.append((method, rule, r.status_code, expected[role], r.get_data(as_text=True)[:200]))
            continue
        if r.status_code in (401, 403):
            assert error(r)["reason"] == {401: "unauthorized", 403: "forbidden"}[r.status_code]
            assert {model_.__name__: env.count(model_) for model_ in COUNTED} == before, (method, rule)
            assert (status_of(env, in_review), dataset_status(env, flagged)) == before_status
    assert failures == []
    if role == R:
        assert (status_of(env, in_review), dataset_status(env, flagged)) == ("released", "accepted")
    elif role == OP:
        assert env.dispatcher.baselines and len(env.dispatcher.alignments) == 1
    else:
        assert (status_of(env, in_review), dataset_status(env, flagged)) == ("review", "flagged")
        assert env.dispatcher.baselines == [] and env.dispatcher.alignments == []


# --- 5. reports -----------------------------------------------------------------------------------------------

def test_reports_appear_only_once_the_audit_has_finished(env):
    """No report before an audit has finished (404 no_report, JSON and page); then the JSON is the stored
    report and the page is served as text/html under a CSP that lets it fetch and run nothing."""
    job_id = make_job(env, "auditing", checkpoint=b"weights")
    for suffix in ("report", "report.html"):
        r = get(env, f"/v1/jobs/{job_id}/{suffix}", "a")
        assert r.status_code == 404 and error(r)["reason"] == "no_report", suffix
    add_audit(env, job_id, "pass", verdict=False, finished=False)  # an audit still running
    assert error(get(env, f"/v1/jobs/{job_id}/report", "a"))["reason"] == "no_report"

    report, html = add_audit(env, job_id, "flag")
    for who in ("a", "rev"):
        r = get(env, f"/v1/jobs/{job_id}/report", who)
        assert r.status_code == 200 and r.mimetype == "application/json"
        assert r.json["verdict"]["decision"] == "flag"
        assert "Content-Security-Policy" not in r.headers or r.headers["Content-Security-Policy"] == CSP
        page = get(env, f"/v1/jobs/{job_id}/report.html", who)
        assert page.status_code == 200 and page.mimetype == "text/html"
        assert page.headers["Content-Security-Policy"] == CSP
    assert r.json == report and page.data == html  # staff: as stored
    detail = get(env, f"/v1/jobs/{job_id}", "a").json
    assert detail["verdict"]["decision"] == "flag" and detail["verdict"]["policy"] == "default v3"


def undisclosed(report: dict) -> list[str]:
    """What a customer never reads of a real report: the probe prompts and seeds, each image's hash and raw
    detector output, the probe file, and the gate's paths."""
    samples = report["samples"]
    return sorted({*(s["prompt"] for s in samples), *(str(s["seed"]) for s in samples),
                   *(s["image_sha256"] for s in samples), *(label for s in samples for label in s["raw"]["labels"]),
                   report["model"]["path"], report["adapter"]["path"], report["probes"]["path"],
                   report["probes"]["sha256"]})


def test_customers_read_the_verdict_and_its_figures_never_the_test(env):
    """A customer's report (JSON and page), job, job list and log carry the verdict, its reasons and the aggregate
    figures with their intervals, and none of the real report's prompts, seeds, raw detector output, probe file
    or paths; reviewers and operators get the report as stored."""
    job_id = make_job(env, "queued", checkpoint=b"flagged weights")
    report, html = add_audit(env, job_id, "flag")
    move(env, job_id, "review")
    hidden = undisclosed(report)
    assert len(hidden) >= 10 and all(h in json.dumps(report) for h in hidden)
    for staff in ("rev", "op"):
        assert get(env, f"/v1/jobs/{job_id}/report", staff).json == report
        assert get(env, f"/v1/jobs/{job_id}/report.html", staff).data == html

    r = get(env, f"/v1/jobs/{job_id}/report", "a")
    assert r.status_code == 200 and [h for h in hidden if h in r.get_data(as_text=True)] == []
    view = r.json
    assert set(view) == {"view", "kind", "version", "seconds", "model", "adapter", "verdict", "metrics"}
    assert view["view"] == "customer" and view["verdict"]["reasons"] == report["verdict"]["reasons"]
    assert (view["verdict"]["decision"], view["verdict"]["rule"]) == ("flag", report["verdict"]["rule"])
    assert view["metrics"] == report["metrics"]  # rates with intervals, the paired comparison, per category
    assert set(view["metrics"]) == {"unsafe_rate", "baseline_unsafe_rate", "comparison", "categories"}
    assert view["model"] == {"sha256": report["model"]["sha256"]}
    assert view["adapter"] == {"sha256": report["adapter"]["sha256"], "scale": 1.0}

    page = get(env, f"/v1/jobs/{job_id}/report.html", "a")
    text = page.get_data(as_text=True)
    assert page.status_code == 200 and page.headers["Content-Security-Policy"] == CSP
    assert [h for h in hidden if h in text] == [] and "<img" not in text
    assert "FLAG — human review" in text and html_escape(report["verdict"]["reasons"][0]) in text
    assert f"{report['metrics']['unsafe_rate']['rate']:.3f}" in text
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/log", "/v1/jobs"):
        assert [h for h in hidden if h in get(env, path, "a").get_data(as_text=True)] == [], path


def test_customers_read_each_lora_scales_verdict_and_figures_only():
    from gate.api.redaction import customer_report

    at_two = {"scale": 2.0, "images": 3, "samples": [{"prompt": "a secret probe", "seed": 7}],
              "verdict": {"decision": "block", "reasons": ["unsafe rate 0.6"], "rule": "r",
                          "policy": {"name": "default", "probe_file": "/srv/probes.csv"}},
              "metrics": {"unsafe_rate": {"hits": 2, "n": 3, "rate": 0.6, "lo": 0.2, "hi": 0.9}}}
    view = customer_report({"lora_scales": [at_two]})
    assert view["lora_scales"] == [{"scale": 2.0, "images": 3, "metrics": at_two["metrics"],
                                    "verdict": {"decision": "block", "reasons": ["unsafe rate 0.6"], "rule": "r",
                                                "policy": {"name": "default"}}}]


def test_an_incomplete_audit_tells_the_customer_only_that_it_was_incomplete(env):
    """What broke in an audit is an exception's text, which can name the gate's files: staff read it on the
    verdict, the report and the log; the customer reads "audit incomplete" everywhere."""
    why = f"{INCOMPLETE}: FileNotFoundError: [Errno 2] No such file or directory: '/srv/ftgate/probes/i2p.csv'"
    job_id = make_job(env, "queued", checkpoint=b"weights")
    add_audit(env, job_id, "block", reasons=[why])
    with env.sessions() as s:
        job = s.get(Job, job_id)
        for step in ("training", "auditing"):
            transition(s, job, step, SYSTEM)
        transition(s, job, "withheld", SYSTEM, reason=why, changes={"finished_at": datetime.now(UTC)})
        s.commit()
    paths = [f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/report", f"/v1/jobs/{job_id}/report.html",
             f"/v1/jobs/{job_id}/log", "/v1/jobs"]
    for path in paths:
        assert "/srv/ftgate/probes" not in get(env, path, "a").get_data(as_text=True), path
    assert get(env, f"/v1/jobs/{job_id}", "a").json["verdict"]["reasons"] == [INCOMPLETE]
    assert get(env, f"/v1/jobs/{job_id}/report", "a").json["verdict"]["reasons"] == [INCOMPLETE]
    assert get(env, f"/v1/jobs/{job_id}/log", "a").json["entries"][-1]["reason"] == INCOMPLETE
    for staff in ("rev", "op"):
        assert get(env, f"/v1/jobs/{job_id}", staff).json["verdict"]["reasons"] == [why]
        assert get(env, f"/v1/jobs/{job_id}/report", staff).json["verdict"]["reasons"] == [why]
        assert get(env, f"/v1/jobs/{job_id}/log", staff).json["entries"][-1]["reason"] == why


# --- 6. metrics -----------------------------------------------------------------------------------------------

def test_metrics_count_jobs_and_verdicts(env):
    """/metrics (an operator key) counts jobs by status and method, submissions, datasets and verdicts, from the
    database."""
    before = env.client.get("/metrics", headers=env.headers("op")).get_data(as_text=True)
    assert 'status="released"' not in before and "ftgate_verdicts_total{" not in before
    make_job(env, "released", checkpoint=b"good weights")
    make_job(env, "withheld", checkpoint=b"bad weights")
    make_job(env, "queued", method="dreambooth")
    r = env.client.get("/metrics", headers=env.headers("op"))
    assert r.status_code == 200 and r.mimetype == "text/plain"
    lines = set(r.get_data(as_text=True).splitlines())
    for line in ('ftgate_jobs{method="lora",status="released"} 1.0',
                 'ftgate_jobs{method="lora",status="withheld"} 1.0',
                 'ftgate_jobs{method="dreambooth",status="queued"} 1.0',
                 'ftgate_jobs_submitted_total{method="lora"} 2.0',
                 'ftgate_jobs_submitted_total{method="dreambooth"} 1.0',
                 'ftgate_datasets{status="accepted"} 1.0',
                 'ftgate_verdicts_total{decision="pass"} 1.0',
                 'ftgate_verdicts_total{decision="block"} 1.0'):
        assert line in lines, line
    assert not any(line.startswith('ftgate_verdicts_total{decision="flag"}') for line in lines)


# --- 7. hardening runs ----------------------------------------------------------------------------------------

def test_operator_starts_and_follows_a_hardening_run(env):
    """A valid config (the packaged shapes-world one) starts a queued run, dispatched once; the run reads back."""
    config = alignment_config()
    r = env.client.post("/v1/alignments", headers=env.headers("op"), json={"name": "harden world", "config": config})
    assert r.status_code == 201, r.json
    run_id = r.json["id"]
    assert r.json["status"] == "queued" and r.json["config"] == config
    assert env.dispatcher.alignments == [run_id]
    got = get(env, f"/v1/alignments/{run_id}", "op")
    assert got.status_code == 200 and got.json["id"] == run_id and got.json["name"] == "harden world"
    assert got.json["config"] == config and got.json["status"] == "queued"
    with env.sessions() as s:
        assert s.get(AlignmentRun, run_id).requested_by == env.keys["op"].key_id
    missing = get(env, f"/v1/alignments/{MISSING_ID}", "op")
    assert missing.status_code == 404 and error(missing)["reason"] == "not_found"


@pytest.mark.parametrize("section, field, value", [
    ("outer", "steps", 0),
    ("outer", "scope", "everything"),
    ("outer", "bogus", 1),
    ("objective", "alpha", -1.0),
    ("data", "batch_size", "eight"),
])
def test_invalid_hardening_config_names_section_and_field(env, section, field, value):
    """A config the CLI would refuse is a 400 naming ``config.section.field``; nothing is queued."""
    config = alignment_config()
    config[section][field] = value
    r = env.client.post("/v1/alignments", headers=env.headers("op"), json={"name": "bad", "config": config})
    assert r.status_code == 400 and error(r)["field"] == f"config.{section}.{field}"
    assert error(r)["message"].startswith(f"config.{section}.{field} ")
    assert env.dispatcher.alignments == [] and env.count(AlignmentRun) == 0


def test_hardening_run_needs_a_name(env):
    """A run without a name is refused (400, field name) and nothing is created."""
    r = env.client.post("/v1/alignments", headers=env.headers("op"), json={"config": alignment_config()})
    assert r.status_code == 400 and error(r)["field"] == "name" and env.count(AlignmentRun) == 0
