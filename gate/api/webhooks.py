"""A customer's webhook settings (``gate.pipeline.webhooks``): ``/v1/webhook-secret``, the signing secret, and
``/v1/webhook``, the tenant's default URL for jobs created without a ``webhook_url``.

The secret is shown once, in the answer that makes it; asking again makes a new one, and deliveries from
then on are signed with it (a leaked secret is rotated this way). The default URL is checked as a job's is
(public addresses only, unless the operator allows others) and needs the secret first, since nothing is sent
unsigned; a job's own ``webhook_url`` wins over it, and a delivery reads it when it is made.
"""

from __future__ import annotations

from flask import Blueprint, g

from gate.auth import CUSTOMER
from gate.pipeline.webhooks import SIGNATURE_HEADER, new_secret
from gate.service.job_requests import WebhookRequest, webhook_target
from gate.storage.audit_log import record
from gate.storage.models import Tenant, WebhookSecret

from . import gate
from .auth import current_principal, login_required
from .errors import json_body

bp = Blueprint("webhooks", __name__, url_prefix="/v1")


@bp.post("/webhook-secret")
@login_required(CUSTOMER)
def rotate():
    """201 ``{"secret", "header"}``: the tenant's new secret (any earlier one stops signing)."""
    principal = current_principal()
    secret = new_secret(g.db, principal.tenant_id)
    record(g.db, principal, g.db.get(Tenant, principal.tenant_id), "webhook secret created")
    g.db.commit()
    return {"secret": secret, "header": SIGNATURE_HEADER}, 201


@bp.get("/webhook")
@login_required(CUSTOMER)
def show():
    """200 ``{"url", "secret"}``: the tenant's default URL (null: none) and whether it has a signing secret."""
    key = g.db.get(WebhookSecret, current_principal().tenant_id)
    return {"url": None if key is None else key.url, "secret": key is not None}


@bp.put("/webhook")
@login_required(CUSTOMER)
def set_default():
    """200 ``{"url", "secret"}``: ``{"url": ...}`` becomes the tenant's default (``{"url": null}`` removes it)."""
    principal = current_principal()
    url = webhook_target(g.db, json_body(WebhookRequest).url, "url", principal.tenant_id, gate().settings)
    key = g.db.get(WebhookSecret, principal.tenant_id)
    key.url = url
    record(g.db, principal, g.db.get(Tenant, principal.tenant_id), "webhook url set", detail={"url": url})
    g.db.commit()
    return {"url": url, "secret": True}
