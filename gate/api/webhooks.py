"""``/v1/webhook-secret``: a customer's signing secret for its jobs' webhooks (``gate.pipeline.webhooks``).

The secret is shown once, in the answer that makes it; asking again makes a new one, and deliveries from
then on are signed with it (a leaked secret is rotated this way).
"""

from __future__ import annotations

from flask import Blueprint, g

from gate.auth import CUSTOMER
from gate.pipeline.webhooks import SIGNATURE_HEADER, new_secret
from gate.storage.audit_log import record
from gate.storage.models import Tenant

from .auth import current_principal, login_required

bp = Blueprint("webhooks", __name__, url_prefix="/v1/webhook-secret")


@bp.post("")
@login_required(CUSTOMER)
def rotate():
    """201 ``{"secret", "header"}``: the tenant's new secret (any earlier one stops signing)."""
    principal = current_principal()
    secret = new_secret(g.db, principal.tenant_id)
    record(g.db, principal, g.db.get(Tenant, principal.tenant_id), "webhook secret created")
    g.db.commit()
    return {"secret": secret, "header": SIGNATURE_HEADER}, 201
