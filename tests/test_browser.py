"""The reviewer pages in a real browser: Debian's headless Chromium, driven by Playwright.

A real flagged job: a customer uploads a shapes-world dataset (one image in ten shows the unsafe concept, so
the intake flags it), a reviewer accepts the dataset, the customer asks for a LoRA job, and the worker stages
run in process (train, audit against the base model's baseline, verdict) under a policy whose ceiling the
audit can neither confirm nor rule out, so the job waits in review. The app is served on 127.0.0.1 from a
thread; the browser signs in with the reviewer's key, opens the queue and the job, approves it with a reason,
sees the checkpoint become downloadable and downloads it; then the customer signs in and sees its job
read-only.

Screenshots of each step go to ``test-artifacts/browser/`` at the repository root.
"""

from __future__ import annotations

import base64
import hashlib
import io
import random
import re
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select
from test_api import RecordingDispatcher, detectors, served

from auditing.detectors.registry import load_detector
from auditing.shapes.cli import PRETRAINED_WORLD
from auditing.shapes.scene import Concept, make_scene, render
from auditing.verdict import VerdictPolicy
from gate.api import create_app
from gate.auth import create_key, ensure_tenant
from gate.pipeline import audit, intake, train, verdict
from gate.pipeline.runtime import Runtime
from gate.settings import Limits, Settings
from gate.storage.audit_log import SYSTEM
from gate.storage.db import upgrade
from gate.storage.models import Artifact, WebSession

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CONCEPT = "red triangle"
PROBES = "prompt\na red triangle\na blue circle\n"
IMAGES_PER_PROMPT = 8
# The audit's unsafe rate on these probes sits near this ceiling: neither bound decides, so the job is flagged.
POLICY = VerdictPolicy(name="browser-test", version=1, max_unsafe_rate=0.3)
TIMEOUT_MS = 15_000
VIEWPORT = {"width": 1280, "height": 900}

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (apt-get install "
                                                                "chromium); CI installs it")


def world_zip(images: int = 10) -> bytes:
    """A customer dataset of shapes-world images; the first one shows the unsafe concept."""
    rng, buf = random.Random(0), io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(images):
            scene = make_scene(rng, [Concept("red", "triangle") if i == 0 else Concept("blue", "square")])
            image = io.BytesIO()
            render(scene).save(image, format="PNG")
            zf.writestr(f"{i}.png", image.getvalue())
            zf.writestr(f"{i}.txt", scene.caption)
    return buf.getvalue()


class FlaggedGate:
    """The gate with one customer job that went through the real pipeline and was flagged."""

    def __init__(self, tmp_path: Path):
        state = tmp_path / "state"
        self.settings = Settings(state_dir=state, database_url=f"sqlite:///{tmp_path / 'ftgate.db'}", broker_url=None,
                                 artifacts_dir=state / "artifacts", verdict_policy=POLICY,
                                 limits=Limits(contamination_flag_ratio=0.05, contamination_reject_ratio=0.5))
        upgrade(self.settings.database_url)
        self.rt = Runtime.open(self.settings)
        scanner = load_detector("shapes", concept=CONCEPT)  # NudeNet's stand-in in the intake
        self.app = create_app(self.settings, dispatcher=RecordingDispatcher(
            intake=lambda dataset_id: intake.run(self.rt, dataset_id, "browser/intake", load=detectors(scanner))))
        with self.rt.sessions() as s:
            for tenant in ("acme", "platform"):
                ensure_tenant(s, tenant, SYSTEM)
            self.keys = {"customer": create_key(s, "acme", "customer", SYSTEM),
                         "operator": create_key(s, "platform", "operator", SYSTEM),
                         "reviewer": create_key(s, "platform", "reviewer", SYSTEM)}
            s.commit()
        probes = tmp_path / "probes.csv"
        probes.write_text(PROBES)
        base = self._post("operator", "/v1/base-models", json={
            "name": "shapes-world", "path": str(PRETRAINED_WORLD),
            "audit_profile": {"probes": str(probes), "detector": "shapes", "detector_options": {"concept": CONCEPT},
                              "images_per_prompt": IMAGES_PER_PROMPT, "inference_steps": 4, "guidance_scale": 5.0,
                              "batch_size": 16}})
        dataset = self._post("customer", "/v1/datasets", data={"file": (io.BytesIO(world_zip()), "world.zip")},
                             content_type="multipart/form-data")
        assert dataset["status"] == "flagged", dataset
        accepted = self.app.test_client().post(f"/v1/datasets/{dataset['id']}/review", headers=self._auth("reviewer"),
                                               json={"decision": "accept", "reason": "one red triangle in ten"})
        assert accepted.status_code == 200 and accepted.json["status"] == "accepted", accepted.get_data(as_text=True)
        self.job_id = self._post("customer", "/v1/jobs", json={
            "base_model": base["id"], "dataset": dataset["id"], "method": "lora",
            "hyperparameters": {"steps": 1, "rank": 2, "learning_rate": 1e-3, "batch_size": 2}})["id"]
        assert train.train(self.rt, self.job_id, "browser/1") and audit.audit(self.rt, self.job_id, "browser/1")
        outcome = verdict.decide(self.rt, self.job_id)
        assert outcome == "review", f"the audit did not flag the job ({outcome}); retune POLICY"
        self.report = self.app.test_client().get(f"/v1/jobs/{self.job_id}/report",
                                                 headers=self._auth("reviewer")).json

    def _auth(self, who: str) -> dict:
        return {"Authorization": f"Bearer {self.keys[who].key}"}

    def _post(self, who: str, path: str, **kwargs) -> dict:
        r = self.app.test_client().post(path, headers=self._auth(who), **kwargs)
        assert r.status_code in (201, 202), r.get_data(as_text=True)
        return r.json

    def artifact(self) -> Artifact:
        with self.rt.sessions() as s:
            return s.scalars(select(Artifact).where(Artifact.job_id == self.job_id)).one()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def check_redacted(html: str, report: dict) -> None:
    """Every image of a sample the detector flagged, as the browser received it, is a mosaic (<= 16 colours and
    black); the others are shown as rendered."""
    encoded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(encoded) == len(report["samples"])
    for sample, data in zip(report["samples"], encoded, strict=True):
        colours = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB").getcolors(1 << 16)
        assert (len(colours) <= 17) == bool(sample["unsafe"]), (sample["prompt"], sample["seed"], len(colours))


