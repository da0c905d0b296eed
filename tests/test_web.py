"""The reviewer pages (``gate.web``) through Flask's test client: signing in and out, the session cookie,
CSRF, who sees and may do what, decisions with a required reason, downloads, redaction and security headers.

Jobs are set up as in test_api_results (created through the API, moved along their life cycle as the
workers would); the real pipeline and a real browser are tests/test_browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from datetime import timedelta

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select, update
from test_api import Env, good_zip
from test_api_results import CSP as REPORT_CSP
from test_api_results import MISSING_ID, add_audit, make_job, move, status_of, undisclosed
from werkzeug.http import parse_options_header

from auditing.report import render_html
from gate.api import create_app
from gate.auth import create_key, revoke_key
from gate.storage.audit_log import SYSTEM
from gate.storage.models import Artifact, Audit, AuditLogEntry, Job, Review, Verdict, WebSession, utcnow

TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
PAGE_CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; frame-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")
DECISION_FORM = 'action="/review/jobs/{}/decision"'


@pytest.fixture
def env(tmp_path, migrated) -> Env:
    return Env(tmp_path, migrated)


def token(response) -> str:
    return TOKEN.search(response.get_data(as_text=True)).group(1)


def sign_in(env: Env, who: str, **request):
    """A test client signed in with ``who``'s key through the form."""
    client = env.app.test_client()
    r = client.post("/review/login", data={"key": env.keys[who].key, "csrf_token": token(client.get("/review/login"))},
                    **request)
    assert r.status_code == 303, r.get_data(as_text=True)
    return client


def post(client, path: str, **form):
    """A form post carrying the session's CSRF token (read from a page, as a browser would have it)."""
    return client.post(path, data={"csrf_token": token(client.get("/review/jobs")), **form})


def session_of(env: Env, client) -> dict:
    """The session row the client's cookie names (its id is the sha256 of the cookie): the key id once signed in
    and the CSRF token; {} when there is none."""
    cookie = client.get_cookie("ftgate_review", path="/review")
    with env.sessions() as s:
        row = s.get(WebSession, hashlib.sha256(cookie.value.encode()).hexdigest()) if cookie else None
    if row is None:
        return {}
    return {"csrf_token": row.csrf_token} | ({"key_id": row.key_id} if row.key_id else {})


def text(response) -> str:
    return response.get_data(as_text=True)


# --- signing in and out --------------------------------------------------------------------------------------

def test_sign_in_sets_a_strict_cookie_that_holds_no_key(env):
    """The form signs in; the cookie is HttpOnly, SameSite=Strict, limited to /review, Secure over HTTPS, and
    holds only a random session id; the server-side row holds the key's id and a CSRF token, both replaced at
    sign-in."""
    client = env.app.test_client()
    assert client.get("/review/queue").headers["Location"] == "/review/login?next=/review/queue"
    form = client.get("/review/login")
    assert form.status_code == 200 and 'type="password"' in text(form)
    before, anonymous = token(form), client.get_cookie("ftgate_review", path="/review").value
    r = client.post("/review/login", data={"key": env.keys["rev"].key, "csrf_token": before})
    assert r.status_code == 303 and r.headers["Location"] == "/review/"
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("ftgate_review=")
    flags = {part.strip().split("=")[0]: part.strip() for part in cookie.split(";")[1:]}
    assert {"HttpOnly", "Path", "SameSite"} <= set(flags) and "Secure" not in flags  # plain http here
    assert flags["Path"] == "Path=/review" and flags["SameSite"] == "SameSite=Strict"
    secret = env.keys["rev"].key.rsplit("_", 1)[1]
    assert secret not in cookie and env.keys["rev"].key not in cookie and env.keys["rev"].key_id not in cookie
    signed = session_of(env, client)
    assert set(signed) == {"key_id", "csrf_token"} and signed["key_id"] == env.keys["rev"].key_id
    assert signed["csrf_token"] != before
    assert client.get_cookie("ftgate_review", path="/review").value != anonymous  # a planted id is worthless
    with env.sessions() as s:
        assert s.get(WebSession, hashlib.sha256(anonymous.encode()).hexdigest()) is None
    assert client.get("/review/").headers["Location"] == "/review/queue"
    assert sign_in(env, "a").get("/review/").headers["Location"] == "/review/jobs"

    https = env.app.test_client()
    r = https.post("/review/login", base_url="https://gate.example",
                   data={"key": env.keys["rev"].key,
                         "csrf_token": token(https.get("/review/login", base_url="https://gate.example"))})
    assert r.status_code == 303 and "; Secure" in r.headers["Set-Cookie"]


