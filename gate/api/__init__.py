"""The gate's HTTP API: a Flask app factory, JSON blueprints under ``/v1``, and ``/healthz``.

No module-level app: every process (gunicorn, tests, the CLI) builds its own from one ``Settings``, so
tests get a fresh database and state directory each. Job execution is not done here: after a job row
is committed, the dispatcher hands its id to the worker queues (``gate.worker.dispatch``), so a request
never waits on training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from flask import Flask, current_app, g
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from gate.pipeline.runtime import Runtime
from gate.settings import Settings, load_settings
from gate.storage.artifacts import Store

from .errors import register_error_handlers

log = logging.getLogger(__name__)

# Room for the multipart framing around the zip; the zip itself is held to max_upload_bytes by the intake.
MULTIPART_OVERHEAD_BYTES = 64 << 10


class Dispatcher(Protocol):
    """Where committed work goes: ``gate.worker.dispatch.CeleryDispatcher`` in service, a recorder in tests."""

    def job(self, job_id: str) -> None: ...

    def dataset(self, dataset_id: str) -> None: ...

    def baseline(self, base_model_id: str) -> None: ...

    def alignment(self, run_id: str) -> None: ...


@dataclass
class Gate:
    """What the views need, built once per app (``current_app.extensions["ftgate"]``)."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: Store
    dispatcher: Dispatcher


def gate() -> Gate:
    return current_app.extensions["ftgate"]


def create_app(settings: Settings | None = None, *, dispatcher: Dispatcher | None = None) -> Flask:
    """Build the API (also the WSGI factory: ``gunicorn 'gate.api:create_app()'``). The database must
    already be at the code's schema head (``ftgate db upgrade``). Without a dispatcher, work goes to the
    Celery queues of ``settings``' broker."""
    settings = settings or load_settings()
    rt = Runtime.open(settings)
    if dispatcher is None:
        from gate.worker.dispatch import CeleryDispatcher

        dispatcher = CeleryDispatcher.for_settings(settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.limits.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    app.json.sort_keys = False
    app.extensions["ftgate"] = Gate(settings, rt.engine, rt.sessions, rt.store, dispatcher)

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

    from gate import web
    from gate.web.sessions import signed_in_principal

    from . import (
        alignments,
        base_models,
        dataset_reviews,
        datasets,
        events,
        health,
        jobs,
        metrics,
        results,
        reviews,
        webhooks,
    )
    from .ratelimit import install

    for module in (datasets, dataset_reviews, jobs, events, webhooks, results, reviews, base_models, alignments, health,
                   metrics, web):
        app.register_blueprint(module.bp)
    register_error_handlers(app)
    install(app, settings, exempt=(health.bp, metrics.bp), pages_principal=lambda: signed_in_principal(g.db))
    log.info("API ready: %s", settings.summary())
    return app
