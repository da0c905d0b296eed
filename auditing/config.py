"""One validation model for every record ftgate reads from outside: frozen pydantic dataclasses.

Settings, upload limits, training hyperparameters, audit profiles, verdict policies, alignment configs and API
bodies are all declared with ``@record``: strict types (JSON ``true`` is not a step count, ``"5"`` is not a
number, an integer is a number), unknown fields refused, bounds written as ``Annotated[int, Field(ge=1)]`` so
that they are both checked and published in the JSON schema (``json_schema``) the OpenAPI document is built
from. They stay standard-library dataclasses (``fields``, ``asdict``, ``replace``, which validates again).

Whatever the source (a TOML file, an environment variable, a request body), a bad value surfaces as one
``ConfigError`` naming the dotted field and what is allowed, in the words the project's errors have always
used: ``limits.max_steps must be less than or equal to 1000000 (got 5000000)``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo
from pydantic.dataclasses import dataclass as _pydantic_dataclass

RECORD_CONFIG = ConfigDict(strict=True, extra="forbid")
# pydantic's "Input should be ...", "Tuple should have ...": the project's errors say "must".
_SHOULD = re.compile(r"^(?:Input|String|Value|Tuple|List|Dictionary|Set) should")


def record(cls=None, /, *, what: str = "", **options):
    """A frozen, keyword-only pydantic dataclass validated by ``RECORD_CONFIG`` (options: dataclass arguments,
    e.g. ``kw_only=False``). Building one directly (or ``dataclasses.replace``) refuses a bad value with a
    ``ConfigError`` whose field is under ``what`` (``limits.max_steps``), never pydantic's own exception."""
    options = {"frozen": True, "kw_only": True, "config": RECORD_CONFIG, **options}

    def wrap(c):
        c = _pydantic_dataclass(c, **options)
        validate = c.__init__

        @functools.wraps(validate)
        def __init__(self, *args, **kwargs):
            try:
                validate(self, *args, **kwargs)
            except ValidationError as exc:
                raise config_error(exc, what, c) from None

        c.__init__ = __init__
        return c

    return wrap if cls is None else wrap(cls)


class ConfigError(ValueError):
    """A value that cannot be used: ``field`` is its dotted name (``limits.max_steps``); ``detail`` holds what a
    client needs to fix it (``limit``/``maximum`` for a platform limit, ``allowed`` for unknown fields)."""

    def __init__(self, field: str, message: str, **detail):
        super().__init__(message)
        self.field = field
        self.detail = detail


def _dotted(prefix: str, loc: tuple) -> str:
    parts = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int) and parts:
            parts[-1] = f"{parts[-1]}[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts)


def _allowed(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def config_error(exc: ValidationError, prefix: str, cls=None) -> ConfigError:
    """The first of pydantic's errors in the project's words, naming the field under ``prefix``."""
    error = exc.errors(include_url=False)[0]
    kind, loc = error["type"], tuple(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):  # a cross-field rule or a nested record; it names its own field
        return _under(prefix, cause)
    field = _dotted(prefix, loc) or prefix or "body"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        allowed = _allowed(cls) if len(loc) == 1 else []
        return ConfigError(field, f"{field} is not a known field" + (f"; allowed: {allowed}" if allowed else ""),
                           **({"allowed": allowed} if allowed else {}))
    if kind in ("missing", "missing_keyword_argument"):
        return ConfigError(field, f"{field} is required")
    if kind == "value_error":
        message = str(cause) if cause is not None else error["msg"].removeprefix("Value error, ")
        return ConfigError(field, message if message.startswith(field) else f"{field}: {message}")
    text = _SHOULD.sub("must", error["msg"], count=1)
    if not text.startswith("must"):
        text = f"is invalid: {text[0].lower()}{text[1:]}"
    return ConfigError(field, f"{field} {text} (got {_shown(error['input'])})")


def _under(prefix: str, exc: ConfigError) -> ConfigError:
    """``exc`` naming its field under ``prefix`` (its message starts with the field it names)."""
    if not prefix or exc.field == prefix or exc.field.startswith(f"{prefix}."):
        return exc
    return ConfigError(f"{prefix}.{exc.field}", f"{prefix}.{exc}", **exc.detail)


def _shown(value, max_chars: int = 80) -> str:
    """``value`` as an error quotes it: a long one is cut, not echoed whole."""
    text = repr(value)
    return text if len(text) <= max_chars else f"{text[:max_chars]}..."


def from_mapping(cls, data: Any, what: str):
    """``cls`` built from a parsed JSON/TOML/YAML mapping; any fault is a ``ConfigError`` under ``what``."""
    if not isinstance(data, dict):
        raise ConfigError(what, f"{what} must be an object/table (got {data!r})")
    try:
        return cls(**data)
    except ConfigError as exc:
        raise _under(what, exc) from None
    except TypeError as exc:  # keys that are not identifiers
        raise ConfigError(what, f"{what}: {exc}") from None


def section(cls):
    """The annotation of a field holding a nested record, given as a mapping (strict mode takes instances
    only); its errors name ``field.inner``."""

    def build(value, info: ValidationInfo):
        return value if isinstance(value, cls) else from_mapping(cls, value, info.field_name)

    return Annotated[cls, BeforeValidator(build)]


def _not_blank(value: str, info: ValidationInfo) -> str:
    if not value.strip():
        raise ConfigError(info.field_name, f"{info.field_name} must not be blank (got {value!r})")
    return value


def text(max_chars: int | None = None):
    """The annotation of a string with a non-space character (and at most ``max_chars``): names, prompts,
    reasons; published as ``minLength: 1, pattern: \\S`` (and ``maxLength``)."""
    return Annotated[str, Field(max_length=max_chars), AfterValidator(_not_blank),
                     Field(json_schema_extra={"minLength": 1, "pattern": r"\S"})]


def json_schema(cls) -> dict:
    """``cls``'s JSON schema (draft 2020-12, as OpenAPI 3.1 takes it), bounds and defaults included."""
    return TypeAdapter(cls).json_schema(ref_template="#/components/schemas/{model}")