@pytest.mark.parametrize("form", [{"key": "ftg_nonsense"}, {"key": ""}, {}], ids=["malformed", "empty", "none"])
def test_a_bad_key_does_not_sign_in(env, form):
    client = env.app.test_client()
    r = client.post("/review/login", data={"csrf_token": token(client.get("/review/login")), **form})
    assert r.status_code == 401 and "not valid" in text(r)
    assert "key_id" not in session_of(env, client)
    assert client.get("/review/jobs").status_code == 303


def test_a_key_in_the_url_is_ignored(env):
    """Keys are read from the posted form only, never from the query string."""
    client = env.app.test_client()
    r = client.post(f"/review/login?key={env.keys['rev'].key}", data={"csrf_token": token(client.get("/review/login"))})
    assert r.status_code == 401 and "key_id" not in session_of(env, client)


def test_sign_in_returns_to_the_page_asked_for_and_only_to_these_pages(env):
    """A link from a ticket leads through the form back to the job; a ``next`` that points anywhere but
    these pages (another site, the API) is dropped."""
    job_id = make_job(env, "review", checkpoint=b"w")
    client = env.app.test_client()
    form = client.get(f"/review/jobs/{job_id}", follow_redirects=True)
    assert f'name="next" value="/review/jobs/{job_id}"' in text(form)
    r = client.post("/review/login", data={"key": env.keys["rev"].key, "csrf_token": token(form),
                                           "next": f"/review/jobs/{job_id}"})
    assert r.headers["Location"] == f"/review/jobs/{job_id}"
    for elsewhere in ("https://evil.example/review/", "//evil.example/review/", "/v1/jobs", "/\\evil.example/review/",
                      "javascript:alert(1)"):
        client = env.app.test_client()
        assert 'name="next"' not in text(client.get("/review/login", query_string={"next": elsewhere}))
        r = client.post("/review/login", data={"key": env.keys["rev"].key, "csrf_token": token(client.get(
            "/review/login")), "next": elsewhere})
        assert r.headers["Location"] == "/review/", elsewhere


def test_revoking_the_key_ends_its_sessions(env):
    client = sign_in(env, "rev")
    assert client.get("/review/queue").status_code == 200
    with env.sessions() as s:
        revoke_key(s, env.keys["rev"].key_id, SYSTEM)
        s.commit()
    r = client.get("/review/queue")
    assert r.status_code == 303 and r.headers["Location"].startswith("/review/login")


def test_an_expired_session_is_refused(env):
    """Expiry is checked on the server's row: after the session's lifetime the cookie is worthless."""
    client = sign_in(env, "rev")
    with env.sessions() as s:
        row = s.scalars(select(WebSession).where(WebSession.key_id == env.keys["rev"].key_id)).one()
        assert timedelta(hours=7.9) < row.expires_at - utcnow() <= timedelta(hours=8)
        row.expires_at = utcnow() - timedelta(seconds=1)
        s.commit()
    assert client.get("/review/queue").status_code == 303


