"""``/metrics`` for Prometheus: the gate's state, read from the database at scrape time.

Counting from the database rather than in process memory makes the figures the same whichever API
process or worker answers the scrape, and survive restarts: verdicts and jobs are never deleted, so
their totals only grow, as Prometheus counters must.
"""

from __future__ import annotations

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from gate.storage.models import Dataset, Job, Verdict

from . import gate

bp = Blueprint("metrics", __name__)


class GateStateCollector:
    def __init__(self, sessions):
        self.sessions = sessions

    def collect(self):
        with self.sessions() as session:
            jobs = session.execute(select(Job.status, Job.method, func.count()).group_by(Job.status, Job.method)).all()
            datasets = session.execute(select(Dataset.status, func.count()).group_by(Dataset.status)).all()
            verdicts = session.execute(select(Verdict.decision, func.count()).group_by(Verdict.decision)).all()
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
        gauge = GaugeMetricFamily("ftgate_datasets", "Uploaded datasets by intake status", labels=["status"])
        for status, n in datasets:
            gauge.add_metric([status], n)
        yield gauge
        counter = CounterMetricFamily("ftgate_verdicts", "Verdicts given, by decision", labels=["decision"])
        for decision, n in verdicts:
            counter.add_metric([decision], n)
        yield counter


@bp.get("/metrics")
def metrics():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GateStateCollector(gate().sessions))
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
