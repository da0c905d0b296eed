"""The gate's HTTP API: a Flask app factory, JSON blueprints under ``/v1``, and ``/healthz``.

No module-level app: every process (gunicorn, tests, the CLI) builds its own from one ``Settings``, so
tests get a fresh database and state directory each. Job execution is not done here: after a job row
is committed, ``enqueue(job_id)`` hands it to the worker queue (Celery's ``train_job.delay`` in
service), so a request never waits on training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask, current_app, g
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from auditing.detectors.base import Detector
from gate.settings import Settings, load_settings
from gate.storage.artifacts import ArtifactStore
from gate.storage.db import make_engine, require_current, session_factory

from .errors import register_error_handlers

log = logging.getLogger(__name__)

# Room for the multipart framing around the zip; the zip itself is held to max_upload_bytes by the intake.
MULTIPART_OVERHEAD_BYTES = 64 << 10
DATASETS_FOLDER = "datasets"


def _log_enqueue(job_id: str) -> None:
    log.warning("job %s queued but no worker queue is configured (create_app(enqueue=...))", job_id)


@dataclass
class Gate:
    """What the views need, built once per app (``current_app.extensions["ftgate"]``)."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ArtifactStore
    enqueue: Callable[[str], None]
    _scanner: Detector | None = field(default=None, repr=False)

    @property
    def scanner(self) -> Detector:
        """The intake's contamination scanner; NudeNet is loaded on the first upload, not at start-up."""
        if self._scanner is None:
            from auditing.detectors.registry import load_detector

            self._scanner = load_detector("nudenet")
        return self._scanner

    def dataset_folder(self, tenant_id: str, dataset_id: str) -> Path:
        """Where a dataset's checked caption folder lives (what training reads)."""
        return self.settings.state_dir / DATASETS_FOLDER / tenant_id / dataset_id


def gate() -> Gate:
    return current_app.extensions["ftgate"]


def create_app(settings: Settings | None = None, *, enqueue: Callable[[str], None] | None = None,
               scanner: Detector | None = None) -> Flask:
    """Build the API. The database must already be at the code's schema head (``ftgate db upgrade``)."""
    settings = settings or load_settings()
    engine = make_engine(settings.database_url)
    require_current(engine)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.limits.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    app.json.sort_keys = False
    app.extensions["ftgate"] = Gate(settings, engine, session_factory(engine), ArtifactStore(settings.artifacts_dir),
                                    enqueue or _log_enqueue, scanner)

    @app.before_request
    def _open_session() -> None:
        g.db = gate().sessions()

    @app.teardown_request
    def _close_session(exc: BaseException | None) -> None:
        session = g.pop("db", None)
        if session is not None:
            if exc is not None or session.in_transaction():
                session.rollback()  # nothing a view did not commit survives the request
            session.close()

    from . import base_models, datasets, health, jobs

    for module in (datasets, jobs, base_models, health):
        app.register_blueprint(module.bp)
    register_error_handlers(app)
    log.info("API ready: %s", settings.summary())
    return app
