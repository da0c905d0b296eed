"""Webhooks: targets refused on the gate's own networks unless the operator allows them (and not reachable by
a name that answers differently the second time); deliveries signed (HMAC-SHA256 over the timestamp and
body), owed in the database with their event, retried with backoff by whichever process is around, never
twice the same attempt, abandoned after the last, and logged. Deliveries go only to receivers this test
starts on 127.0.0.1, with the operator's allowance on (except where refusal is the point)."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select, update
from test_api import Env, good_zip

from gate.pipeline import events, webhooks
from gate.pipeline.runtime import Runtime
from gate.pipeline.webhooks import RefusedTarget, check_target
from gate.storage.clock import db_time
from gate.storage.db import make_engine, session_factory
from gate.storage.models import WebhookDelivery, WebhookOutbox

PUBLIC = "93.184.216.34"  # a global address, for names a test resolves itself


@contextmanager
def receiver(statuses: list[int], tls: ssl.SSLContext | None = None, hold: threading.Event | None = None):
    """An HTTP(S) server on 127.0.0.1 answering each POST with the next of ``statuses`` (after ``hold`` is set,
    if given); yields (url, requests seen, an event set at each arrival)."""
    seen: list[tuple[dict, bytes]] = []
    arrived = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((dict(self.headers), body))
            arrived.set()
            if hold is not None:
                hold.wait(10)
            self.send_response(statuses[min(len(seen), len(statuses)) - 1])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_port}/hook", seen, arrived
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def env(tmp_path, migrated) -> Env:
    env = Env(tmp_path, migrated)
    env.settings = replace(env.settings, webhook_private_targets="allow")  # the operator's allowance, for tests
    env.app.extensions["ftgate"].settings = env.settings
    return env


@pytest.fixture
def resolver(monkeypatch):
    """Names this test answers for: ``names[host]`` is the list of addresses each lookup returns in turn (the
    last one from then on); every other host resolves as usual. Yields (names, the hosts looked up)."""
    names: dict[str, list[str]] = {}
    asked: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        asked.append(host)
        if host not in names:
            return real(host, port, *args, **kwargs)
        answers = names[host]
        address = answers.pop(0) if len(answers) > 1 else answers[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names, asked


def _secret(env: Env, who: str = "a") -> str:
    r = env.client.post("/v1/webhook-secret", headers=env.headers(who))
    assert r.status_code == 201 and r.json["header"] == "Ftgate-Signature"
    return r.json["secret"]


def _job(env: Env, url: str | None = None):
    return env.job(env.upload(good_zip()).json["id"], **({} if url is None else {"webhook_url": url}))


def _verified(secret: str, headers: dict, body: bytes) -> bool:
    stamp, mac = (part.split("=", 1)[1] for part in headers["Ftgate-Signature"].split(","))
    expected = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, expected) and abs(time.time() - int(stamp)) < 60


def _outbox(env: Env) -> list[tuple[int, str, int]]:
    with env.sessions() as s:
        return [(r.event_seq, r.state, r.attempts) for r in s.scalars(select(WebhookOutbox).order_by(WebhookOutbox.id))]


def _attempts(env: Env) -> list[tuple[int, int, int | None]]:
    with env.sessions() as s:
        return [(r.event_seq, r.attempt, r.status_code)
                for r in s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id))]


def _make_due(env: Env) -> None:
    """Time passes: every pending delivery's next attempt (or lapsed claim) is due now."""
    with env.sessions() as s:
        s.execute(update(WebhookOutbox).values(next_attempt_at=db_time(-1)))
        s.commit()


def _stage(env: Env, job: str, status: str = "training") -> int:
    with env.sessions() as s:
        return events.stage(s, "acme", job, status)


@pytest.mark.parametrize("url", ["http://127.0.0.1/hook", "http://localhost:8080/", "https://10.1.2.3/",
                                 "http://169.254.169.254/latest/meta-data", "http://[::1]/", "http://192.168.0.7/",
                                 "http://[::ffff:10.0.0.1]/"])
def test_targets_on_the_gates_own_networks_are_refused_unless_allowed(url):
    with pytest.raises(RefusedTarget, match="not a public address"):
        check_target(url, allow_private=False)
    assert check_target(url, allow_private=True) == url


