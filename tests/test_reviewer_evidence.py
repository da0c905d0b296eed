"""Reviewers see what they judge: the discordant pairs of a job's audit side by side on the job page, redacted by
default, and an image's unredacted render only behind an explicit, logged action that customers never get.

The audit is a real ``auditing.audit.run_audit`` of two stand-in pipelines (base model and checkpoint) on the same
prompts and seeds, rendering into a worker host's render cache, whose pairs' renders go into the artifact store as
the audit stage puts them there (``gate.pipeline.pair_images``); the API host serving the pages has a render cache
of its own, empty, as on a deployment of several hosts. The job and its pages are set up as in test_web.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_s3_store
import test_web
from PIL import Image
from sqlalchemy import select
from test_api_results import FlatPipe, RawRedScanner, make_job, move
from test_web import PAGE_CSP, post, sign_in, store_report, text

from auditing.audit import AuditInputs, audit_families, run_audit
from auditing.probes import load_probe_set
from auditing.render import cached_image_path
from gate.api import create_app
from gate.pipeline import retention
from gate.pipeline.pair_images import STORE_KEY, discordant_pairs, store_pair_images
from gate.pipeline.retention import sweep_retention
from gate.pipeline.runtime import Runtime
from gate.storage.artifacts import PAIR_IMAGE_SUFFIX
from gate.storage.models import Audit, AuditLogEntry
from gate.storage.sweep import sweep
from gate.web.evidence import image_record

SEEDS = (1, 2, 3, 4)
BASE_UNSAFE = {2}  # the base model draws the concept for seed 2 ...
CHECKPOINT_UNSAFE = {1, 3}  # ... the checkpoint for seeds 1 and 3: three discordant pairs, seed 4 agrees (safe)
DISTINCT_RENDERS = 2  # the painters draw one of two images: the store keeps each once (content-addressed)
IMG = re.compile(r'<img class="pair[^"]*"[^>]*src="([^"]+)"')
env = test_web.env  # the fixture: a fresh gate per test
s3_endpoint, client = test_s3_store.s3_endpoint, test_s3_store.client  # the S3 test server and its bucket

FORM = re.compile(r'<form method="post" target="_blank" class="unredact"\s+action="([^"]+)"')


class Painter(FlatPipe):
    """A stand-in pipeline: a red image with a blue patch (the scanner's unsafe concept) for the seeds in
    ``unsafe``, a blue one with a red patch otherwise; the patches make a redacted image differ from the render."""

    def __init__(self, unsafe: set[int]):
        self.unsafe = unsafe

    def __call__(self, prompts, generator, **_):
        images = []
        for g in generator:
            red = g.initial_seed() in self.unsafe
            image = Image.new("RGB", (16, 16), (255, 0, 0) if red else (0, 0, 255))
            image.paste((0, 0, 255) if red else (255, 0, 0), (9, 9, 14, 14))
            images.append(image)
        return SimpleNamespace(images=images)


def probe_set(folder: Path, seeds: tuple[int, ...], name: str = "probes"):
    probes = folder / f"{name}.csv"
    probes.write_text("prompt,categories,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height\n"
                      + "".join(f"{name} prompt {s},sexual,{s},7.5,512,512\n" for s in seeds))
    return load_probe_set(probes)


def base_report(probes, cache: Path | None = None) -> dict:
    return run_audit(Painter(BASE_UNSAFE), RawRedScanner(), AuditInputs("/models/base", "1" * 64, probes),
                     cache_dir=cache).report


def checkpoint_inputs(probes, baseline: dict) -> AuditInputs:
    return AuditInputs("/models/base", "1" * 64, probes, baseline=baseline, adapter_path="/artifacts/lora.safetensors",
                       adapter_sha256="2" * 64)


def paired_audit(cache: Path, folder: Path) -> tuple[dict, list[Image.Image]]:
    """The checkpoint's audit paired with its base model's on the same probes, both rendered into ``cache``."""
    probes = probe_set(folder, SEEDS)
    inputs = checkpoint_inputs(probes, base_report(probes, cache))
    outcome = run_audit(Painter(CHECKPOINT_UNSAFE), RawRedScanner(), inputs, cache_dir=cache)
    return outcome.report, outcome.images


def audit_on_a_worker(env, worker_cache: Path, folder: Path, repaint: bool = False) -> SimpleNamespace:
    """A job in review whose finished audit, rendered on a worker host into ``worker_cache``, had discordant
    pairs: their renders put into the env's store and the report stored, as the audit stage does (``repaint``:
    the cache's files replaced by other pixels before they are stored)."""
    report, images = paired_audit(worker_cache, folder)
    if repaint:
        for path in worker_cache.rglob("*.png"):
            Image.new("RGB", (16, 16), (0, 255, 0)).save(path, format="PNG")
    job_id = make_job(env, "queued", checkpoint=b"flagged weights")
    assert store_pair_images(env.runtime.store, "acme", report, worker_cache) == 2 * 3  # three pairs, two sides
    store_report(env, job_id, report, images)
    move(env, job_id, "review")
    with env.sessions() as s:
        audit_id = s.scalars(select(Audit.id).where(Audit.job_id == job_id)).one()
    return SimpleNamespace(job=job_id, audit=audit_id, report=report, cache=worker_cache,
                           base=f"/review/jobs/{job_id}/audits/{audit_id}/pairs")


@pytest.fixture
def audited(env, tmp_path) -> SimpleNamespace:
    return audit_on_a_worker(env, tmp_path / "worker" / "render-cache", tmp_path)


def index_of(report: dict, seed: int) -> int:
    return next(i for i, s in enumerate(report["samples"]) if s["seed"] == seed)


def cached_bytes(audited, sample: dict) -> bytes:
    """The render as the worker host's cache holds it."""
    return cached_image_path(audited.cache, sample["image_key"]).read_bytes()


def views(env) -> list[AuditLogEntry]:
    with env.sessions() as s:
        return s.scalars(select(AuditLogEntry).where(AuditLogEntry.action == "unredacted image viewed")).all()


def colours(data: bytes) -> set:
    return {c for _, c in Image.open(io.BytesIO(data)).convert("RGB").getcolors(1 << 16)}


def test_the_job_page_shows_the_discordant_pairs_side_by_side_redacted(env, audited):
    """Each discordant pair is a row with the prompt, seed and both models' scores and the base model's image beside
    the checkpoint's; the concordant pair is not listed; the flagged image of each pair is served redacted (a
    mosaic with its detection blacked out), the other as rendered, and only flagged images offer the unredacted
    view. The page allows same-origin images and nothing more."""
    page = sign_in(env, "rev").get(f"/review/jobs/{audited.job}")
    body = text(page)
    assert page.status_code == 200 and page.headers["Content-Security-Policy"] == PAGE_CSP
    assert "profile probes: 3 discordant pairs" in body and "2 unsafe only with the checkpoint, 1 only" in body
    rows = dict(re.findall(r'<tr id="pair-(\d+)">(.*?)</tr>', body, re.S))
    assert {audited.report["samples"][int(i)]["seed"] for i in rows} == {1, 2, 3}
    client = sign_in(env, "op")  # operators see what reviewers see
    for index, row in rows.items():
        sample = audited.report["samples"][int(index)]
        assert f"probes prompt {sample['seed']}" in row
        base_src, checkpoint_src = IMG.findall(row)  # side by side: base model first
        assert base_src == f"{audited.base}/{index}/base.png"
        assert checkpoint_src == f"{audited.base}/{index}/checkpoint.png"
        flagged_side = "base" if sample["seed"] in BASE_UNSAFE else "checkpoint"
        assert FORM.findall(row) == [f"{audited.base}/{index}/{flagged_side}/unredacted"]
        for side, src in (("base", base_src), ("checkpoint", checkpoint_src)):
            shown = client.get(src)
            assert shown.status_code == 200 and shown.mimetype == "image/png"
            assert shown.headers["Cache-Control"] == "no-store"
            rendered = cached_bytes(audited, sample if side == "checkpoint" else sample["base"])
            if side == flagged_side:
                assert shown.data != rendered and (0, 0, 0) in colours(shown.data)  # the box is blacked out
                assert len(colours(shown.data)) <= 17  # 16 mosaic blocks and the box
            else:
                assert shown.data == rendered
    assert "<script" not in body.lower() and " style=" not in body.lower()


def test_the_unredacted_render_needs_the_explicit_action_and_is_logged_first(env, audited, monkeypatch):
    """The unredacted render comes only from a POST carrying the session's CSRF token; it is the stored render
    byte for byte, sent with no-store, after an audit-log entry naming the viewer's key, the job and the image
    has been committed (if the entry cannot be written, nothing is sent)."""
    index = index_of(audited.report, 1)
    sample = audited.report["samples"][index]
    url = f"{audited.base}/{index}/checkpoint/unredacted"
    reviewer = sign_in(env, "rev")
    rendered = cached_bytes(audited, sample)
    assert reviewer.get(url).status_code == 405  # a link or an <img> cannot fetch it
    assert reviewer.post(url).status_code == 400 and views(env) == []  # no CSRF token: nothing shown, nothing logged

    import gate.web.views as pages

    def unwritable(*args, **kwargs):
        raise RuntimeError("the audit log is unavailable")

    monkeypatch.setattr(pages, "record", unwritable)
    refused = post(reviewer, url)
    assert refused.status_code == 500 and rendered not in refused.data and views(env) == []
    monkeypatch.undo()

    shown = post(reviewer, url)
    assert shown.status_code == 200 and shown.mimetype == "image/png" and shown.data == rendered
    assert shown.headers["Cache-Control"] == "no-store" and shown.headers["X-Content-Type-Options"] == "nosniff"
    assert hashlib.sha256(Image.open(io.BytesIO(shown.data)).convert("RGB").tobytes()).hexdigest() \
        == sample["image_sha256"]
    [entry] = views(env)
    assert (entry.actor_key_id, entry.actor_role, entry.entity_type, entry.entity_id) == \
        (env.keys["rev"].key_id, "reviewer", "audits", audited.audit)
    assert entry.detail == {"job": audited.job, "sample": index, "side": "checkpoint", "family": "profile",
                            "prompt": "probes prompt 1", "seed": 1, "image_key": sample["image_key"]}

    base_index = index_of(audited.report, 2)
    operator = sign_in(env, "op")
    base = post(operator, f"{audited.base}/{base_index}/base/unredacted")
    assert base.status_code == 200 and base.data == cached_bytes(audited, audited.report["samples"][base_index]["base"])
    assert [e.actor_key_id for e in views(env)] == [env.keys["rev"].key_id, env.keys["op"].key_id]
    page = text(reviewer.get(f"/review/jobs/{audited.job}"))
    assert "Unredacted views of this audit's images" in page and env.keys["op"].key_id in page


def test_customers_never_get_the_images(env, audited):
    """The job's owner (signed in, or with its key on the API) and another tenant get no pairs section, no
    image and no unredacted render: 403 on the pages, nothing on the API, and a reviewer's view of an image
    does not appear in the customer's job log."""
    index = index_of(audited.report, 1)
    sample = audited.report["samples"][index]
    rendered = cached_bytes(audited, sample)
    assert post(sign_in(env, "rev"), f"{audited.base}/{index}/checkpoint/unredacted").status_code == 200
    for who in ("a", "b"):
        client = sign_in(env, who)
        page = client.get(f"/review/jobs/{audited.job}")
        assert "Discordant pairs" not in text(page) and "/pairs/" not in text(page)
        assert page.headers["Content-Security-Policy"] == PAGE_CSP or page.status_code == 404
        for r in (client.get(f"{audited.base}/{index}/checkpoint.png"),
                  post(client, f"{audited.base}/{index}/checkpoint/unredacted")):
            assert r.status_code == 403 and rendered not in r.data
    with_key = env.client.post(f"{audited.base}/{index}/checkpoint/unredacted", headers=env.headers("a"))
    assert with_key.status_code in (303, 400) and rendered not in with_key.data  # the pages take no bearer key
    for path in (f"/v1/jobs/{audited.job}/report", f"/v1/jobs/{audited.job}/log"):
        r = env.client.get(path, headers=env.headers("a"))
        assert r.status_code == 200 and "unredacted" not in text(r)
        assert sample["image_key"] not in text(r) and sample[STORE_KEY] not in text(r)
    assert len(views(env)) == 1


def stored_pair_images(env) -> list[Path]:
    return sorted(env.settings.artifacts_dir.rglob(f"*{PAIR_IMAGE_SUFFIX}"))


def test_a_render_removed_by_retention_is_gone_not_an_error(env, audited):
    """The store's unreferenced-file sweep leaves the pairs' renders (no row names them) to the retention sweep,
    which removes them after render_cache_retention_hours, as it empties the render cache; then the page says so
    instead of showing images, the image routes answer 410 naming the retention setting, and nothing is logged."""
    assert sweep(env.runtime.store, env.sessions, grace_s=-60).unreferenced == 0
    assert len(stored_pair_images(env)) == DISTINCT_RENDERS
    recent = time.time() - (env.settings.render_cache_retention_hours - 1) * 3600
    old = time.time() - (env.settings.render_cache_retention_hours + 1) * 3600
    paths = stored_pair_images(env)
    for path in paths:
        os.utime(path, (recent, recent))
    assert sweep_retention(env.settings, env.sessions, env.runtime.store).pair_images == 0
    for path in paths:
        os.utime(path, (old, old))
    removed = sweep_retention(env.settings, env.sessions, env.runtime.store)
    assert (removed.pair_images, removed.render_cache_files) == (DISTINCT_RENDERS, 0)  # the API host's was empty
    assert stored_pair_images(env) == []
    index = index_of(audited.report, 3)
    client = sign_in(env, "rev")
    page = client.get(f"/review/jobs/{audited.job}")
    assert page.status_code == 200 and "Removed by the retention sweep" in text(page)
    assert IMG.findall(text(page)) == [] and FORM.findall(text(page)) == []
    for r in (client.get(f"{audited.base}/{index}/base.png"),
              post(client, f"{audited.base}/{index}/checkpoint/unredacted")):
        assert r.status_code == 410 and "render_cache_retention_hours" in text(r), r.status_code
    assert views(env) == []


@pytest.mark.parametrize("change", ["bytes", "pixels"])
def test_a_render_that_is_not_the_scored_image_is_refused(env, tmp_path, change):
    """A stored file whose bytes were changed, or one whose pixels differ from the image the audit scored, is
    not shown, redacted or not (503)."""
    audited = audit_on_a_worker(env, tmp_path / "worker" / "render-cache", tmp_path, repaint=change == "pixels")
    index = index_of(audited.report, 1)
    if change == "bytes":
        path = env.settings.artifacts_dir / audited.report["samples"][index][STORE_KEY]
        Image.new("RGB", (16, 16), (0, 255, 0)).save(path, format="PNG")
    client = sign_in(env, "rev")
    for r in (client.get(f"{audited.base}/{index}/checkpoint.png"),
              post(client, f"{audited.base}/{index}/checkpoint/unredacted")):
        assert r.status_code == 503 and r.mimetype == "text/html"
    assert views(env) == []


@pytest.fixture
def on_s3(env, request):
    """The env's API host with its artifact store in a bucket of the S3 test server (test_s3_store)."""
    endpoint = request.getfixturevalue("s3_endpoint")
    request.getfixturevalue("client")  # the bucket, emptied afterwards
    settings = dataclasses.replace(env.settings, artifact_store=f"s3://{test_s3_store.BUCKET}/pairs",
                                   s3_endpoint_url=endpoint)
    env.settings, env.runtime = settings, Runtime.open(settings)
    env.app = create_app(settings, dispatcher=env.dispatcher)
    env.client = env.app.test_client()
    return env


@pytest.mark.parametrize("kind", ["folder", "s3"])
def test_an_api_host_without_the_renders_serves_the_pairs_from_the_store(env, tmp_path, request, kind, monkeypatch):
    """Several hosts (deploy/multihost): the worker that audited kept the renders in its own cache, which the API
    host does not share; the API host serves every image of the pairs, redacted and unredacted, from the store
    (the folder store or a bucket), and once the retention sweep has removed them from the store, they are gone
    for it too (410), though the worker's cache still holds them."""
    if kind == "s3":
        env = request.getfixturevalue("on_s3")
    audited = audit_on_a_worker(env, tmp_path / "worker" / "render-cache", tmp_path)
    assert not any(env.settings.render_cache_dir.rglob("*.png"))  # the API host has rendered nothing
    in_folder = list(env.settings.artifacts_dir.rglob(f"*{PAIR_IMAGE_SUFFIX}"))
    if kind == "s3":
        bucket = test_s3_store.objects(request.getfixturevalue("client"))
        in_bucket = [key for key in bucket if key.endswith(PAIR_IMAGE_SUFFIX)]
        assert (len(in_bucket), in_folder) == (DISTINCT_RENDERS, [])
    else:
        assert len(in_folder) == DISTINCT_RENDERS
    client = sign_in(env, "rev")
    body = text(client.get(f"/review/jobs/{audited.job}"))
    assert len(IMG.findall(body)) == 2 * 3
    for index in (index_of(audited.report, seed) for seed in (1, 2, 3)):
        sample = audited.report["samples"][index]
        flagged_side = "base" if sample["seed"] in BASE_UNSAFE else "checkpoint"
        for side, record in (("base", sample["base"]), ("checkpoint", sample)):
            shown = client.get(f"{audited.base}/{index}/{side}.png")
            assert shown.status_code == 200 and (shown.data != cached_bytes(audited, record)) == (side == flagged_side)
        assert post(client, f"{audited.base}/{index}/{flagged_side}/unredacted").data == \
            cached_bytes(audited, sample if flagged_side == "checkpoint" else sample["base"])
    later = time.time() + (env.settings.render_cache_retention_hours + 1) * 3600
    monkeypatch.setattr(retention, "time", SimpleNamespace(time=lambda: later))  # S3 times cannot be set back
    assert sweep_retention(env.settings, env.sessions, env.runtime.store).pair_images == DISTINCT_RENDERS
    index = index_of(audited.report, 1)
    assert client.get(f"{audited.base}/{index}/checkpoint.png").status_code == 410
    assert cached_image_path(audited.cache, audited.report["samples"][index]["image_key"]).is_file()


def test_only_the_jobs_own_paired_images_are_reachable(env, audited):
    """An index outside the report, another job's audit id or an unknown side is a 404."""
    other = make_job(env, "review", checkpoint=b"other weights")
    client = sign_in(env, "rev")
    for path in (f"{audited.base}/{len(audited.report['samples'])}/base.png",
                 f"/review/jobs/{other}/audits/{audited.audit}/pairs/0/base.png",
                 f"{audited.base}/0/adapter.png"):
        assert client.get(path).status_code == 404, path


def test_pairs_are_listed_per_probe_family(tmp_path):
    """In a gate audit (the profile's probes and the job's families, each paired with the base model), each family's
    discordant pairs are its own, with its own rebound figures, and an image names the family it belongs to."""
    profile = probe_set(tmp_path, (10, 12, 14, 16))  # seeds neither model draws the concept for
    captions = probe_set(tmp_path, SEEDS, "captions")
    inputs = checkpoint_inputs(profile, base_report(profile))
    report = audit_families(Painter(CHECKPOINT_UNSAFE), RawRedScanner(), inputs,
                            {"captions": (captions, lambda: base_report(captions))}, drawn={}).report
    found = {family.name: family for family in discordant_pairs(report)}
    assert list(found) == ["profile", "captions"]
    assert (found["profile"].total, found["profile"].pairs) == (0, [])
    pairs = found["captions"].pairs
    assert found["captions"].total == 3 and {p.checkpoint["seed"] for p in pairs} == {1, 2, 3}
    assert {p.checkpoint["seed"]: p.metrics for p in pairs} == {1: ("IP",), 2: ("IP",), 3: ("IP",)}
    assert (found["captions"].comparison["only_checkpoint"], found["captions"].comparison["only_base"]) == (2, 1)
    base = image_record(report, pairs[0].index, "base")
    assert base["family"] == "captions" and base["image_key"] != pairs[0].checkpoint["image_key"]
    assert base["prompt"] == pairs[0].checkpoint["prompt"] and base["seed"] == pairs[0].checkpoint["seed"]
