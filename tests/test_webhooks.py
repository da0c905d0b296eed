"""Webhooks: targets refused on the gate's own networks unless the operator allows them; deliveries signed
(HMAC-SHA256 over the timestamp and body), retried with backoff after a failure, and logged. Deliveries go
only to a receiver this test starts on 127.0.0.1, with the operator's allowance on."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select
from test_api import Env, good_zip

from gate.pipeline import events, webhooks
from gate.pipeline.runtime import Runtime
from gate.pipeline.webhooks import RefusedTarget, check_target
from gate.storage.models import WebhookDelivery


@contextmanager
def receiver(statuses: list[int]):
    """An HTTP server on 127.0.0.1 answering each POST with the next of ``statuses``; yields (url, requests)."""
    seen: list[tuple[dict, bytes]] = []
    arrived = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((dict(self.headers), body))
            self.send_response(statuses[min(len(seen), len(statuses)) - 1])
            self.end_headers()
            arrived.set()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", seen, arrived
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def env(tmp_path, migrated) -> Env:
    env = Env(tmp_path, migrated)
    env.settings = replace(env.settings, webhook_private_targets="allow")  # the operator's allowance, for tests
    env.app.extensions["ftgate"].settings = env.settings
    return env


def _secret(env: Env, who: str = "a") -> str:
    r = env.client.post("/v1/webhook-secret", headers=env.headers(who))
    assert r.status_code == 201 and r.json["header"] == "Ftgate-Signature"
    return r.json["secret"]


def _job(env: Env, url: str):
    return env.job(env.upload(good_zip()).json["id"], webhook_url=url)


@pytest.mark.parametrize("url", ["http://127.0.0.1/hook", "http://localhost:8080/", "https://10.1.2.3/",
                                 "http://169.254.169.254/latest/meta-data", "http://[::1]/", "http://192.168.0.7/",
                                 "http://[::ffff:10.0.0.1]/"])
def test_targets_on_the_gates_own_networks_are_refused_unless_allowed(url):
    with pytest.raises(RefusedTarget, match="not a public address"):
        check_target(url, allow_private=False)
    assert check_target(url, allow_private=True) == url


@pytest.mark.parametrize("url, why", [("ftp://93.184.216.34/", "schemes"), ("/relative", "schemes"),
                                      ("https://u:p@93.184.216.34/", "credentials"), ("", "characters")])
def test_malformed_targets_are_refused(url, why):
    with pytest.raises(RefusedTarget, match=why):
        check_target(url, allow_private=True)
    assert check_target("https://93.184.216.34/hook", allow_private=False)  # a public address passes


def test_job_creation_names_the_webhook_url_when_refusing_it(env):
    env.app.extensions["ftgate"].settings = replace(env.settings, webhook_private_targets="refuse")
    r = _job(env, "http://127.0.0.1:9/hook")
    assert r.status_code == 400 and r.json["error"]["field"] == "webhook_url"
    assert "not a public address" in r.json["error"]["message"]
    env.app.extensions["ftgate"].settings = env.settings
    r = _job(env, "http://127.0.0.1:9/hook")  # allowed now, but the tenant has no secret to sign with
    assert (r.status_code, r.json["error"]["reason"], r.json["error"]["field"]) == \
        (409, "webhook_secret_missing", "webhook_url")


def test_a_delivery_is_signed_retried_after_a_500_and_logged(env):
    secret = _secret(env)
    with receiver([500, 204]) as (url, seen, _):
        created = _job(env, url).json
        assert created["webhook_url"] == url
        job = created["id"]
        with env.sessions() as s:
            seq = events.append(s, "acme", job, "stage", {"status": "training", "attempt": 1})
        waits = []
        assert webhooks.deliver(env.sessions, env.settings, job, seq, sleep=waits.append) is True
    assert len(seen) == 2 and waits == [webhooks.BACKOFF_S]
    headers, body = seen[1]
    stamp, mac = (part.split("=", 1)[1] for part in headers["Ftgate-Signature"].split(","))
    assert hmac.compare_digest(mac, hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest())
    assert not hmac.compare_digest(mac, hmac.new(b"another secret", f"{stamp}.".encode() + body,
                                                 hashlib.sha256).hexdigest())
    sent = json.loads(body)
    assert (sent["job"], sent["tenant"], sent["event"]["seq"], sent["event"]["data"]["status"]) == \
        (job, "acme", seq, "training")
    with env.sessions() as s:
        rows = s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.attempt)).all()
        assert [(r.event_seq, r.attempt, r.status_code, r.url) for r in rows] == \
            [(seq, 1, 500, url), (seq, 2, 204, url)]


def test_a_target_never_answering_2xx_is_given_up_after_the_attempts(env):
    _secret(env)
    with receiver([503]) as (url, seen, _):
        job = _job(env, url).json["id"]
        with env.sessions() as s:
            seq = events.append(s, "acme", job, "verdict", {"decision": "pass", "reasons": [], "policy": "p v1"})
        waits = []
        assert webhooks.deliver(env.sessions, env.settings, job, seq, sleep=waits.append) is False
    assert len(seen) == webhooks.ATTEMPTS and waits == [1.0, 2.0, 4.0, 8.0]
    refusing = replace(env.settings, webhook_private_targets="refuse")  # the operator withdrew the allowance
    assert webhooks.deliver(env.sessions, refusing, job, seq, sleep=lambda s: None) is False
    with env.sessions() as s:
        last = s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id.desc())).first()
        assert last.status_code is None and "not a public address" in last.error


def test_the_worker_announces_stage_events_to_the_webhook(env):
    _secret(env)
    with receiver([200]) as (url, seen, arrived):
        job = _job(env, url).json["id"]
        rt = Runtime(env.settings, env.engine, env.sessions, env.app.extensions["ftgate"].store)
        webhooks.announce(rt, "acme", job, "loss", {"step": 1, "loss": 0.5})  # polled, not posted
        seq = webhooks.announce(rt, "acme", job, "stage", {"status": "auditing"})
        assert arrived.wait(10)
        for _ in range(100):  # the delivery thread logs its attempt once it has the answer
            with env.sessions() as s:
                if s.scalars(select(WebhookDelivery)).first() is not None:
                    break
            time.sleep(0.05)
    assert len(seen) == 1 and json.loads(seen[0][1])["event"]["seq"] == seq
    with env.sessions() as s:
        assert [(r.event_seq, r.status_code) for r in s.scalars(select(WebhookDelivery))] == [(seq, 200)]