@pytest.mark.parametrize("url, why", [("ftp://93.184.216.34/", "schemes"), ("/relative", "schemes"),
                                      ("https://u:p@93.184.216.34/", "credentials"), ("", "characters"),
                                      ("http://93.184.216.34:99999/", "port from 1 to 65535")])
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
            events.append(s, "acme", job, "loss", {"step": 1, "loss": 0.5})  # polled, not owed
        assert _outbox(env) == [(seq, "pending", 0)]
        assert webhooks.deliver_due(env.sessions, env.settings) == 1
        assert webhooks.deliver_due(env.sessions, env.settings) == 0  # the retry is not due yet
        _make_due(env)
        assert webhooks.deliver_due(env.sessions, env.settings) == 1
        _make_due(env)
        assert webhooks.deliver_due(env.sessions, env.settings) == 0  # delivered: nothing more is owed
    assert len(seen) == 2 and _outbox(env) == [(seq, "delivered", 2)]
    headers, body = seen[1]
    assert _verified(secret, headers, body) and not _verified("another secret", headers, body)
    sent = json.loads(body)
    assert (sent["job"], sent["tenant"], sent["event"]["seq"], sent["event"]["data"]["status"]) == \
        (job, "acme", seq, "training")
    assert _attempts(env) == [(seq, 1, 500), (seq, 2, 204)]


def test_a_delivery_whose_process_exited_is_sent_by_the_next_reaper(env, monkeypatch):
    """The worker writes the event, then exits before its delivery thread runs: the delivery is in the outbox,
    and a reaper (another process: another engine) sends it."""
    secret = _secret(env)
    monkeypatch.setattr(webhooks, "_deliver_now", lambda *args: None)  # the thread never runs
    with receiver([200]) as (url, seen, _):
        job = _job(env, url).json["id"]
        rt = Runtime(env.settings, env.engine, env.sessions, env.app.extensions["ftgate"].store)
        seq = webhooks.announce(rt, "acme", job, "stage", {"status": "auditing"})
        assert seen == [] and _outbox(env) == [(seq, "pending", 0)]
        reaper = make_engine(env.settings.database_url)  # the database as another process opens it
        try:
            assert webhooks.deliver_due(session_factory(reaper), env.settings) == 1
        finally:
            reaper.dispose()
    assert len(seen) == 1 and _verified(secret, *seen[0]) and json.loads(seen[0][1])["event"]["seq"] == seq
    assert _outbox(env) == [(seq, "delivered", 1)] and _attempts(env) == [(seq, 1, 200)]


def test_retries_back_off_exponentially_and_are_abandoned_after_the_last(env, caplog):
    _secret(env)
    with receiver([503]) as (url, seen, _):
        job = _job(env, url).json["id"]
        seq = _stage(env, job)
        waits = []
        for attempt in range(1, webhooks.ATTEMPTS + 1):
            assert webhooks.deliver_due(env.sessions, env.settings) == 1
            assert webhooks.deliver_due(env.sessions, env.settings) == 0  # not due again at once
            with env.sessions() as s:
                row = s.scalars(select(WebhookOutbox)).one()
                tried = s.scalars(select(WebhookDelivery).where(WebhookDelivery.attempt == attempt)).one().at
                waits.append(round((row.next_attempt_at - tried).total_seconds()))
            _make_due(env)
        with caplog.at_level(logging.WARNING, logger="gate.pipeline.webhooks"):
            assert webhooks.deliver_due(env.sessions, env.settings) == 0  # abandoned: no ninth attempt
    assert len(seen) == webhooks.ATTEMPTS == 8
    assert waits[:-1] == [30, 60, 120, 240, 480, 960, 1920]  # the last attempt has no next one
    assert _outbox(env) == [(seq, "abandoned", webhooks.ATTEMPTS)]
    assert [a for _, a, _ in _attempts(env)] == list(range(1, webhooks.ATTEMPTS + 1))
    assert {status for _, _, status in _attempts(env)} == {503}


