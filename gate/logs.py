"""The service's log lines: every value interpolated into a message has its control characters escaped.

Log messages carry what customers chose (file names inside a zip, dataset names, job fields, exception texts
quoting them). A newline there would forge a second log line, an escape sequence would rewrite an operator's
terminal, a right-to-left override would make a line read backwards. ``EscapeControl`` escapes such characters
in a record's arguments (the message template is the code's own and keeps its formatting); ``configure`` puts
it on the handler every ftgate command and the API's gunicorn master log through.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from numbers import Number

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def printable(text: str) -> str:
    """``text`` as it may appear in a message or log line: control and other unprintable characters escaped
    (``\\n``, ``\\x1b``, ``\\u202e``), so it cannot forge log lines or terminal output."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _escaped(value):
    """Numbers as they are (``%d``, ``%.3f`` still format them); anything else as its escaped text."""
    if isinstance(value, Number):
        return value
    return printable(value if isinstance(value, str) else str(value))


class EscapeControl(logging.Filter):
    """A handler filter that escapes control characters in every argument of a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, Mapping):
            record.args = {key: _escaped(value) for key, value in record.args.items()}
        elif record.args:
            record.args = tuple(_escaped(value) for value in record.args)
        return True


def configure(level: int = logging.INFO) -> None:
    """Log to stderr at ``level`` through a handler that escapes every record's arguments."""
    logging.basicConfig(level=level, format=FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, EscapeControl) for f in handler.filters):
            handler.addFilter(EscapeControl())