def test_sign_out_needs_the_token_and_ends_the_session_for_every_copy_of_the_cookie(env):
    """Sign-out deletes the session's row: a copy of the cookie taken before (from a shared machine, a proxy's
    log) signs nobody in afterwards."""
    client = sign_in(env, "rev")
    copy = env.app.test_client()
    copy.set_cookie("ftgate_review", client.get_cookie("ftgate_review", path="/review").value, path="/review")
    assert copy.get("/review/queue").status_code == 200  # the copy works while the session lives
    assert client.post("/review/logout").status_code == 400
    assert client.get("/review/queue").status_code == 200  # still signed in
    r = post(client, "/review/logout")
    assert r.status_code == 303 and r.headers["Location"] == "/review/login"
    assert "ftgate_review=;" in r.headers["Set-Cookie"]
    assert client.get("/review/queue").status_code == 303 and session_of(env, client) == {}
    assert copy.get("/review/queue").status_code == 303 and session_of(env, copy) == {}
    with env.sessions() as s:
        assert s.scalars(select(WebSession).where(WebSession.key_id == env.keys["rev"].key_id)).all() == []


# --- CSRF ----------------------------------------------------------------------------------------------------

def test_posts_without_the_sessions_csrf_token_are_refused(env):
    """Sign-in and decisions need the token of the browser's own session: none, a wrong one, or one from
    another session is a 400 that changes nothing."""
    client = env.app.test_client()
    client.get("/review/login")
    r = client.post("/review/login", data={"key": env.keys["rev"].key})
    assert r.status_code == 400 and "key_id" not in session_of(env, client)

    job_id = make_job(env, "review", checkpoint=b"flagged weights")
    reviewer, other = sign_in(env, "rev"), sign_in(env, "rev")
    foreign = token(other.get("/review/jobs"))
    for form in ({}, {"csrf_token": "x" * 43}, {"csrf_token": foreign}, {"csrf_token": "é"}):
        r = reviewer.post(f"/review/jobs/{job_id}/decision", data={"decision": "approve", "reason": "ok", **form})
        assert r.status_code == 400, form
    assert status_of(env, job_id) == "review" and env.count(Review) == 0


# --- who sees what ---------------------------------------------------------------------------------------------

WHO = ("a", "b", "rev", "op")
# page -> expected status for: the job's owner (a), another customer (b), a reviewer, an operator.
MATRIX = {
    "queue": dict(a=403, b=403, rev=200, op=200),
    "jobs": dict(a=200, b=200, rev=200, op=200),
    "job": dict(a=200, b=404, rev=200, op=200),
    "report": dict(a=200, b=404, rev=200, op=200),
    "released artifact": dict(a=200, b=404, rev=200, op=200),
    "withheld artifact": dict(a=403, b=404, rev=403, op=403),
    "decision": dict(a=403, b=403, rev=303, op=403),
}


@pytest.mark.parametrize("who", WHO)
def test_roles_and_tenants(env, who):
    """Each page answers each caller as MATRIX says. Another tenant's job is exactly as missing as a missing
    one; only reviewers get the decision form; a refused decision changes nothing."""
    in_review = make_job(env, "review", checkpoint=b"flagged weights")
    released = make_job(env, "released", checkpoint=b"released weights")
    theirs = make_job(env, "queued", who="b")
    client = sign_in(env, who)
    paths = {"queue": "/review/queue", "jobs": "/review/jobs", "job": f"/review/jobs/{in_review}",
             "report": f"/review/jobs/{in_review}/report", "released artifact": f"/review/jobs/{released}/artifact",
             "withheld artifact": f"/review/jobs/{in_review}/artifact"}
    for page, path in paths.items():
        r = client.get(path)
        assert r.status_code == MATRIX[page][who], (page, r.status_code)
    r = post(client, f"/review/jobs/{in_review}/decision", decision="approve", reason="fine")
    assert r.status_code == MATRIX["decision"][who]
    assert status_of(env, in_review) == ("released" if who == "rev" else "review")

    listed = text(client.get("/review/jobs"))
    assert (released in listed) == (who != "b") and (theirs in listed) == (who != "a")
    if who == "b":
        missing, hidden = client.get(f"/review/jobs/{MISSING_ID}"), client.get(f"/review/jobs/{in_review}")
        assert hidden.data == missing.data and in_review.encode() not in hidden.data
    if who in ("a", "op"):
        page = text(client.get(f"/review/jobs/{in_review}"))
        assert DECISION_FORM.format(in_review) not in page and "<textarea" not in page


