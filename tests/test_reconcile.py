"""No job lost, none stuck, in process on SQLite and PostgreSQL: leases on the database's clock, the reaper's
reconciler sending again what no worker started (a message lost, never sent, or refused by a worker without its
database), the reaper surviving a broker that refuses its dispatch, and the attempts cap. The same windows with
real processes are in ``tests/test_faults.py``."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery.exceptions import Ignore
from sqlalchemy import select, update
from test_pipeline import job_id, rt  # noqa: F401  (fixtures: a runtime, and a queued job on the world)

from gate.pipeline import leases, train
from gate.pipeline.leases import claim, reap, reconcile
from gate.storage.audit_log import SYSTEM, transition
from gate.storage.clock import db_time
from gate.storage.db import make_engine, session_factory, upgrade
from gate.storage.models import AlignmentRun, AuditLogEntry, BaseModel, Dataset, Job, Tenant, utcnow
from gate.storage.testing import postgres_schema, postgres_unavailable
from gate.worker import tasks

GRACE_S = 60
LEASE_S = 30
MAX_ATTEMPTS = 3


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/ftgate.db"
        upgrade(url)
        engine = make_engine(url)
        yield session_factory(engine)
        engine.dispose()
        return
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    with postgres_schema() as url:
        upgrade(url)
        engine = make_engine(url)
        yield session_factory(engine)
        engine.dispose()


def _job(sessions, status: str = "queued", **fields) -> str:
    """A job of tenant acme in ``status`` (moved there through its life cycle), committed."""
    with sessions() as s:
        s.add(Tenant(id="acme", name="acme"))
        dataset = Dataset(tenant_id="acme", name="d", status="accepted", content_sha256="0" * 64, artifact_path="k",
                          size_bytes=1)
        job = Job(tenant_id="acme", base_model=BaseModel(name="m", path="/m", weights_sha256="a" * 64),
                  dataset=dataset, method="lora")
        s.add(job)
        s.flush()
        path = {"queued": (), "training": ("training",), "auditing": ("training", "auditing")}[status]
        for state in path:
            transition(s, job, state, SYSTEM)
        s.execute(update(Job).where(Job.id == job.id).values(**fields))
        s.commit()
        return job.id


def _row(sessions, model, row_id):
    with sessions() as s:
        return s.get(model, row_id)


def _overdue(sessions, model, row_id) -> None:
    """The row's dispatch happened longer than the grace ago."""
    with sessions() as s:
        s.execute(update(model).where(model.id == row_id).values(dispatched_at=db_time(-GRACE_S - 1)))
        s.commit()


def _log(sessions, row_id) -> list[tuple]:
    with sessions() as s:
        return [(e.action, e.from_state, e.to_state, e.reason) for e in s.scalars(
            select(AuditLogEntry).where(AuditLogEntry.entity_id == row_id).order_by(AuditLogEntry.id))]


class Broker:
    """``requeue`` for the reaper: records what it is handed, or refuses it while ``down``."""

    def __init__(self, down: bool = False):
        self.sent, self.down = [], down

    def __call__(self, kind: str, row_id: str, stage: str) -> None:
        if self.down:
            from kombu.exceptions import OperationalError

            raise OperationalError("Error 111 connecting to the broker: Connection refused")
        self.sent.append((kind, row_id, stage))


# --- the database's clock ----------------------------------------------------------------------------------

def test_a_lease_is_measured_on_the_databases_clock_not_the_workers(sessions, monkeypatch):
    """A worker whose own clock runs an hour behind claims a job: its lease still ends ``lease_seconds`` from the
    database's now, so a reaper (whose clock is right) leaves the live job alone."""
    claimed = _job(sessions)
    monkeypatch.setattr(leases, "utcnow", lambda: utcnow() - timedelta(hours=1))
    with sessions() as s:
        assert claim(s, s.get(Job, claimed), "w1/slow-clock", LEASE_S, to_state="training")
        s.commit()
        now = s.scalar(select(db_time()))
    monkeypatch.undo()
    lease = _row(sessions, Job, claimed).lease_expires_at
    assert abs((lease - now.replace(tzinfo=lease.tzinfo)).total_seconds() - LEASE_S) < 5
    broker = Broker()
    assert reap(sessions, broker, MAX_ATTEMPTS) == 0 and broker.sent == []
    assert leases.renew(sessions, Job, claimed, "w1/slow-clock", LEASE_S)


def test_the_reaper_judges_expiry_on_the_databases_clock(sessions):
    live = _job(sessions, "training", worker="w1/a", lease_expires_at=db_time(LEASE_S), attempts=1)
    with sessions() as s:
        expired = s.get(Job, live)
        s.add(Job(tenant_id="acme", base_model_id=expired.base_model_id, dataset_id=expired.dataset_id,
                  method="lora", status="training", worker="w2/b", lease_expires_at=db_time(-1), attempts=1))
        s.commit()
        expired = s.scalars(select(Job.id).where(Job.id != live)).one()
    broker = Broker()
    assert reap(sessions, broker, MAX_ATTEMPTS) == 1 and broker.sent == [("job", expired, "train")]
    assert _row(sessions, Job, live).status == "training" and _row(sessions, Job, expired).status == "queued"


