"""``/metrics`` for Prometheus: the gate's state from the database and the broker, read at scrape time,
plus what the gate's processes recorded (``gate.metrics``).

Counting from the database rather than in process memory makes those figures the same whichever API
process answers the scrape, and survive restarts: jobs, verdicts and audit-log entries are never deleted,
so their totals only grow, as Prometheus counters must. Queue lengths are read from the broker itself.

The route is on the public port, so it takes an operator key like any operator route: what the platform is
doing (queue lengths, verdict counts, intake refusals by reason) is not every visitor's to read, and each
scrape costs database and broker queries. Prometheus sends the key as a bearer token (deploy/prometheus.yml).
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import redis
from flask import Blueprint, Response
from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import String, and_, cast, func, select

from auditing.verdict import INCOMPLETE
from gate.metrics import ProcessFilesCollector
from gate.storage.models import AuditLogEntry, Dataset, Job, Verdict, utcnow
from gate.worker.app import QUEUES
from gate.worker.broker import EmbeddedRedis

from . import gate
from .auth import login_required

bp = Blueprint("metrics", __name__)

# Where a job's run ends: a verdict's outcome (released, withheld; review waits for a reviewer, who then
# releases or withholds it), or failed / cancelled. A job an operator queues again after a failure
# counts again when it ends.
FINISHED = ("released", "withheld", "failed", "cancelled")
# Where a job waits on the platform rather than on compute: for a worker to take it, for a reviewer.
WAITING = ("queued", "review")
BROKER_TIMEOUT_S = 2.0


class GateStateCollector:
    def __init__(self, sessions):
        self.sessions = sessions

    def collect(self):
        with self.sessions() as session:
            jobs = session.execute(select(Job.status, Job.method, func.count()).group_by(Job.status, Job.method)).all()
            finished = session.execute(
                select(Job.method, AuditLogEntry.to_state, func.count())
                .join(Job, Job.id == AuditLogEntry.entity_id)
                .where(AuditLogEntry.entity_type == Job.__tablename__, AuditLogEntry.action == "status",
                       AuditLogEntry.to_state.in_(FINISHED))
                .group_by(Job.method, AuditLogEntry.to_state)).all()
            datasets = session.execute(select(Dataset.status, func.count()).group_by(Dataset.status)).all()
            verdicts = session.execute(select(Verdict.decision, func.count()).group_by(Verdict.decision)).all()
            incomplete = session.scalar(select(func.count()).select_from(Verdict)
                                        .where(cast(Verdict.reasons, String).like(f"%{INCOMPLETE}%")))
            waiting = dict(session.execute(_oldest_entry(WAITING)).all())
            now = utcnow()
        by_state = GaugeMetricFamily("ftgate_jobs", "Jobs by status and method", labels=["status", "method"])
        submitted = CounterMetricFamily("ftgate_jobs_submitted", "Jobs ever submitted, by method", labels=["method"])
        totals: dict[str, int] = {}
        for status, method, n in jobs:
            by_state.add_metric([status, method], n)
            totals[method] = totals.get(method, 0) + n
        for method, n in sorted(totals.items()):
            submitted.add_metric([method], n)
        yield by_state
        yield submitted
        ended = CounterMetricFamily("ftgate_jobs_finished", "Job runs that ended, by method and outcome (the "
                                    "job's final state: released, withheld, failed, cancelled)",
                                    labels=["method", "outcome"])
        for method, outcome, n in finished:
            ended.add_metric([method, outcome], n)
        yield ended
        gauge = GaugeMetricFamily("ftgate_datasets", "Uploaded datasets by intake status", labels=["status"])
        for status, n in datasets:
            gauge.add_metric([status], n)
        yield gauge
        counter = CounterMetricFamily("ftgate_verdicts", "Verdicts given, by decision", labels=["decision"])
        for decision, n in verdicts:
            counter.add_metric([decision], n)
        yield counter
        unfinished = CounterMetricFamily("ftgate_verdicts_incomplete", "Verdicts taken because an audit could "
                                         "not finish (blocked, fail-closed)")
        unfinished.add_metric([], incomplete)
        yield unfinished
        age = GaugeMetricFamily("ftgate_oldest_job_age_seconds", "How long the job that has waited longest in "
                                "a waiting status (queued, review) has been in it; 0 when none waits",
                                labels=["status"])
        for status in WAITING:
            age.add_metric([status], (now - waiting[status]).total_seconds() if status in waiting else 0.0)
        yield age


def _oldest_entry(statuses: tuple[str, ...]):
    """Per status, when the job that has been in it longest entered it: its latest audit-log entry into the
    status it holds (``updated_at`` moves on any write, such as a re-dispatch, so it cannot say this)."""
    entered = (select(Job.status, func.max(AuditLogEntry.at).label("at"))
               .join(AuditLogEntry, and_(AuditLogEntry.entity_type == Job.__tablename__,
                                         AuditLogEntry.entity_id == Job.id, AuditLogEntry.to_state == Job.status))
               .where(Job.status.in_(statuses)).group_by(Job.status, Job.id).subquery())
    return select(entered.c.status, func.min(entered.c.at)).group_by(entered.c.status)


def _redis_client(url: str) -> redis.Redis:
    """A client for a broker URL in kombu's forms (``redis+socket:///path?virtual_host=N`` for a socket)."""
    parts = urlsplit(url)
    once = Retry(NoBackoff(), 0)  # redis-py retries 10 times by default: a scrape would wait seconds on a dead broker
    if parts.scheme == "redis+socket":
        db = int(parse_qs(parts.query).get("virtual_host", ["0"])[0])
        return redis.Redis(unix_socket_path=parts.path, db=db, socket_timeout=BROKER_TIMEOUT_S, retry=once)
    return redis.Redis.from_url(url, socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S,
                                retry=once)


def _queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps for ``queue``: the queue's name for priority 0, a suffixed name for each
    other priority step."""
    return [f"{queue}{Channel.sep}{step}" if step else queue for step in PRIORITY_STEPS]


class QueueCollector:
    """Messages waiting in each of the gate's queues (not those a worker has taken), read from the broker;
    with ``ftgate_broker_up`` 0 and no lengths when it does not answer."""

    def __init__(self, settings):
        # Never start the embedded broker for a scrape: a missing one is a broker that is down.
        self.url = settings.broker_url or EmbeddedRedis(settings.embedded_broker_dir).url

    def collect(self):
        up = GaugeMetricFamily("ftgate_broker_up", "1 if the broker answered this scrape, else 0")
        client = _redis_client(self.url)
        try:
            with client.pipeline(transaction=False) as pipe:
                for queue in QUEUES:
                    for key in _queue_keys(queue):
                        pipe.llen(key)
                sizes = iter(pipe.execute())
        except (redis.RedisError, OSError):
            up.add_metric([], 0)
            yield up
            return
        finally:
            client.close()
        up.add_metric([], 1)
        yield up
        lengths = GaugeMetricFamily("ftgate_queue_messages", "Messages waiting in a worker queue", labels=["queue"])
        for queue in QUEUES:
            lengths.add_metric([queue], sum(next(sizes) for _ in PRIORITY_STEPS))
        yield lengths


@bp.get("/metrics")
@login_required("operator")
def metrics():
    app = gate()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GateStateCollector(app.sessions))
    registry.register(QueueCollector(app.settings))
    registry.register(ProcessFilesCollector(app.settings.metrics_dir))
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