def test_anonymous_callers_are_sent_to_sign_in(env):
    job_id = make_job(env, "released", checkpoint=b"released weights")
    client = env.app.test_client()
    for path in ("/review/", "/review/queue", "/review/jobs", f"/review/jobs/{job_id}", f"/review/jobs/{job_id}/report",
                 f"/review/jobs/{job_id}/artifact"):
        r = client.get(path)
        assert r.status_code == 303 and r.headers["Location"] == f"/review/login?next={path}", path
        assert b"released weights" not in r.data


def test_queue_filters(env):
    """The queue holds jobs in review only, every tenant's, and narrows by tenant, method, base model and time
    waiting; a bad filter value is a 400 naming the field."""
    a_lora = make_job(env, "review", checkpoint=b"w1")
    b_dreambooth = make_job(env, "review", who="b", method="dreambooth", checkpoint=b"w2")
    not_waiting = make_job(env, "released", checkpoint=b"w3")
    with env.sessions() as s:
        s.execute(update(Job).where(Job.id == a_lora).values(updated_at=utcnow() - timedelta(hours=30)))
        s.commit()
    client = sign_in(env, "rev")

    def listed(query: str = "") -> set[str]:
        r = client.get(f"/review/queue{query}")
        assert r.status_code == 200, text(r)
        return {job for job in (a_lora, b_dreambooth, not_waiting) if job in text(r)}

    assert listed() == {a_lora, b_dreambooth}
    assert listed("?tenant=globex") == {b_dreambooth}
    assert listed("?method=lora") == {a_lora}
    assert listed(f"?base_model={env.base_model_id}&method=") == {a_lora, b_dreambooth}
    assert listed("?base_model=" + "f" * 32) == set()
    assert listed("?min_waiting_hours=24") == {a_lora}
    assert listed("?status=released") == {a_lora, b_dreambooth}  # the queue is the queue
    for query, field in (("?method=full", "method"), ("?min_waiting_hours=-1", "min_waiting_hours"),
                         ("?min_waiting_hours=nan", "min_waiting_hours"), ("?tenant=Not%20A%20Slug", "tenant")):
        r = client.get(f"/review/queue{query}")
        assert r.status_code == 400 and field in text(r), query


# --- decisions -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form, field", [
    ({"decision": "approve"}, "reason"),
    ({"decision": "approve", "reason": ""}, "reason"),
    ({"decision": "approve", "reason": "  \n\t "}, "reason"),
    ({"decision": "reject", "reason": "r" * 2001}, "reason"),
    ({"reason": "fine"}, "decision"),
    ({"decision": "release", "reason": "fine"}, "decision"),
])
def test_a_decision_needs_a_decision_and_a_reason(env, form, field):
    """The shared rules (gate.api.reviews.take_decision): refused with a 400 shown on the job page, what the
    reviewer wrote kept in the form, nothing changed."""
    job_id = make_job(env, "review", checkpoint=b"flagged weights")
    client = sign_in(env, "rev")
    r = post(client, f"/review/jobs/{job_id}/decision", **form)
    assert r.status_code == 400 and re.search(rf"\b{field} (must|is required)", text(r)), text(r)
    assert DECISION_FORM.format(job_id) in text(r)
    if form.get("reason", "").strip():
        assert form["reason"] in text(r)
    assert status_of(env, job_id) == "review" and env.count(Review) == 0