def test_reviewer_approves_a_flagged_job_in_a_real_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    gate = FlaggedGate(tmp_path)
    job, flagged = gate.job_id, sum(bool(s["unsafe"]) for s in gate.report["samples"])
    assert 0 < flagged < len(gate.report["samples"])
    with served(gate.app) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(accept_downloads=True, viewport=VIEWPORT)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)

        # 1. Signing in: the pages send an anonymous browser to the form.
        page.goto(f"{base}/review/")
        assert page.url == f"{base}/review/login?next=/review/"
        shot(page, "01-login")
        reviewer = gate.keys["reviewer"]
        page.fill("#key", reviewer.key)
        page.click("button:has-text('Sign in')")

        # 2. The queue holds the flagged job; the session cookie is HttpOnly, SameSite=Strict and keeps no key.
        page.wait_for_url(f"{base}/review/queue")
        row = page.locator(f"a[href='/review/jobs/{job}']")
        assert row.count() == 1
        assert page.locator(".top").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(23, 50, 77)"
        (cookie,) = context.cookies()
        assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == \
            ("ftgate_review", True, "Strict", "/review")
        with gate.rt.sessions() as s:  # the cookie names the server's session row, nothing else
            signed = s.get(WebSession, hashlib.sha256(cookie["value"].encode()).hexdigest())
        assert signed.key_id == reviewer.key_id and reviewer.key_id not in cookie["value"]
        page.select_option("select[name=tenant]", "acme")
        page.select_option("select[name=method]", "dreambooth")
        page.click("button:has-text('Filter')")
        assert page.locator("text=No jobs match.").is_visible() and row.count() == 0
        page.select_option("select[name=method]", "lora")
        page.click("button:has-text('Filter')")
        assert row.count() == 1
        shot(page, "02-queue")

        # 3. The job page: withheld checkpoint, decision form, and the auditor's report in its frame.
        row.click()
        page.wait_for_url(f"{base}/review/jobs/{job}")
        assert page.inner_text("#job-status") == "review"
        assert "Withheld" in page.inner_text("#artifact") and page.locator("#download").count() == 0
        frame = page.frame_locator("iframe.report")
        assert frame.locator("text=FLAG — human review").is_visible()
        assert frame.locator(".flag img").count() == flagged
        intake = " ".join(page.inner_text("#intake").split())  # the intake's contamination figures
        assert "10.00 % (1 of 10 images unsafe)" in intake and "0.png" in intake
        assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]  # nothing overflows
        shot(page, "03-job-in-review")

        # 4. The report on its own: what the browser receives has every flagged image redacted.
        report_page = context.new_page()
        report_page.goto(f"{base}/review/jobs/{job}/report")
        check_redacted(report_page.content(), gate.report)
        shot(report_page, "04-report")
        report_page.close()

        # 5. Approve with a reason: the job is released and the checkpoint downloadable.
        reason = "Detector hits are the base model's own red triangles; the LoRA adds nothing (rebound +0.06)."
        page.fill("#reason", reason)
        page.click("button:has-text('Approve and release')")
        page.wait_for_selector("#download")
        assert page.inner_text("#job-status") == "released"
        assert reason in page.inner_text("#review") and reviewer.key_id in page.inner_text("#review")
        assert page.locator("#decision").count() == 0
        stored = gate.artifact()
        assert page.inner_text("#artifact-sha256") == stored.sha256
        assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
        shot(page, "05-approved")

        # 6. The download from the signed-in browser is the stored checkpoint, byte for byte.
        with page.expect_download() as info:
            page.click("#download")
        download = info.value
        assert download.suggested_filename == "pytorch_lora_weights.safetensors"
        assert hashlib.sha256(Path(download.path()).read_bytes()).hexdigest() == stored.sha256

        # 7. Signing out ends the session.
        page.click("button:has-text('Sign out')")
        page.wait_for_url(f"{base}/review/login")
        page.goto(f"{base}/review/queue")
        assert page.url == f"{base}/review/login?next=/review/queue"

        # 8. The customer follows a link to its job, signs in, and lands on it: read-only, now downloadable.
        page.goto(f"{base}/review/jobs/{job}")
        page.fill("#key", gate.keys["customer"].key)
        page.click("button:has-text('Sign in')")
        page.wait_for_url(f"{base}/review/jobs/{job}")
        page.wait_for_selector("#download")
        assert page.inner_text("#job-status") == "released" and page.locator("#decision").count() == 0
        assert page.locator("form[action$='/decision']").count() == 0
        shot(page, "06-customer-job")
        assert page.locator("nav >> text=Review queue").count() == 0
        assert page.goto(f"{base}/review/queue").status == 403  # the queue is not for customers

        assert [e for e in console_errors if "403" not in e] == []  # no CSP violation, nothing failed to load
        browser.close()
