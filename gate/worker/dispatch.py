"""Sending work to the queues: what the API and the reaper call. Messages carry ids only."""

from __future__ import annotations

from celery import Celery, chain


class CeleryDispatcher:
    def __init__(self, app: Celery | None = None, settings=None):
        self._app, self._settings = app, settings

    @classmethod
    def for_settings(cls, settings) -> CeleryDispatcher:
        """A dispatcher that connects on first use (an API that only serves reads needs no broker)."""
        return cls(settings=settings)

    @property
    def app(self) -> Celery:
        if self._app is None:
            from .app import make_celery

            self._app = make_celery(self._settings)
        return self._app

    def job(self, job_id: str, stage: str = "train") -> None:
        """The pipeline from ``stage`` on: train -> audit (which ends with the verdict), each with the failure
        link."""
        stages = ("gate.train", "gate.audit")
        steps = stages[stages.index(f"gate.{stage}"):]
        on_error = self.app.signature("gate.job_failed", kwargs={"job_id": job_id})
        signatures = [self.app.signature(name, args=(job_id,), immutable=True) for name in steps]
        for signature in signatures:
            signature.link_error(on_error)
        chain(*signatures).apply_async()

    def dataset(self, dataset_id: str) -> None:
        """The intake of a received dataset, or the screening of an accepted one (``gate.pipeline.intake``)."""
        self.app.send_task("gate.intake", args=(dataset_id,))

    def baseline(self, base_model_id: str) -> None:
        self.app.send_task("gate.baseline", args=(base_model_id,))

    def alignment(self, run_id: str) -> None:
        self.app.send_task("gate.align", args=(run_id,))
