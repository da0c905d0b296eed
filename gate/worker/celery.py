"""A module-level app for Celery's own tools, which find it as ``celery -A gate.worker``:
``celery -A gate.worker inspect active``, ``celery -A gate.worker events``, Flower
(``celery -A gate.worker flower``). It reads the same settings as ``ftgate worker`` (``FTGATE_*`` variables,
``$FTGATE_CONFIG``), so it reaches the same broker; workers themselves are started with ``ftgate worker``.
"""

from __future__ import annotations

from gate.settings import load_settings

from .app import make_celery

app = make_celery(load_settings())
