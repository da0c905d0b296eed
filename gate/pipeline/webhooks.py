"""Webhooks: a job's stage changes and verdict posted to the customer's URL, signed, retried, logged.

The body is the event as ``GET /v1/jobs/<id>/events`` shows it, with the job and tenant: ``{"job", "tenant",
"event": {seq, at, kind, data}}``. ``Ftgate-Signature: t=<unix>,v1=<hex>`` is the HMAC-SHA256, under the
tenant's secret, of ``"<t>." + body`` (Stripe's scheme): a receiver recomputes it and refuses an old ``t``,
so a captured delivery cannot be replayed later. Each attempt is a ``webhook_deliveries`` row; an answer
other than 2xx (or none) is retried ``ATTEMPTS`` times in all with exponential backoff, from a thread of
the worker process that wrote the event, so a stage never waits on a customer's server.

A target is the customer's, never the gate's own network: every address its host resolves to must be
global (not loopback, link-local, private, or otherwise reserved), checked when the job is created and
again before each attempt (DNS can change), unless the operator's ``webhook_private_targets`` is "allow".
Redirects are not followed: they could lead anywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import requests
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from gate.settings import Settings
from gate.storage.models import Job, JobEvent, WebhookDelivery, WebhookSecret

from . import events
from .runtime import Runtime

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Ftgate-Signature"
ANNOUNCED = ("stage", "verdict")  # losses and samples are for polling, not for a customer's server
ATTEMPTS = 5
BACKOFF_S = 1.0  # waits of 1, 2, 4, 8 s between the attempts
TIMEOUT_S = 10.0
SCHEMES = ("https", "http")
URL_MAX_CHARS = 2000
ERROR_MAX_CHARS = 500


class RefusedTarget(ValueError):
    """A webhook URL the gate will not post to; the message says why."""


def check_target(url: str, allow_private: bool) -> str:
    """``url`` if it is an http(s) URL whose host resolves only to global addresses (any, with
    ``allow_private``); else ``RefusedTarget``."""
    if not isinstance(url, str) or not 0 < len(url) <= URL_MAX_CHARS:
        raise RefusedTarget(f"must be a URL of 1 to {URL_MAX_CHARS} characters")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise RefusedTarget(f"must be an absolute URL with one of the schemes {list(SCHEMES)}")
    if parts.username or parts.password:
        raise RefusedTarget("must not carry credentials")
    try:
        found = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise RefusedTarget(f"host {parts.hostname!r} does not resolve ({exc})") from None
    if not allow_private:
        for *_, sockaddr in found:
            address = ipaddress.ip_address(sockaddr[0].split("%")[0])
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            if not address.is_global:
                raise RefusedTarget(f"host {parts.hostname!r} resolves to {address}, which is not a public address "
                                    "(loopback, link-local and private targets are refused)")
    return url


def new_secret(session: Session, tenant_id: str) -> str:
    """A fresh signing secret for the tenant, replacing any before it (the caller commits and shows it once)."""
    secret = "whsec_" + secrets.token_hex(24)
    row = session.get(WebhookSecret, tenant_id)
    if row is None:
        session.add(WebhookSecret(tenant_id=tenant_id, secret=secret))
    else:
        row.secret = secret
    return secret


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Ftgate-Signature`` value of ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def _log(sessions: sessionmaker[Session], job: Job, seq: int, url: str, attempt: int, status: int | None,
         error: str | None) -> None:
    with sessions() as session:
        session.add(WebhookDelivery(tenant_id=job.tenant_id, job_id=job.id, event_seq=seq, url=url, attempt=attempt,
                                    status_code=status, error=None if error is None else error[:ERROR_MAX_CHARS]))
        session.commit()


def deliver(sessions: sessionmaker[Session], settings: Settings, job_id: str, seq: int,
            sleep: Callable[[float], None] = time.sleep) -> bool:
    """Post event ``seq`` of the job to its webhook until a 2xx answer, at most ``ATTEMPTS`` times; each
    attempt is logged. True once delivered."""
    with sessions() as session:
        job = session.get(Job, job_id)
        event = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq == seq)).one()
        key = session.get(WebhookSecret, job.tenant_id)
        session.expunge_all()
    url = job.webhook_url
    if url is None or key is None:
        return False
    body = json.dumps({"job": job.id, "tenant": job.tenant_id, "event": events.as_json(event)},
                      separators=(",", ":")).encode()
    for attempt in range(1, ATTEMPTS + 1):
        status, error = None, None
        try:
            check_target(url, settings.webhook_private_targets == "allow")
            answer = requests.post(url, data=body, timeout=TIMEOUT_S, allow_redirects=False, headers={
                "Content-Type": "application/json", SIGNATURE_HEADER: sign(key.secret, int(time.time()), body)})
            status = answer.status_code
        except (RefusedTarget, requests.RequestException) as exc:
            error = f"{type(exc).__name__}: {exc}"
        _log(sessions, job, seq, url, attempt, status, error)
        if status is not None and 200 <= status < 300:
            return True
        if attempt < ATTEMPTS:
            sleep(BACKOFF_S * 2 ** (attempt - 1))
    log.warning("job %s: event %d not delivered to its webhook after %d attempts", job_id, seq, ATTEMPTS)
    return False


def announce(rt: Runtime, tenant_id: str, job_id: str, kind: str, data: dict) -> int:
    """Write a job event (``gate.pipeline.events``) and, for a stage or verdict of a job with a webhook, deliver
    it from a background thread; returns its ``seq``."""
    with rt.sessions() as session:
        seq = events.append(session, tenant_id, job_id, kind, data)
        url = session.scalar(select(Job.webhook_url).where(Job.id == job_id))
    if url is not None and kind in ANNOUNCED:
        threading.Thread(target=deliver, args=(rt.sessions, rt.settings, job_id, seq), daemon=True,
                         name=f"webhook-{job_id}-{seq}").start()
    return seq
