"""The Celery app: queues, routes and the reliability settings (docs/worker.md says why each).

* ``task_acks_late``: a message is acknowledged when its task returns, so a worker that dies before
  finishing leaves it to be redelivered; every task is idempotent (``gate.pipeline``), so a redelivery
  or a duplicate does nothing twice.
* ``worker_prefetch_multiplier = 1``: a worker reserves one message at a time; a GPU job of hours must
  not hold another job hostage in its prefetch buffer.
* Time limits per task (``time_limits``): the audit task's follow the ceiling on an audit's deadline
  (``audit_deadline_seconds``) with ``AUDIT_TASK_MARGIN_S`` on top for a missing baseline and the report, so
  a deadline computed from the image count (``gate.pipeline.audit.audit_deadline``) always fires first and the
  job fails closed with a report, never killed silently by Celery. The worker sets them from its own settings,
  the ones its deadline is computed from, rather than the sender of the message from the sender's.
* ``visibility_timeout`` longer than the longest task's hard time limit, so Redis does not hand a
  running task to a second worker. A worker that is killed is recovered sooner by its job's lease
  (``gate.pipeline.leases``), not by this timeout.
* ``worker_max_tasks_per_child = 1``: each job runs in a fresh child process, which returns all GPU
  and host memory when it exits. The parent imports torch and diffusers before forking, so a child
  starts in milliseconds.
* JSON only: a task message never carries pickles; tasks take ids and reload everything from the database.
* Task events on, so Flower and ``celery events`` can follow the gate's tasks (``gate.worker.celery``).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from gate.settings import Settings

from .broker import broker_url

QUEUES = ("train", "audit", "align", "intake")
ROUTES = {
    "gate.intake": {"queue": "intake"},
    "gate.train": {"queue": "train"},
    "gate.audit": {"queue": "audit"},
    "gate.baseline": {"queue": "audit"},
    "gate.align": {"queue": "align"},
}
# Hard limits of the tasks whose length no setting bounds; the soft limit (90%) lets a stage fail closed before
# it is killed.
# The intake's bounds its work (entries, pixels, re-encoded bytes: gate.intake.IntakeLimits); its time limit is the
# backstop for a scanner that hangs.
TIME_LIMITS_S = {"gate.intake": 3600, "gate.train": 12 * 3600, "gate.baseline": 6 * 3600, "gate.align": 48 * 3600}
# What the audit task may run past its deadline's ceiling: the profile's baseline when it is missing (audited
# in the task, outside the deadline, as long as the baseline task may take) and writing the report; its soft
# limit comes halfway through the margin.
AUDIT_TASK_MARGIN_S = TIME_LIMITS_S["gate.baseline"]


def time_limits(settings: Settings) -> dict[str, tuple[int, int]]:
    """(hard, soft) time limit of each task in seconds, the audit task's above ``audit_deadline_seconds``."""
    ceiling = settings.audit_deadline_seconds
    return ({name: (limit, int(limit * 0.9)) for name, limit in TIME_LIMITS_S.items()}
            | {"gate.audit": (ceiling + AUDIT_TASK_MARGIN_S, ceiling + AUDIT_TASK_MARGIN_S // 2)})


def make_celery(settings: Settings) -> Celery:
    """The app for ``settings``; starts the embedded broker if none is configured."""
    app = Celery("ftgate", broker=broker_url(settings), include=["gate.worker.tasks"])
    limits = time_limits(settings)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        broker_transport_options={"visibility_timeout": max(h for h, _ in limits.values()) + 3600},
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(name) for name in QUEUES],
        task_routes=ROUTES,
        task_default_queue="audit",
        task_annotations={name: {"time_limit": hard, "soft_time_limit": soft} for name, (hard, soft) in limits.items()},
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # Flower and ``celery events`` follow tasks (gate.worker.celery)
        task_send_sent_event=True,
    )
    app.ftgate_settings = settings  # read by the tasks (gate.worker.tasks.runtime)
    return app
