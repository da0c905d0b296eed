"""The job lists' filters, read from the query string and checked once: a bad value is a 400 naming the field."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta

from sqlalchemy import Select

from gate.api.errors import ApiError
from gate.storage.models import JOB_TRANSITIONS, METHODS, TENANT_ID_PATTERN, Job, utcnow

MAX_WAITING_HOURS = 24 * 366
ID_MAX_CHARS = 32


@dataclass(frozen=True)
class JobFilter:
    """Which jobs to list; None (an empty form field) means any."""

    tenant: str | None = None
    base_model: str | None = None
    method: str | None = None
    status: str | None = None
    min_waiting_hours: float | None = None  # time since the job last changed state: how long it has waited

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> JobFilter:
        values = {name: (args.get(name) or "").strip() or None for name in cls.__dataclass_fields__}
        if values["tenant"] is not None and not TENANT_ID_PATTERN.fullmatch(values["tenant"]):
            raise _bad("tenant", f"tenant must match {TENANT_ID_PATTERN.pattern}")
        if values["base_model"] is not None and len(values["base_model"]) > ID_MAX_CHARS:
            raise _bad("base_model", f"base_model must be a base model id (at most {ID_MAX_CHARS} characters)")
        if values["method"] not in (None, *METHODS):
            raise _bad("method", f"method must be one of {list(METHODS)}")
        if values["status"] not in (None, *JOB_TRANSITIONS):
            raise _bad("status", f"status must be one of {list(JOB_TRANSITIONS)}")
        if values["min_waiting_hours"] is not None:
            try:
                hours = float(values["min_waiting_hours"])
            except ValueError:
                hours = math.nan
            if not 0 <= hours <= MAX_WAITING_HOURS:  # also refuses nan
                raise _bad("min_waiting_hours", f"min_waiting_hours must be a number of hours in "
                                                f"[0, {MAX_WAITING_HOURS}]")
            values["min_waiting_hours"] = hours
        return cls(**values)

    def apply(self, statement: Select) -> Select:
        for column, value in ((Job.tenant_id, self.tenant), (Job.base_model_id, self.base_model),
                              (Job.method, self.method), (Job.status, self.status)):
            if value is not None:
                statement = statement.where(column == value)
        if self.min_waiting_hours is not None:
            statement = statement.where(Job.updated_at <= utcnow() - timedelta(hours=self.min_waiting_hours))
        return statement

    def as_args(self) -> dict:
        """The filter as form values, to show it back in the form."""
        return {name: "" if value is None else f"{value:g}" if isinstance(value, float) else value
                for name, value in asdict(self).items()}


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", message, field=field)