# --- the reconciler ----------------------------------------------------------------------------------------

def test_a_queued_job_whose_message_never_came_is_dispatched_again_once_per_grace(sessions):
    """Its message was lost (deleted from the broker, or the API died before sending it): fresh, it is left
    alone; past the grace it is sent again, logged, and not again until another grace has passed."""
    queued = _job(sessions)
    broker = Broker()
    assert reconcile(sessions, broker, GRACE_S) == 0  # dispatched when it was created
    _overdue(sessions, Job, queued)
    assert reconcile(sessions, broker, GRACE_S) == 1 and broker.sent == [("job", queued, "train")]
    assert reconcile(sessions, broker, GRACE_S) == 0  # the dispatch moved to now
    assert _log(sessions, queued)[-1] == ("dispatched again", None, None,
                                          f"no worker started its train stage within {GRACE_S} s of its dispatch")


def test_an_audit_nobody_holds_is_dispatched_again_but_a_held_one_is_not(sessions):
    waiting = _job(sessions, "auditing")
    with sessions() as s:  # a second job of the same tenant, its audit held by a live worker
        first = s.get(Job, waiting)
        job = Job(tenant_id="acme", base_model_id=first.base_model_id, dataset_id=first.dataset_id, method="lora",
                  status="auditing", worker="w1/a", lease_expires_at=db_time(LEASE_S))
        s.add(job)
        s.commit()
        held = job.id
    for row_id in (waiting, held):
        _overdue(sessions, Job, row_id)
    broker = Broker()
    assert reconcile(sessions, broker, GRACE_S) == 1 and broker.sent == [("job", waiting, "audit")]


def test_a_queued_hardening_run_whose_message_never_came_is_dispatched_again(sessions):
    with sessions() as s:
        run = AlignmentRun(name="h", config={})
        s.add(run)
        s.commit()
    broker = Broker()
    assert reconcile(sessions, broker, GRACE_S) == 0
    _overdue(sessions, AlignmentRun, run.id)
    assert reconcile(sessions, broker, GRACE_S) == 1 and broker.sent == [("alignment", run.id, "align")]


def test_a_broker_down_during_the_reapers_dispatch_leaves_the_job_to_the_reconciler(sessions):
    """The reaper hands an expired lease back (committed) but cannot send the message: the pass goes on, and
    once the grace has passed the reconciler sends it."""
    lost = _job(sessions, "training", worker="w1/dead", lease_expires_at=db_time(-1), attempts=1,
                dispatched_at=db_time(-GRACE_S - 1))  # queued long ago, then trained until its worker died
    down = Broker(down=True)
    assert reap(sessions, down, MAX_ATTEMPTS) == 1  # handed back; the send failed and was logged
    assert _row(sessions, Job, lost).status == "queued"
    broker = Broker()
    assert reconcile(sessions, broker, GRACE_S) == 0  # the hand-back was a dispatch: not overdue yet
    _overdue(sessions, Job, lost)
    assert reconcile(sessions, broker, GRACE_S) == 1 and broker.sent == [("job", lost, "train")]


def test_a_job_trained_by_a_worker_killed_before_sending_its_audit_is_audited(rt, job_id):  # noqa: F811
    """``train`` commits ``auditing`` and returns; Celery sends the audit message only then. The commit records
    that dispatch, so a fresh hand-over is left alone and a stranded one is sent again after the grace."""
    _overdue(rt.sessions, Job, job_id)  # queued long before a worker took it
    assert train.train(rt, job_id, "w1/a") is True  # ... and the worker dies here, the audit never sent
    broker = Broker()
    assert reconcile(rt.sessions, broker, GRACE_S) == 0
    _overdue(rt.sessions, Job, job_id)
    assert reconcile(rt.sessions, broker, GRACE_S) == 1 and broker.sent == [("job", job_id, "audit")]


def test_a_stage_that_cannot_reach_the_database_leaves_the_job_for_the_reconciler(rt, job_id, monkeypatch):  # noqa: F811
    """The database is down when the task starts: the task stops quietly (``Ignore``, so the failure link does
    not fail a job that was never at fault), the job stays queued, and the reconciler sends it again."""
    refused = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/down", connect_args={"connect_timeout": 3})

    def runtime():
        with refused.connect():  # what opening the runtime does first
            pass

    monkeypatch.setattr(tasks, "runtime", runtime)

    class Task:
        name = "gate.train"

    with pytest.raises(Ignore):
        tasks._stage(Task(), train.train, job_id, "w1/a")
    assert _row(rt.sessions, Job, job_id).status == "queued"
    _overdue(rt.sessions, Job, job_id)
    broker = Broker()
    assert reconcile(rt.sessions, broker, GRACE_S) == 1 and broker.sent == [("job", job_id, "train")]


