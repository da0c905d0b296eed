"""Webhooks: a job's stage changes and verdict posted to the customer's URL, signed, retried, logged.

The body is the event as ``GET /v1/jobs/<id>/events`` shows it, with the job and tenant: ``{"job", "tenant",
"event": {seq, at, kind, data}}``. ``Ftgate-Signature: t=<unix>,v1=<hex>`` is the HMAC-SHA256, under the
tenant's secret, of ``"<t>." + body`` (Stripe's scheme): a receiver recomputes it and refuses an old ``t``,
so a captured delivery cannot be replayed later. The target is the job's ``webhook_url``, else its tenant's
default (``/v1/webhook``), read at each attempt.

Nothing owed is lost with a process: ``gate.pipeline.events`` writes a ``WebhookOutbox`` row in the same
transaction as the event, and the row, not a thread's memory, carries the retries. The worker that wrote the
event tries at once from a thread (a stage never waits on a customer's server); every reaper's pass sends what
is due (``deliver_due``). Each attempt is claimed by a compare-and-set on the row's attempt count, so two
reapers, or a reaper and that thread, never make the same attempt; a claim lapses after ``CLAIM_S``, so an
attempt whose process died is made again as the next one. An answer other than 2xx (or none) is retried with
exponential backoff, ``ATTEMPTS`` in all, then the delivery is ``abandoned`` (logged). Delivery is at least
once: a receiver deduplicates on ``(job, event.seq)``.

A target is the customer's, never the gate's own network: every address its host resolves to must be
global (not loopback, link-local, private, or otherwise reserved), checked when the URL is set and again
at each attempt, unless the operator's ``webhook_private_targets`` is "allow". The host is resolved once per
attempt and the connection made to an address that was checked (the ``Host`` header, TLS SNI and certificate
check still name the host), so a name that answers differently to a second lookup (DNS rebinding) cannot
steer the post elsewhere. Redirects are not followed: they could lead anywhere.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlsplit

import requests.certs
import urllib3
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from gate.settings import Settings
from gate.storage.clock import db_time
from gate.storage.models import Job, JobEvent, WebhookDelivery, WebhookOutbox, WebhookSecret

from . import events
from .runtime import Runtime

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Ftgate-Signature"
ATTEMPTS = 8
BACKOFF_S = 30  # waits of 30 s, 1, 2, 4, 8, 16 and 32 min between the attempts: about an hour in all
TIMEOUT_S = 10.0  # one attempt, every address of the host included
CLAIM_S = 3 * TIMEOUT_S  # an attempt not settled by then died with its process: the next one is due
DUE_BATCH = 16  # attempts one reaper pass makes, all at once, so a pass takes about TIMEOUT_S at most
SCHEMES = {"https": 443, "http": 80}
CA_BUNDLE = requests.certs.where()  # the roots requests (and so the client) trusts
URL_MAX_CHARS = 2000
ERROR_MAX_CHARS = 500
PENDING, DELIVERED, ABANDONED = "pending", "delivered", "abandoned"


class RefusedTarget(ValueError):
    """A webhook URL the gate will not post to; the message says why."""


@dataclass(frozen=True)
class Target:
    """A checked URL and the addresses its host resolved to, every one allowed: the only ones to connect to."""

    url: str
    scheme: str
    host: str
    port: int
    netloc: str  # the Host header
    path: str  # path and query
    addresses: tuple[str, ...]


def resolve_target(url: str, allow_private: bool) -> Target:
    """``url`` resolved once, if it is an http(s) URL whose host resolves only to global addresses (any, with
    ``allow_private``); else ``RefusedTarget``."""
    if not isinstance(url, str) or not 0 < len(url) <= URL_MAX_CHARS:
        raise RefusedTarget(f"must be a URL of 1 to {URL_MAX_CHARS} characters")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise RefusedTarget(f"must be an absolute URL with one of the schemes {list(SCHEMES)}")
    if parts.username or parts.password:
        raise RefusedTarget("must not carry credentials")
    try:
        port = parts.port or SCHEMES[parts.scheme]
    except ValueError:
        raise RefusedTarget("must have a port from 1 to 65535") from None
    try:
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise RefusedTarget(f"host {parts.hostname!r} does not resolve ({exc})") from None
    addresses = tuple(dict.fromkeys(sockaddr[0] for *_, sockaddr in found))
    if not allow_private:
        for found_address in addresses:
            address = ipaddress.ip_address(found_address.split("%")[0])
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            if not address.is_global:
                raise RefusedTarget(f"host {parts.hostname!r} resolves to {address}, which is not a public address "
                                    "(loopback, link-local and private targets are refused)")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url, parts.scheme, parts.hostname, port, parts.netloc, path, addresses)


def check_target(url: str, allow_private: bool) -> str:
    """``url`` if ``resolve_target`` allows it (when a URL is set); else ``RefusedTarget``."""
    return resolve_target(url, allow_private).url


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


def backoff_s(attempt: int) -> int:
    """The wait after failed attempt ``attempt`` (1, 2, ...) before the next."""
    return BACKOFF_S * 2 ** (attempt - 1)


def _pool(target: Target, address: str, timeout: urllib3.Timeout) -> urllib3.HTTPConnectionPool:
    """A connection to ``address`` that speaks to ``target.host``: TLS with its name as SNI and certificate name."""
    if target.scheme == "https":
        return urllib3.HTTPSConnectionPool(address, target.port, timeout=timeout, retries=False,
                                           cert_reqs="CERT_REQUIRED", ca_certs=CA_BUNDLE,
                                           server_hostname=target.host, assert_hostname=target.host)
    return urllib3.HTTPConnectionPool(address, target.port, timeout=timeout, retries=False)


def post(target: Target, body: bytes, headers: dict[str, str]) -> int:
    """POST ``body`` to ``target`` at one of its checked addresses (the next if one cannot be reached);
    the answer's status. Raises ``urllib3.exceptions.HTTPError`` when no address answers."""
    deadline = time.monotonic() + TIMEOUT_S
    failure: urllib3.exceptions.HTTPError = urllib3.exceptions.TimeoutError(f"no answer within {TIMEOUT_S} s")
    for address in target.addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        with _pool(target, address, urllib3.Timeout(total=remaining)) as pool:
            try:
                answer = pool.urlopen("POST", target.path, body=body, headers={"Host": target.netloc, **headers},
                                      redirect=False, retries=False, preload_content=False)
            except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError) as exc:
                failure = exc
                continue
            answer.close()  # the status is the answer; a body, however long, is not read
            return answer.status
    raise failure


