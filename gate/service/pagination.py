"""Cursor pagination for every list: at most ``limit`` rows a page, in a fixed order, and an opaque cursor that
names where the next page starts.

A cursor is the last row's sort key (a time and the id that breaks ties), so a page is found by an indexed
comparison rather than an offset: rows added or removed meanwhile shift nothing, and no row is shown twice or
skipped as a list grows while a client walks it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from pydantic import Field
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from auditing.config import record, text

from .errors import ApiError, parse_query

DEFAULT_LIMIT, MAX_LIMIT = 100, 500


@dataclass(frozen=True)
class Page:
    rows: list
    next_cursor: str | None  # None: this was the last page


@record
class PageQuery:
    """The query parameters of every list."""

    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT)] = Field(default=DEFAULT_LIMIT, description="rows on the page")
    cursor: text() | None = Field(default=None, description="the next_cursor of the page before")


def page_request(args: Mapping[str, str]) -> tuple[int, str | None]:
    """``limit`` and ``cursor`` from a request's query (``PageQuery``); a 400 naming the field."""
    page = parse_query(PageQuery, args)
    return page.limit, page.cursor


def paginate(session: Session, statement: Select, when: InstrumentedAttribute, row_id: InstrumentedAttribute,
             limit: int, cursor: str | None, newest_first: bool = False) -> Page:
    """One page of ``statement``'s rows ordered by (``when``, ``row_id``), starting after ``cursor``."""
    order = (when.desc(), row_id.desc()) if newest_first else (when.asc(), row_id.asc())
    if cursor is not None:
        at, last = _decode(cursor)
        after = (when < at) | and_(when == at, row_id < last) if newest_first else \
            or_(when > at, and_(when == at, row_id > last))
        statement = statement.where(after)
    rows = list(session.scalars(statement.order_by(None).order_by(*order).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    if not more:
        return Page(rows, None)
    tail = rows[-1]
    return Page(rows, _encode(getattr(tail, when.key), getattr(tail, row_id.key)))


def _encode(at: datetime, row_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([at.isoformat(), row_id]).encode()).decode().rstrip("=")


def _decode(cursor: str) -> tuple[datetime, str]:
    try:
        at, row_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(at), str(row_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "invalid_request", "cursor is not one this API gave out; start again without it",
                       field="cursor") from None
