"""The database's clock, for the times that different processes compare (lease expiries, dispatches).

A lease written by a worker and judged expired by a reaper on another machine must be measured on one clock:
with each process's own, a worker whose clock runs behind would have its live job taken. The database's clock
is the one every process shares, so these times are SQL expressions, evaluated by the database.
"""

from __future__ import annotations

from sqlalchemy import DateTime
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement


class db_time(FunctionElement):  # noqa: N801  (named like the SQL functions it stands for)
    """``seconds`` from now (negative: ago) on the database's clock: an UPDATE's value or a WHERE's bound."""

    type = DateTime(timezone=True)
    name = "db_time"
    inherit_cache = True

    def __init__(self, seconds: int = 0):
        super().__init__(int(seconds))


@compiles(db_time)
def _postgresql(element, compiler, **kw) -> str:
    # statement_timestamp, not now(): the time of this statement, not of its transaction's start
    return f"statement_timestamp() + make_interval(secs => {compiler.process(element.clauses, **kw)})"


@compiles(db_time, "sqlite")
def _sqlite(element, compiler, **kw) -> str:
    # Text in the format SQLAlchemy stores datetimes in on SQLite (six-digit fraction), so that the values
    # compare, and match for equality, with the ones written from Python.
    return (f"strftime('%Y-%m-%d %H:%M:%f', 'now', {compiler.process(element.clauses, **kw)} || ' seconds') "
            "|| '000'")