def test_the_last_attempt_abandoned_is_logged_and_a_refused_target_is_an_attempt(env, caplog):
    """The operator withdraws the allowance: each attempt is refused before connecting (logged with why), and
    the last one abandons the delivery with a warning."""
    _secret(env)
    job = _job(env, "http://127.0.0.1:9/hook").json["id"]
    seq = _stage(env, job)
    refusing = replace(env.settings, webhook_private_targets="refuse")
    with caplog.at_level(logging.WARNING, logger="gate.pipeline.webhooks"):
        for _ in range(webhooks.ATTEMPTS):
            assert webhooks.deliver_due(env.sessions, refusing) == 1
            _make_due(env)
    assert _outbox(env) == [(seq, "abandoned", webhooks.ATTEMPTS)]
    assert any("abandoned" in r.message and job in r.message for r in caplog.records)
    with env.sessions() as s:
        last = s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id.desc())).first()
        assert last.status_code is None and "not a public address" in last.error


def test_an_attempt_that_never_settled_is_made_again_as_the_next(env):
    """A process claimed attempt 1 and died: once the claim lapses, attempt 2 is made; a lapsed last attempt
    abandons the delivery without another post."""
    _secret(env)
    with receiver([200]) as (url, seen, _):
        job = _job(env, url).json["id"]
        first, second = _stage(env, job), _stage(env, job, "auditing")
        with env.sessions() as s:  # attempt 1 of the first, the last attempt of the second, both under way
            s.execute(update(WebhookOutbox).where(WebhookOutbox.event_seq == first).values(attempts=1))
            s.execute(update(WebhookOutbox).where(WebhookOutbox.event_seq == second)
                      .values(attempts=webhooks.ATTEMPTS))
            s.execute(update(WebhookOutbox).values(next_attempt_at=db_time(webhooks.CLAIM_S)))
            s.commit()
        assert webhooks.deliver_due(env.sessions, env.settings) == 0  # claims still live
        _make_due(env)
        assert webhooks.deliver_due(env.sessions, env.settings) == 1
    assert [json.loads(body)["event"]["seq"] for _, body in seen] == [first]
    assert _outbox(env) == [(first, "delivered", 2), (second, "abandoned", webhooks.ATTEMPTS)]
    assert _attempts(env) == [(first, 2, 200)]