def test_approval_releases_the_checkpoint_for_the_browser_only_through_the_session_route(env):
    """Approve with a reason: the job page shows it released with the reason and a download; the download
    is the stored checkpoint; the API's artifact route still wants a bearer key; a second decision is a 409."""
    data = b"flagged but fine weights" * 40
    job_id = make_job(env, "review", checkpoint=data)
    reviewer, owner = sign_in(env, "rev"), sign_in(env, "a")
    assert owner.get(f"/review/jobs/{job_id}/artifact").status_code == 403
    reason = "Stop signs, not the concept: <b>false positive</b>"
    r = post(reviewer, f"/review/jobs/{job_id}/decision", decision="approve", reason=f"  {reason} ")
    assert r.status_code == 303 and r.headers["Location"] == f"/review/jobs/{job_id}"
    page = text(reviewer.get(f"/review/jobs/{job_id}"))
    assert 'id="job-status">released<' in page and f'href="/review/jobs/{job_id}/artifact"' in page
    assert "Stop signs, not the concept: &lt;b&gt;false positive&lt;/b&gt;" in page and reason not in page
    assert DECISION_FORM.format(job_id) not in page

    for client in (owner, reviewer):
        download = client.get(f"/review/jobs/{job_id}/artifact")
        assert download.status_code == 200 and download.data == data
        disposition, options = parse_options_header(download.headers["Content-Disposition"])
        assert disposition == "attachment" and options["filename"] == "pytorch_lora_weights.safetensors"
    cookie = owner.get_cookie("ftgate_review", path="/review").value
    api = env.app.test_client().get(f"/v1/jobs/{job_id}/artifact", headers={"Cookie": f"ftgate_review={cookie}"})
    assert api.status_code == 401 and data not in api.data  # the session is no API key

    with env.sessions() as s:
        review = s.scalars(select(Review).where(Review.job_id == job_id)).one()
        entry = s.scalars(select(AuditLogEntry).where(AuditLogEntry.entity_id == job_id)
                          .order_by(AuditLogEntry.id.desc())).first()
    assert (review.decision, review.reason, review.reviewer_key_id) == ("approve", reason, env.keys["rev"].key_id)
    assert (entry.actor_key_id, entry.to_state, entry.reason) == (env.keys["rev"].key_id, "released", reason)

    again = post(reviewer, f"/review/jobs/{job_id}/decision", decision="reject", reason="changed my mind")
    assert again.status_code == 409 and status_of(env, job_id) == "released" and env.count(Review) == 1


def test_rejection_withholds_and_offers_no_download(env):
    job_id = make_job(env, "review", checkpoint=b"unsafe weights")
    reviewer = sign_in(env, "rev")
    decided = post(reviewer, f"/review/jobs/{job_id}/decision", decision="reject", reason="draws the concept")
    assert decided.status_code == 303
    page = text(sign_in(env, "a").get(f"/review/jobs/{job_id}"))
    assert 'id="job-status">withheld<' in page and "/artifact" not in page and "Withheld" in page
    r = reviewer.get(f"/review/jobs/{job_id}/artifact")
    assert r.status_code == 403 and b"unsafe weights" not in r.data


def test_a_reviewer_may_not_decide_on_its_own_tenants_job(env):
    """Separation of duties holds on the pages too: no form, a note saying why, and a refused post."""
    with env.sessions() as s:
        env.keys["inside"] = create_key(s, "acme", "reviewer", SYSTEM)
        s.commit()
    job_id = make_job(env, "review", checkpoint=b"acme's flagged weights")
    client = sign_in(env, "inside")
    page = text(client.get(f"/review/jobs/{job_id}"))
    assert DECISION_FORM.format(job_id) not in page and "may not decide on a job of its own tenant" in page
    r = post(client, f"/review/jobs/{job_id}/decision", decision="approve", reason="ours, fine")
    assert r.status_code == 403 and status_of(env, job_id) == "review" and env.count(Review) == 0


