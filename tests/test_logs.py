"""Log lines (``gate.logs``): a value a customer chose cannot forge a log line or rewrite a terminal."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from gate.logs import FORMAT, EscapeControl

ROOT = Path(__file__).resolve().parents[1]
FORGED = "cats.zip\n2026-12-02 10:00:00 INFO gate.api: key ftg_0 (operator) signed in"


@pytest.fixture
def lines():
    """A logger whose handler carries the filter, and a function returning what it wrote, line by line."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(EscapeControl())
    logger = logging.getLogger("test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, lambda: out.getvalue().splitlines()
    logger.removeHandler(handler)


def test_a_forged_newline_stays_on_its_line(lines):
    logger, written = lines
    logger.warning("upload %s refused", FORGED)
    (line,) = written()
    assert line.endswith("upload cats.zip\\n2026-12-02 10:00:00 INFO gate.api: key ftg_0 (operator) signed in refused")


@pytest.mark.parametrize("char, escaped", [("\r", "\\r"), ("\x1b", "\\x1b"), ("\u202e", "\\u202e"), ("\n", "\\n"),
                                           ("\x00", "\\x00")])
def test_control_characters_are_escaped_in_every_kind_of_argument(lines, char, escaped):
    """Strings, mappings and objects whose text carries the character (an exception quoting a name) are
    escaped; numbers keep their formats; the code's own template keeps its characters."""
    logger, written = lines
    logger.info("name %s, error %s, %d images, ratio %.2f", f"a{char}b", ValueError(f"bad {char}name"), 3, 0.25)
    logger.info("dataset %(name)s", {"name": f"x{char}y"})
    first, second = (line.split(": ", 1)[1] for line in written())  # two records, two lines
    assert first == f"name a{escaped}b, error bad {escaped}name, 3 images, ratio 0.25"
    assert second == f"dataset x{escaped}y"
    assert char not in "".join(written())


def test_the_commands_log_handler_escapes(tmp_path):
    """``gate.logs.configure``, as every ftgate command and the API's gunicorn master call it: one record, one
    line, however many newlines its argument carries."""
    code = ("import logging; from gate import logs; logs.configure(); "
            f"logging.getLogger('gate.api.datasets').warning('dataset %s', {FORGED!r})")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=True)
    (line,) = result.stderr.splitlines()
    assert "WARNING gate.api.datasets: dataset cats.zip\\n2026-12-02" in line