def test_two_reapers_never_make_the_same_attempt(env):
    """Three reapers at once over five owed events post each once; while an attempt is under way, another
    reaper does not take it."""
    _secret(env)
    with receiver([200]) as (url, seen, _):
        job = _job(env, url).json["id"]
        seqs = [_stage(env, job, status) for status in ("training", "auditing", "review", "training", "auditing")]
        start, made = threading.Barrier(3), []

        def reaper():
            start.wait()
            made.append(webhooks.deliver_due(env.sessions, env.settings))

        callers = [threading.Thread(target=reaper) for _ in range(3)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(30)
    assert sum(made) == 5 and sorted(json.loads(body)["event"]["seq"] for _, body in seen) == seqs
    assert sorted(_attempts(env)) == [(seq, 1, 200) for seq in seqs]

    hold = threading.Event()
    with receiver([200], hold=hold) as (url, seen, arrived):
        job = _job(env, url).json["id"]
        seq = _stage(env, job)
        first = threading.Thread(target=webhooks.deliver_due, args=(env.sessions, env.settings))
        first.start()
        assert arrived.wait(10)  # attempt 1 is at the receiver, unanswered
        during = webhooks.deliver_due(env.sessions, env.settings)
        hold.set()
        first.join(30)
    assert during == 0 and len(seen) == 1
    assert _attempts(env)[-1] == (seq, 1, 200)


def test_the_worker_announces_stage_events_to_the_webhook(env):
    _secret(env)
    with receiver([200]) as (url, seen, arrived):
        job = _job(env, url).json["id"]
        rt = Runtime(env.settings, env.engine, env.sessions, env.app.extensions["ftgate"].store)
        webhooks.announce(rt, "acme", job, "loss", {"step": 1, "loss": 0.5})  # polled, not posted
        seq = webhooks.announce(rt, "acme", job, "stage", {"status": "auditing"})
        assert arrived.wait(10)
        for _ in range(100):  # the delivery thread settles its attempt once it has the answer
            if _outbox(env) == [(seq, "delivered", 1)]:
                break
            time.sleep(0.05)
    assert len(seen) == 1 and json.loads(seen[0][1])["event"]["seq"] == seq
    assert _outbox(env) == [(seq, "delivered", 1)] and _attempts(env) == [(seq, 1, 200)]


def test_a_name_that_rebinds_to_loopback_after_the_check_cannot_reach_it(env, resolver, monkeypatch):
    """DNS rebinding: the name answers a public address to the check and 127.0.0.1 afterwards. The post goes
    to the checked address (refused here: the network is closed), never to the loopback receiver; the host is
    looked up once."""
    names, asked = resolver
    _secret(env)
    refusing = replace(env.settings, webhook_private_targets="refuse")
    connected, guarded = [], socket.socket.connect

    def connect(sock, address):
        connected.append(address)
        if address[0] == PUBLIC:
            raise ConnectionRefusedError(f"{PUBLIC} is not reachable from a test")
        return guarded(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    with receiver([200]) as (url, seen, _):
        port = url.rsplit(":", 1)[1].split("/")[0]
        target = f"http://rebind.example:{port}/hook"
        names["rebind.example"] = [PUBLIC, "127.0.0.1"]
        assert check_target(target, allow_private=False) == target  # public, at this lookup
        names["rebind.example"] = [PUBLIC, "127.0.0.1"]
        env.app.extensions["ftgate"].settings = refusing
        job = _job(env, target).json["id"]
        names["rebind.example"] = [PUBLIC, "127.0.0.1"]
        asked.clear()
        seq = _stage(env, job)
        assert webhooks.deliver_due(env.sessions, refusing) == 1
        time.sleep(0.2)
    assert seen == [] and connected == [(PUBLIC, int(port))]
    assert asked.count("rebind.example") == 1
    with env.sessions() as s:
        attempt = s.scalars(select(WebhookDelivery)).one()
    assert (attempt.event_seq, attempt.status_code) == (seq, None) and attempt.error


def test_the_post_names_the_host_it_connects_to_by_address(env, resolver):
    """Connecting to the checked address keeps the URL's name in the Host header."""
    names, asked = resolver
    _secret(env)
    with receiver([200]) as (url, seen, _):
        port = url.rsplit(":", 1)[1].split("/")[0]
        names["hooks.example"] = ["127.0.0.1"]
        job = _job(env, f"http://hooks.example:{port}/hook?tenant=acme").json["id"]
        asked.clear()
        _stage(env, job)
        assert webhooks.deliver_due(env.sessions, env.settings) == 1
    assert len(seen) == 1 and seen[0][0]["Host"] == f"hooks.example:{port}"
    assert asked.count("hooks.example") == 1


def _certificate(tmp_path, name: str):
    """A self-signed certificate for ``name`` and its key, as PEM files."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.parametrize("served, ok", [("hooks.example", True), ("other.example", False)])
def test_tls_sends_the_name_and_verifies_the_certificate_for_it(env, resolver, monkeypatch, tmp_path, served, ok):
    """Connected to 127.0.0.1 for hooks.example: SNI says hooks.example, and the certificate must be valid for
    hooks.example (trusted here by making it the only root); one for another name fails the attempt."""
    names, _ = resolver
    cert, key = _certificate(tmp_path, served)
    monkeypatch.setattr(webhooks, "CA_BUNDLE", str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    sni = []
    context.sni_callback = lambda sock, name, ctx: sni.append(name)
    _secret(env)
    with receiver([200], tls=context) as (url, seen, _):
        port = url.rsplit(":", 1)[1].split("/")[0]
        names["hooks.example"] = ["127.0.0.1"]
        job = _job(env, f"https://hooks.example:{port}/hook").json["id"]
        seq = _stage(env, job)
        assert webhooks.deliver_due(env.sessions, env.settings) == 1
    assert sni == ["hooks.example"]
    with env.sessions() as s:
        attempt = s.scalars(select(WebhookDelivery)).one()
    if ok:
        assert (attempt.event_seq, attempt.status_code, len(seen)) == (seq, 200, 1)
        assert seen[0][0]["Host"] == f"hooks.example:{port}"
    else:
        assert attempt.status_code is None and "hooks.example" in attempt.error and seen == []


def test_a_tenants_default_webhook_serves_jobs_without_their_own(env):
    """PUT /v1/webhook: checked like a job's URL, needs the secret; jobs without ``webhook_url`` deliver to it,
    a job's own URL wins, and the tenant's URL is read at delivery; globex sees none of it."""
    a = env.headers("a")
    assert env.client.get("/v1/webhook", headers=a).json == {"url": None, "secret": False}
    r = env.client.put("/v1/webhook", headers=a, json={"url": "http://127.0.0.1:9/hook"})
    assert (r.status_code, r.json["error"]["reason"], r.json["error"]["field"]) == \
        (409, "webhook_secret_missing", "url")
    secret = _secret(env)
    for body, field, why in (({"url": "ftp://x.example/"}, "url", "schemes"), ({}, "url", "required"),
                             ({"url": "x", "more": 1}, "more", "not a known field"),
                             ({"url": "https://x.example/" + "a" * 2000}, "url", "at most 2000 characters")):
        r = env.client.put("/v1/webhook", headers=a, json=body)
        assert r.status_code == 400 and r.json["error"]["field"] == field and why in r.json["error"]["message"], r.json
    env.app.extensions["ftgate"].settings = replace(env.settings, webhook_private_targets="refuse")
    r = env.client.put("/v1/webhook", headers=a, json={"url": "http://127.0.0.1:9/hook"})
    assert r.status_code == 400 and "not a public address" in r.json["error"]["message"]
    env.app.extensions["ftgate"].settings = env.settings
    with receiver([200]) as (default, seen, _), receiver([200]) as (own, seen_own, _):
        r = env.client.put("/v1/webhook", headers=a, json={"url": default})
        assert r.status_code == 200 and r.json == {"url": default, "secret": True}
        assert env.client.get("/v1/webhook", headers=a).json == {"url": default, "secret": True}
        assert env.client.get("/v1/webhook", headers=env.headers("b")).json == {"url": None, "secret": False}
        plain = _job(env).json
        assert plain["webhook_url"] is None
        with_own = _job(env, own).json["id"]
        seq, own_seq = _stage(env, plain["id"]), _stage(env, with_own)
        assert webhooks.deliver_due(env.sessions, env.settings) == 2
    assert [json.loads(body)["job"] for _, body in seen] == [plain["id"]]
    assert [json.loads(body)["job"] for _, body in seen_own] == [with_own]
    assert _verified(secret, *seen[0]) and json.loads(seen[0][1])["event"]["seq"] == seq and own_seq
    assert env.client.put("/v1/webhook", headers=a, json={"url": None}).json == {"url": None, "secret": True}
    _stage(env, plain["id"], "auditing")  # no target any more: nothing owed
    assert len(_outbox(env)) == 2


def test_a_delivery_reads_the_tenants_default_when_it_is_made(env, caplog):
    """An event owed while the default was one URL goes to the URL set since; once the default is removed, what
    is still owed is abandoned unsent."""
    a = env.headers("a")
    _secret(env)
    with receiver([200]) as (before, seen_before, _), receiver([200]) as (after, seen_after, _):
        assert env.client.put("/v1/webhook", headers=a, json={"url": before}).status_code == 200
        job = _job(env).json["id"]
        seq = _stage(env, job)
        assert env.client.put("/v1/webhook", headers=a, json={"url": after}).status_code == 200
        assert webhooks.deliver_due(env.sessions, env.settings) == 1
        _stage(env, job, "auditing")
        assert env.client.put("/v1/webhook", headers=a, json={"url": None}).status_code == 200
        with caplog.at_level(logging.WARNING, logger="gate.pipeline.webhooks"):
            assert webhooks.deliver_due(env.sessions, env.settings) == 1
    assert seen_before == [] and [json.loads(body)["event"]["seq"] for _, body in seen_after] == [seq]
    assert [state for _, state, _ in _outbox(env)] == ["delivered", "abandoned"]
    assert any("abandoned" in r.message for r in caplog.records)