def test_the_artifact_route_refuses_a_corrupt_checkpoint(env):
    """The session download makes the API's sha256 check: a tampered file is a 503, never sent."""
    data = b"the released weights" * 50
    job_id = make_job(env, "released", checkpoint=data)
    with env.sessions() as s:
        key = s.scalars(select(Artifact.path).where(Artifact.job_id == job_id)).one()
    client = sign_in(env, "a")
    assert client.get(f"/review/jobs/{job_id}/artifact").data == data
    (env.settings.artifacts_dir / key).write_bytes(b"tampered" + data[8:])  # same size, other bytes
    r = client.get(f"/review/jobs/{job_id}/artifact")
    assert r.status_code == 503 and b"tampered" not in r.data and b"released weights" not in r.data


# --- flagged datasets ------------------------------------------------------------------------------------------

DATASET_FORM = 'action="/review/datasets/{}/decision"'


def test_flagged_datasets_wait_in_their_own_queue_for_a_reviewer(env):
    """Staff see every tenant's flagged datasets; only a reviewer of another tenant gets the decision form; a
    decision needs a reason (the API's rules), is logged with the reviewer's key, and takes the dataset off the
    queue; customers see their own dataset read-only, and another tenant's is missing."""
    dataset = env.upload(good_zip(n=20, red=1)).json["id"]
    page_path, queue_path = f"/review/datasets/{dataset}", "/review/datasets"
    reviewer, owner, other, operator = (sign_in(env, who) for who in ("rev", "a", "b", "op"))
    for client in (reviewer, operator):
        listed = client.get(queue_path)
        assert listed.status_code == 200 and f'href="{page_path}"' in text(listed)
        assert 'href="/review/datasets">Dataset queue<' in text(client.get("/review/jobs"))
    assert owner.get(queue_path).status_code == 403 and "Dataset queue" not in text(owner.get("/review/jobs"))
    missing, hidden = other.get(f"/review/datasets/{MISSING_ID}"), other.get(page_path)
    assert hidden.status_code == 404 and hidden.data == missing.data.replace(MISSING_ID.encode(), dataset.encode())
    for client in (owner, operator):
        page = text(client.get(page_path))
        assert 'id="dataset-status">flagged<' in page and DATASET_FORM.format(dataset) not in page
        assert "(1 of 20 images unsafe)" in page and "img0.png" in page
    assert post(owner, f"{page_path}/decision", decision="accept", reason="mine").status_code == 403

    page = text(reviewer.get(page_path))
    assert DATASET_FORM.format(dataset) in page and "Accept for training" in page
    refused = post(reviewer, f"{page_path}/decision", decision="accept", reason="  ")
    assert refused.status_code == 400 and "reason must not be blank" in text(refused)
    reason = "img0 is a stop sign: <b>a false positive</b>"
    r = post(reviewer, f"{page_path}/decision", decision="accept", reason=reason)
    assert r.status_code == 303 and r.headers["Location"] == page_path
    page = text(owner.get(page_path))
    assert 'id="dataset-status">accepted<' in page and "a stop sign: &lt;b&gt;a false positive&lt;/b&gt;" in page
    assert f'href="{page_path}"' not in text(reviewer.get(queue_path))
    with env.sessions() as s:
        entry = s.scalars(select(AuditLogEntry).where(AuditLogEntry.entity_id == dataset)
                          .order_by(AuditLogEntry.id.desc())).first()
    assert (entry.actor_key_id, entry.from_state, entry.to_state, entry.reason) == \
        (env.keys["rev"].key_id, "flagged", "accepted", reason)
    again = post(reviewer, f"{page_path}/decision", decision="reject", reason="changed my mind")
    assert again.status_code == 409 and "only flagged datasets take a decision" in text(again)
    assert env.job(dataset).status_code == 201


def test_a_reviewer_may_not_clear_its_own_tenants_dataset(env):
    with env.sessions() as s:
        env.keys["inside"] = create_key(s, "acme", "reviewer", SYSTEM)
        s.commit()
    dataset = env.upload(good_zip(n=20, red=1)).json["id"]
    client = sign_in(env, "inside")
    page = text(client.get(f"/review/datasets/{dataset}"))
    assert DATASET_FORM.format(dataset) not in page and "may not decide on a dataset of its own tenant" in page
    r = post(client, f"/review/datasets/{dataset}/decision", decision="accept", reason="ours, fine")
    assert r.status_code == 403 and "own tenant" in text(r)
    assert env.client.get(f"/v1/datasets/{dataset}", headers=env.headers("a")).json["status"] == "flagged"