@dataclass(frozen=True)
class Claim:
    """Attempt ``attempt`` of outbox row ``id``, taken by this process."""

    id: int
    attempt: int


def _claim(sessions: sessionmaker[Session], row_id: int, seen: int) -> Claim | None:
    """Take the next attempt of a due delivery whose count was ``seen``; None if another process took it."""
    with sessions() as session:
        taken = session.execute(update(WebhookOutbox).where(
            WebhookOutbox.id == row_id, WebhookOutbox.attempts == seen, WebhookOutbox.state == PENDING,
            WebhookOutbox.next_attempt_at <= db_time()).values(attempts=seen + 1, next_attempt_at=db_time(CLAIM_S)))
        session.commit()
    return Claim(row_id, seen + 1) if taken.rowcount == 1 else None


def _settle(sessions: sessionmaker[Session], claim: Claim, row: WebhookOutbox, url: str | None, status: int | None,
            error: str | None) -> str:
    """Log the attempt and move the delivery on: delivered, due again after its backoff, or abandoned."""
    if status is not None and 200 <= status < 300:
        state, values = DELIVERED, {}
    elif claim.attempt >= ATTEMPTS or url is None:
        state, values = ABANDONED, {}
    else:
        state, values = PENDING, {"next_attempt_at": db_time(backoff_s(claim.attempt))}
    error = None if error is None else error[:ERROR_MAX_CHARS]
    with sessions() as session:
        if url is not None:
            session.add(WebhookDelivery(tenant_id=row.tenant_id, job_id=row.job_id, event_seq=row.event_seq, url=url,
                                        attempt=claim.attempt, status_code=status, error=error))
        session.execute(update(WebhookOutbox).where(
            WebhookOutbox.id == claim.id, WebhookOutbox.attempts == claim.attempt, WebhookOutbox.state == PENDING)
            .values(state=state, **values))
        session.commit()
    if state == ABANDONED:
        log.warning("job %s: event %d abandoned after attempt %d of its webhook delivery: %s", row.job_id,
                    row.event_seq, claim.attempt, error or f"status {status}")
    return state