@pytest.mark.parametrize("refused", [True, False], ids=["broker-refused", "stage-raised"])
def test_a_refused_audit_message_leaves_the_trained_job_to_the_reconciler(sessions, monkeypatch, refused):
    """The broker is down when Celery sends the audit message after ``train`` returned: the failure link runs,
    but the job (trained, committed) is not failed; the reconciler sends the message. A stage's own error still
    fails the job."""
    from kombu.exceptions import OperationalError as BrokerError

    trained = _job(sessions, "auditing", attempts=1)
    monkeypatch.setattr(tasks, "runtime", lambda: type("Runtime", (), {"sessions": sessions})())

    class Request:
        hostname, id, task = "w1", "a", "gate.train"

    error = BrokerError("Error 111 connecting to the broker") if refused else RuntimeError("the stage broke")
    tasks.job_failed.run(Request(), error, None, trained)
    assert _row(sessions, Job, trained).status == ("auditing" if refused else "failed")


# --- the attempts cap --------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", ["training", "auditing"])
def test_a_job_lost_in_its_last_attempt_fails_naming_attempts_and_the_last_loss(sessions, status):
    lost = _job(sessions, status, worker="w3/dead", lease_expires_at=db_time(-1), attempts=MAX_ATTEMPTS)
    broker = Broker()
    assert reap(sessions, broker, MAX_ATTEMPTS) == 1 and broker.sent == []
    job = _row(sessions, Job, lost)
    assert (job.status, job.worker, job.lease_expires_at) == ("failed", None, None) and job.finished_at
    assert job.error.startswith(f"gave up after {MAX_ATTEMPTS} attempts (max_attempts {MAX_ATTEMPTS}); the last: "
                                "lease of worker w3/dead expired at "), job.error
    assert _log(sessions, lost)[-1] == ("status", status, "failed", job.error)


def test_a_job_lost_before_its_last_attempt_is_handed_back_counting_the_attempt(sessions):
    """A reaped audit counts an attempt (training counts its own when it takes the job again)."""
    trained = _job(sessions, "auditing", worker="w1/dead", lease_expires_at=db_time(-1), attempts=MAX_ATTEMPTS - 1,
                   dispatched_at=db_time(-GRACE_S - 1))
    broker = Broker()
    assert reap(sessions, broker, MAX_ATTEMPTS) == 1 and broker.sent == [("job", trained, "audit")]
    job = _row(sessions, Job, trained)
    assert (job.status, job.worker, job.attempts) == ("auditing", None, MAX_ATTEMPTS)
    assert reconcile(sessions, broker, GRACE_S) == 0  # the hand-back recorded its dispatch


@pytest.mark.parametrize("attempts", [MAX_ATTEMPTS - 1, MAX_ATTEMPTS])
def test_a_hardening_run_lost_in_its_last_attempt_fails_like_a_job(sessions, attempts):
    """Hardening runs count their starts too: one that keeps losing its worker fails after ``max_attempts``
    instead of being handed back for ever; before that it is queued and dispatched again."""
    with sessions() as s:
        run = AlignmentRun(name="h", config={})
        s.add(run)
        s.flush()
        transition(s, run, "running", SYSTEM)
        s.execute(update(AlignmentRun).where(AlignmentRun.id == run.id)
                  .values(worker="w2/dead", lease_expires_at=db_time(-1), attempts=attempts))
        s.commit()
    broker = Broker()
    assert reap(sessions, broker, MAX_ATTEMPTS) == 1
    row = _row(sessions, AlignmentRun, run.id)
    if attempts < MAX_ATTEMPTS:
        assert row.status == "queued" and broker.sent == [("alignment", run.id, "align")]
        return
    assert (row.status, row.worker, row.lease_expires_at, broker.sent) == ("failed", None, None, [])
    assert row.error == (f"gave up after {MAX_ATTEMPTS} attempts (max_attempts {MAX_ATTEMPTS}); the last: "
                         "lease of worker w2/dead expired") and row.finished_at
    assert _log(sessions, run.id)[-1] == ("status", "running", "failed", row.error)


def test_starting_a_hardening_run_counts_an_attempt(rt, monkeypatch):  # noqa: F811
    import alignment.run
    from gate.pipeline.hardening import harden

    def broken(*args, **kwargs):
        raise RuntimeError("the GPU fell over")

    monkeypatch.setattr(alignment.run, "run_alignment", broken)
    with rt.sessions() as s:
        run = AlignmentRun(name="h", config={})
        s.add(run)
        s.commit()
    harden(rt, run.id, "w1")
    row = _row(rt.sessions, AlignmentRun, run.id)
    assert (row.status, row.attempts, row.error) == ("failed", 1, "RuntimeError: the GPU fell over")