# --- the job page's content --------------------------------------------------------------------------------------

def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def store_report(env: Env, job_id: str, report: dict, images: list[Image.Image]) -> None:
    """The job's finished audit with a page rendered by auditing.report, as the audit stage stores it (in the
    env's artifact store, whichever kind it is)."""
    store = env.runtime.store
    with env.sessions() as s:
        job = s.get(Job, job_id)
        page = store.put(job.tenant_id, io.BytesIO(render_html(report, images).encode()), suffix=".html")
        body = store.put(job.tenant_id, io.BytesIO(json.dumps(report).encode()), suffix=".json")
        audited = s.scalars(select(Artifact.sha256).where(Artifact.job_id == job.id)).one()
        audit = Audit(tenant_id=job.tenant_id, job_id=job.id, artifact_sha256=audited, report_path=body.key,
                      report_sha256=body.sha256,
                      html_path=page.key, decision="flag", reasons=["r"], finished_at=utcnow())
        s.add(audit)
        s.flush()
        s.add(Verdict(tenant_id=job.tenant_id, job_id=job.id, audit_id=audit.id, decision="flag", reasons=["r"],
                      policy_name="default", policy_version=1))
        s.commit()


def test_flagged_images_are_never_served_unredacted(env):
    """The pages serve the auditor's page as stored: each flagged image is a mosaic with its detection
    blacked out, and the unredacted thumbnail of a flagged image is in no page the browser can fetch."""
    samples = [{"prompt": f"probe {i}", "seed": i, "score": 0.9 if i < 2 else 0.1, "unsafe": i < 2,
                "raw": {"boxes": [[4, 4, 12, 12]] if i < 2 else []}} for i in range(4)]
    report = {"verdict": {"decision": "flag", "reasons": ["unsure"], "rule": "default v1: a rule",
                          "policy": {"max_unsafe_rate": 0.1}},
              "model": {"path": "/models/base", "sha256": "0" * 64}, "samples": samples}
    images = [noise(i) for i in range(4)]
    unredacted = re.findall(r'base64,([^"]+)"', render_html(
        {**report, "samples": [{**s, "unsafe": False} for s in samples]}, images))
    job_id = make_job(env, "queued", checkpoint=b"weights")
    store_report(env, job_id, report, images)
    move(env, job_id, "review")

    client = sign_in(env, "rev")
    frame = client.get(f"/review/jobs/{job_id}/report")
    assert frame.status_code == 200 and frame.mimetype == "text/html"
    encoded = re.findall(r'src="data:image/png;base64,([^"]+)"', text(frame))
    assert len(encoded) == len(samples)
    for sample, data in zip(samples, encoded, strict=True):
        shown = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        colours = shown.getcolors(1 << 16)
        assert (len(colours) <= 17) == sample["unsafe"], sample
        if sample["unsafe"]:
            assert (0, 0, 0) in {c for _, c in colours}  # the detection box is blacked out
    hidden = [t for sample, t in zip(samples, unredacted, strict=True) if sample["unsafe"]]
    shown = [t for sample, t in zip(samples, unredacted, strict=True) if not sample["unsafe"]]
    assert all(t in text(frame) for t in shown)  # unflagged images are there as rendered: the search can see them
    owner = sign_in(env, "a")
    pages = [frame, owner.get(f"/review/jobs/{job_id}/report"), owner.get(f"/review/jobs/{job_id}")]
    pages += [client.get(p) for p in ("/review/queue", "/review/jobs", f"/review/jobs/{job_id}")]
    for page in pages:
        assert page.status_code == 200 and not any(t in text(page) for t in hidden)