def _attempt(sessions: sessionmaker[Session], settings: Settings, claim: Claim) -> str:
    """Make the claimed attempt: post the event to the job's target, signed; the delivery's state after it."""
    with sessions() as session:
        row = session.get(WebhookOutbox, claim.id)
        job = session.get(Job, row.job_id)
        event = session.scalars(select(JobEvent).where(JobEvent.job_id == row.job_id,
                                                       JobEvent.seq == row.event_seq)).one()
        key = session.get(WebhookSecret, row.tenant_id)
        body = json.dumps({"job": job.id, "tenant": job.tenant_id, "event": events.as_json(event)},
                          separators=(",", ":")).encode()
        url = job.webhook_url or (key.url if key is not None else None)
        session.expunge_all()
    if url is None or key is None:  # the tenant removed its default since; nothing is sent unsigned
        return _settle(sessions, claim, row, None, None, "no webhook URL or signing secret any more")
    status, error = None, None
    try:
        target = resolve_target(url, settings.webhook_private_targets == "allow")
        status = post(target, body, {"Content-Type": "application/json",
                                     SIGNATURE_HEADER: sign(key.secret, int(time.time()), body)})
    except (RefusedTarget, urllib3.exceptions.HTTPError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return _settle(sessions, claim, row, url, status, error)


def deliver_due(sessions: sessionmaker[Session], settings: Settings, limit: int = DUE_BATCH) -> int:
    """Make the next attempt of each delivery that is due (at most ``limit``, concurrently), abandoning those
    whose last attempt never settled; returns how many attempts this call made. Safe to run anywhere at once."""
    with sessions() as session:
        lapsed = session.execute(update(WebhookOutbox).where(
            WebhookOutbox.state == PENDING, WebhookOutbox.attempts >= ATTEMPTS,
            WebhookOutbox.next_attempt_at <= db_time()).values(state=ABANDONED)).rowcount
        session.commit()
        due = session.execute(select(WebhookOutbox.id, WebhookOutbox.attempts).where(
            WebhookOutbox.state == PENDING, WebhookOutbox.next_attempt_at <= db_time())
            .order_by(WebhookOutbox.next_attempt_at).limit(limit)).all()
    if lapsed:
        log.warning("%d webhook deliveries abandoned: their last attempt never settled", lapsed)
    claims = [claim for claim in (_claim(sessions, row_id, seen) for row_id, seen in due) if claim is not None]
    if claims:
        with ThreadPoolExecutor(max_workers=len(claims), thread_name_prefix="webhook") as pool:
            list(pool.map(partial(_attempt, sessions, settings), claims))
    return len(claims)


def _deliver_now(sessions: sessionmaker[Session], settings: Settings, row_id: int) -> None:
    """The first attempt of a delivery just owed, unless a reaper took it already; the rest is ``deliver_due``'s."""
    try:
        claim = _claim(sessions, row_id, 0)
        if claim is not None:
            _attempt(sessions, settings, claim)
    except Exception:  # the outbox keeps the delivery: a reaper makes the attempt instead
        log.exception("webhook delivery %d left to the reaper", row_id)


def announce(rt: Runtime, tenant_id: str, job_id: str, kind: str, data: dict) -> int:
    """Write a job event (``gate.pipeline.events``, with the delivery it owes) and, if it owes one, make the
    first attempt from a background thread; returns its ``seq``."""
    with rt.sessions() as session:
        seq = events.append(session, tenant_id, job_id, kind, data)
        owed = session.scalar(select(WebhookOutbox.id).where(WebhookOutbox.job_id == job_id,
                                                             WebhookOutbox.event_seq == seq))
    if owed is not None:
        threading.Thread(target=_deliver_now, args=(rt.sessions, rt.settings, owed), daemon=True,
                         name=f"webhook-{job_id}-{seq}").start()
    return seq
