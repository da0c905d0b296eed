"""The audit log: one row for every state change, written in the same transaction as the change.

Compliance reviewers must be able to reconstruct who moved which job or dataset where, and why, so the
log is append-only, enforced three times over: this module has no update or delete function; the ORM
refuses to flush an update or delete of an entry, or to run a bulk UPDATE/DELETE on the table (events
below); and the first migration installs database triggers (SQLite and PostgreSQL) that abort any
UPDATE or DELETE (and, on PostgreSQL, TRUNCATE), so raw SQL cannot rewrite history either.

Status changes go through ``transition``: a compare-and-set UPDATE (``WHERE status = <the state we
read>``), so of two workers handling the same job (a Celery redelivery under ``acks_late``) exactly one
moves it; the other gets ``StaleState`` and must roll back and re-read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import event, update
from sqlalchemy.orm import ORMExecuteState, Session

from .models import SYSTEM_ROLE, AuditLogEntry, Base, Tenant

log = logging.getLogger(__name__)


class AppendOnlyError(RuntimeError):
    """Something tried to change or remove an audit log entry."""


class IllegalTransition(ValueError):
    """A state change the entity's life cycle does not allow."""


class StaleState(RuntimeError):
    """The row was no longer in the state read: another process changed it first."""


class ActorLike(Protocol):
    """Who acts: a ``gate.auth.Principal``, or ``SYSTEM`` for workers and the command line."""

    @property
    def key_id(self) -> str | None: ...

    @property
    def role(self) -> str: ...


@dataclass(frozen=True)
class Actor:
    role: str
    key_id: str | None = None


SYSTEM = Actor(SYSTEM_ROLE)


def _tenant_of(entity: Base) -> str | None:
    return entity.id if isinstance(entity, Tenant) else getattr(entity, "tenant_id", None)


def record(session: Session, actor: ActorLike, entity: Base, action: str, *, from_state: str | None = None,
           to_state: str | None = None, reason: str | None = None,
           detail: Mapping[str, Any] | None = None) -> AuditLogEntry:
    """Add a log entry about ``entity`` to the session (committed with the caller's transaction)."""
    if entity.id is None:  # ids are assigned at flush; the entry must name the row
        session.flush()
    entry = AuditLogEntry(actor_key_id=actor.key_id, actor_role=actor.role, tenant_id=_tenant_of(entity),
                          entity_type=entity.__tablename__, entity_id=str(entity.id), action=action,
                          from_state=from_state, to_state=to_state, reason=reason,
                          detail=dict(detail) if detail is not None else None)
    session.add(entry)
    return entry


def transition(session: Session, entity: Base, to_state: str, actor: ActorLike, *, reason: str | None = None,
               detail: Mapping[str, Any] | None = None, changes: Mapping[str, Any] | None = None,
               where: Any = None) -> None:
    """Move ``entity.status`` to ``to_state`` if its life cycle allows it and nobody moved it first.

    ``changes`` are other columns set in the same UPDATE (e.g. ``worker``, ``lease_expires_at``,
    ``attempts=Job.attempts + 1``); ``where`` is a further condition (e.g. that this worker still holds the
    job's lease). Raises ``IllegalTransition`` or ``StaleState``; the caller commits.
    """
    model = type(entity)
    transitions = getattr(model, "TRANSITIONS", None)
    if transitions is None:
        raise TypeError(f"{model.__name__} has no status life cycle")
    from_state = entity.status
    if to_state not in transitions[from_state]:
        raise IllegalTransition(f"{model.__tablename__} {entity.id}: {from_state} -> {to_state} is not allowed; "
                                f"from {from_state}: {sorted(transitions[from_state]) or 'none (final)'}")
    condition = (model.id == entity.id) & (model.status == from_state)
    if where is not None:
        condition &= where
    result = session.execute(update(model).where(condition).values(status=to_state, **(changes or {})))
    if result.rowcount != 1:
        raise StaleState(f"{model.__tablename__} {entity.id} is no longer {from_state}")
    record(session, actor, entity, "status", from_state=from_state, to_state=to_state, reason=reason, detail=detail)
    log.info("%s %s: %s -> %s by %s", model.__tablename__, entity.id, from_state, to_state, actor.role)


@event.listens_for(AuditLogEntry, "before_update")
@event.listens_for(AuditLogEntry, "before_delete")
def _refuse_change(_mapper, _connection, target: AuditLogEntry) -> None:
    raise AppendOnlyError(f"audit log entry {target.id} cannot be changed or deleted: the log is append-only")


@event.listens_for(Session, "do_orm_execute")
def _refuse_bulk_change(state: ORMExecuteState) -> None:
    if (state.is_update or state.is_delete) and state.bind_mapper is not None \
            and state.bind_mapper.class_ is AuditLogEntry:
        raise AppendOnlyError("bulk UPDATE/DELETE on the audit log refused: the log is append-only")