def test_customers_pages_show_the_verdict_and_figures_never_the_test(env):
    """The owner's job page, job list and report frame carry the verdict and the audit's figures but none of the
    real report's prompts, seeds, raw detector output or paths; the reviewer's frame is the auditor's page."""
    job_id = make_job(env, "queued", checkpoint=b"flagged weights")
    report, html = add_audit(env, job_id, "flag")
    move(env, job_id, "review")
    hidden = undisclosed(report)
    reviewer, owner = sign_in(env, "rev"), sign_in(env, "a")
    frame = reviewer.get(f"/review/jobs/{job_id}/report")
    assert frame.data == html and report["samples"][0]["prompt"] in text(frame)
    frame = owner.get(f"/review/jobs/{job_id}/report")
    assert frame.status_code == 200 and frame.headers["Content-Security-Policy"].startswith(REPORT_CSP)
    assert "FLAG — human review" in text(frame) and f"{report['metrics']['unsafe_rate']['rate']:.3f}" in text(frame)
    for page in (frame, owner.get(f"/review/jobs/{job_id}"), owner.get("/review/jobs")):
        assert page.status_code == 200 and [h for h in hidden if h in text(page)] == []


def test_job_page_shows_intake_training_settings_and_log(env):
    """The page carries the dataset's contamination figures as the intake recorded them, the training
    settings and the job's audit log, with customer text escaped."""
    job_id = make_job(env, "review", checkpoint=b"w")
    page = text(sign_in(env, "rev").get(f"/review/jobs/{job_id}"))
    assert "accepted" in page and "(0 of 3 images unsafe)" in page and "red 1: share of pure red pixels" in page
    assert '<tr><th>rank</th><td>4</td></tr>' in page and '<tr><th>steps</th><td>100</td></tr>' in page
    for action in ("created", "auditing → review"):
        assert action in page
    assert "No finished audit yet" not in page and f'src="/review/jobs/{job_id}/report"' in page


# --- headers -------------------------------------------------------------------------------------------------

def test_pages_send_a_strict_csp_and_carry_no_inline_code(env):
    job_id = make_job(env, "review", checkpoint=b"w")
    dataset = env.upload(good_zip(n=20, red=1)).json["id"]
    anonymous, client = env.app.test_client(), sign_in(env, "rev")
    pages = [anonymous.get("/review/login"), client.get("/review/queue"), client.get("/review/jobs"),
             client.get(f"/review/jobs/{job_id}"), client.get(f"/review/jobs/{MISSING_ID}"),
             client.get("/review/datasets"), client.get(f"/review/datasets/{dataset}")]
    for r in pages:
        assert r.headers["Content-Security-Policy"] == PAGE_CSP and r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["Cache-Control"] == "no-store" and r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        body = text(r).lower()
        assert "<script" not in body and "<style" not in body and " style=" not in body and "javascript:" not in body
    frame = client.get(f"/review/jobs/{job_id}/report")
    assert frame.headers["Content-Security-Policy"] == f"{REPORT_CSP}; frame-ancestors 'self'"
    assert frame.headers["X-Frame-Options"] == "SAMEORIGIN"
    css = anonymous.get("/review/static/web.css")
    assert css.status_code == 200 and css.mimetype == "text/css"


# --- sessions across processes ----------------------------------------------------------------------------------

def test_a_session_survives_a_restart_and_the_database_holds_no_cookie(env):
    """Sessions live in the database: a second app on it (another gunicorn worker, a restart) accepts the first
    one's cookie, and the row is keyed by the cookie's sha256, so a copy of the database signs nobody in."""
    client = sign_in(env, "rev")
    cookie = client.get_cookie("ftgate_review", path="/review").value
    restarted = create_app(env.settings, dispatcher=env.dispatcher).test_client()
    restarted.set_cookie("ftgate_review", cookie, path="/review")
    assert restarted.get("/review/queue").status_code == 200
    with env.sessions() as s:
        ids = s.scalars(select(WebSession.id)).all()
    assert hashlib.sha256(cookie.encode()).hexdigest() in ids and cookie not in ids
