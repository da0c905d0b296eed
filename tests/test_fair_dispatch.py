"""Fair dispatch across tenants (``gate.pipeline.fairness``): at most ``tenant_dispatch_share`` of a tenant's jobs
are sent to the train queue and not started; the rest wait held and are sent round-robin as slots free, the share
holding with two dispatchers at once (SQLite and PostgreSQL), through the API's creation and requeue, the reaper's
hand-back, a job's start, and the outbox's re-send of a lost message."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from test_api import Env
from test_api_results import dataset_of, make_job
from test_pipeline import job_id, rt  # noqa: F401  (fixtures: a runtime, and a queued job on the world)
from test_reconcile import GRACE_S, Broker, sessions  # noqa: F401  (fixture: sessions on SQLite and PostgreSQL)

from gate.pipeline import train
from gate.pipeline.fairness import HELD_STAGE, admit, dispatch_waiting
from gate.pipeline.leases import claim, reap, reconcile
from gate.settings import Settings, SettingsError, load_settings
from gate.storage.clock import db_time
from gate.storage.models import BaseModel, Dataset, Job, Tenant

SHARE = 2
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Sent(list):
    """``send(job_id)`` for the fair dispatcher: records the ids it is handed, in order."""

    def __call__(self, job: str) -> None:
        self.append(job)


def _tenant(sessions, tenant: str) -> None:  # noqa: F811
    """A tenant with an accepted dataset, and a base model."""
    with sessions() as s:
        s.add(Tenant(id=tenant, name=tenant))
        base = BaseModel(name=f"m-{tenant}", path="/m", weights_sha256="a" * 64)
        dataset = Dataset(tenant_id=tenant, name="d", status="accepted", content_sha256="0" * 64,
                          artifact_path="k", size_bytes=1)
        s.add_all([base, dataset])
        s.commit()


def _submit(sessions, tenant: str, n: int, first_second: int = 0, share: int = SHARE,  # noqa: F811
            send=None) -> list[str]:
    """``n`` jobs of ``tenant`` created one second apart, each committed with its dispatch recorded and then
    admitted, or held and the tenant's held jobs dispatched by ``send``, as job creation does
    (``gate.service.queueing.hand_job_to_queues``); the ids of all of them, oldest first."""
    with sessions() as s:
        dataset_id = s.scalars(select(Dataset.id).where(Dataset.tenant_id == tenant)).first()
        base_id = s.scalars(select(BaseModel.id)).first()
    ids = []
    for i in range(n):
        with sessions() as s:
            job = Job(tenant_id=tenant, base_model_id=base_id, dataset_id=dataset_id, method="lora",
                      created_at=T0 + timedelta(seconds=first_second + i))
            s.add(job)
            s.commit()
            if not admit(s, job, share) and send is not None:
                dispatch_waiting(s, send, share, tenants=[tenant])
            ids.append(job.id)
    return ids


def _held(sessions, tenant: str) -> list[str]:  # noqa: F811
    with sessions() as s:
        return list(s.scalars(select(Job.id).where(Job.tenant_id == tenant, Job.status == "queued",
                                                   Job.dispatched_at.is_(None)).order_by(Job.created_at)))


def _sent_not_started(sessions, tenant: str) -> list[str]:  # noqa: F811
    with sessions() as s:
        return list(s.scalars(select(Job.id).where(Job.tenant_id == tenant, Job.status == "queued",
                                                   Job.dispatched_at.is_not(None)).order_by(Job.created_at)))


def _start(sessions, job_id: str, worker: str = "w1/a") -> None:  # noqa: F811
    """A worker takes the job for training, as ``train`` does."""
    with sessions() as s:
        assert claim(s, s.get(Job, job_id), worker, 30, to_state="training")
        s.commit()


def _dispatch(sessions, send, tenants=None) -> int:  # noqa: F811
    with sessions() as s:
        return dispatch_waiting(s, send, SHARE, tenants=tenants)


# --- through the API ---------------------------------------------------------------------------------------

@pytest.fixture
def env(tmp_path, migrated) -> Env:
    return Env(tmp_path, migrated)


def test_another_tenants_first_job_is_sent_before_the_third_of_a_tenant_with_ten(env):
    """Tenant A submits 10 jobs, then tenant B one: A's first two are sent, its other 8 wait held (201 queued,
    their stage saying why), B's is sent at once; A's third goes once A's first starts."""
    a_jobs = [env.job(dataset_of(env, "a")) for _ in range(10)]
    assert {(r.status_code, r.json["status"]) for r in a_jobs} == {(201, "queued")}
    assert [r.json["stage"] for r in a_jobs] == [None, None] + [HELD_STAGE] * 8
    b_job = env.job(dataset_of(env, "b"), who="b")
    assert (b_job.status_code, b_job.json["stage"]) == (201, None)
    a = [r.json["id"] for r in a_jobs]
    assert env.enqueued == [a[0], a[1], b_job.json["id"]]
    seen = env.client.get(f"/v1/jobs/{a[2]}", headers=env.headers("a")).json
    assert (seen["status"], seen["stage"]) == ("queued", HELD_STAGE)
    _start(env.sessions, a[0])
    assert _dispatch(env.sessions, env.dispatcher.job) == 1
    assert env.enqueued == [a[0], a[1], b_job.json["id"], a[2]]


def test_a_held_job_does_not_need_the_broker_but_a_sent_one_fails_closed_without_it(env, monkeypatch):
    """With the broker down, a job held for fairness is still a 201 ``queued`` (nothing was sent); a job that
    would be sent is failed at once and answered 503 ``queue_unavailable``, as before."""
    first = [env.job(dataset_of(env, "a")).json["id"] for _ in range(SHARE)]

    def down(job: str) -> None:
        raise ConnectionError("Error 111 connecting to the broker")

    monkeypatch.setattr(env.dispatcher, "job", down)
    held = env.job(dataset_of(env, "a"))
    assert (held.status_code, held.json["status"], held.json["stage"]) == (201, "queued", HELD_STAGE)
    refused = env.job(dataset_of(env, "b"), who="b")
    assert (refused.status_code, refused.json["error"]["reason"]) == (503, "queue_unavailable")
    with env.sessions() as s:
        assert s.get(Job, refused.json["error"]["job"]).status == "failed"
        assert [s.get(Job, j).dispatched_at is not None for j in first] == [True, True]


def test_a_requeued_job_obeys_the_share(env):
    """An operator's requeue sends the job only if its tenant has a free slot; else it waits first in line."""
    failed = make_job(env, "failed")
    sent_before = list(env.enqueued)
    busy = [env.job(dataset_of(env, "a")).json["id"] for _ in range(SHARE)]
    r = env.client.post(f"/v1/jobs/{failed}/requeue", headers=env.headers("op"), json={"reason": "host repaired"})
    assert (r.status_code, r.json["status"], r.json["stage"]) == (202, "queued", HELD_STAGE)
    assert env.enqueued == sent_before + busy
    younger = env.job(dataset_of(env, "a")).json["id"]  # queued after it: behind it in line
    _start(env.sessions, busy[0])
    assert _dispatch(env.sessions, env.dispatcher.job) == 1
    assert env.enqueued[-1] == failed and _held(env.sessions, "acme") == [younger]


def test_a_requeued_job_of_a_tenant_with_a_free_slot_is_sent_at_once(env):
    failed = make_job(env, "failed")
    sent_before = list(env.enqueued)
    r = env.client.post(f"/v1/jobs/{failed}/requeue", headers=env.headers("op"), json={"reason": "host repaired"})
    assert (r.status_code, r.json["stage"]) == (202, None)
    assert env.enqueued == sent_before + [failed]


# --- the dispatcher ----------------------------------------------------------------------------------------

def test_held_jobs_go_round_robin_the_tenant_served_least_recently_first(sessions):  # noqa: F811
    """Three tenants with jobs held and free slots: one job of each in turn; a tenant with no job waiting for or
    in training first, then the one whose newest train dispatch is oldest; oldest job first within each."""
    lines = {}
    for tenant in ("c", "b", "a"):
        _tenant(sessions, tenant)
    for tenant, training_since in (("c", -10), ("b", -600)):  # c was served 10 s ago, b ten minutes ago
        (started,) = _submit(sessions, tenant, 1)
        with sessions() as s:
            s.execute(update(Job).where(Job.id == started).values(dispatched_at=db_time(training_since)))
            s.commit()
        _start(sessions, started)
    for tenant in ("c", "b", "a"):
        lines[tenant] = _submit(sessions, tenant, 3, share=0)  # a share of 0 holds them all
    sent = Sent()
    assert _dispatch(sessions, sent) == 6
    assert sent == [lines["a"][0], lines["b"][0], lines["c"][0], lines["a"][1], lines["b"][1], lines["c"][1]]
    assert all(len(_sent_not_started(sessions, tenant)) == SHARE for tenant in lines)
    assert _dispatch(sessions, sent) == 0  # every slot taken: the third of each waits


def test_two_dispatchers_at_once_never_exceed_the_share_nor_send_a_job_twice(sessions):  # noqa: F811
    """Each round one job of the tenant starts and two dispatchers (and a new job's admission) race for the freed
    slot: the tenant never has more than its share in flight, and every job is sent once."""
    _tenant(sessions, "acme")
    jobs = _submit(sessions, "acme", 16)
    sent, lock = Sent(), threading.Lock()

    def send(job: str) -> None:
        with lock:
            sent.append(job)

    for turn in range(10):
        _start(sessions, _sent_not_started(sessions, "acme")[0], worker=f"w/{turn}")
        barrier = threading.Barrier(3)
        errors = []

        def race(action):
            try:
                barrier.wait()
                action()
            except Exception as exc:  # reported below: a thread's failure must fail the test
                errors.append(exc)

        threads = [threading.Thread(target=race, args=(lambda: _dispatch(sessions, send),)) for _ in range(2)]
        threads.append(threading.Thread(target=race, args=(
            lambda: jobs.extend(_submit(sessions, "acme", 1, 100 + turn, send=send)),)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(_sent_not_started(sessions, "acme")) == SHARE, turn
    assert len(sent) == len(set(sent)) == 10 and set(sent) <= set(jobs)


# --- a job's start, the reaper and the outbox --------------------------------------------------------------

def test_a_held_job_is_dispatched_once_the_tenants_first_starts_training(rt, job_id, monkeypatch):  # noqa: F811
    """The train stage calls ``started`` once it has taken the job; the worker's hook sends the tenant's next held
    job then, not at the reaper's next pass."""
    more = _submit(rt.sessions, "acme", 2)  # with the fixture's job, the tenant's slots are taken
    assert _held(rt.sessions, "acme") == more[1:]
    sent = Sent()

    class Stop(Exception):
        """Ends the stage here: the slot is what is tested, not the training."""

    def started(tenant: str) -> None:
        _dispatch(rt.sessions, sent, [tenant])
        raise Stop

    with pytest.raises(Stop):
        train.train(rt, job_id, "w1/a", started=started)
    assert sent == more[1:] and _held(rt.sessions, "acme") == []


def test_the_workers_start_hook_sends_the_tenants_next_held_job(rt, job_id, monkeypatch):  # noqa: F811
    """``gate.worker.tasks`` hands the train stage a ``started`` that dispatches through the worker's Celery app."""
    from gate.worker import tasks

    more = _submit(rt.sessions, "acme", 2)
    sent = Sent()
    monkeypatch.setattr(tasks, "runtime", lambda: rt)
    monkeypatch.setattr(tasks, "CeleryDispatcher", lambda app: type("Dispatcher", (), {"job": staticmethod(sent)}))
    _start(rt.sessions, job_id)
    tasks._send_next_of(app=None)("acme")
    assert sent == more[1:]


def test_a_job_handed_back_by_the_reaper_waits_for_a_slot_first_in_line(sessions):  # noqa: F811
    """A training job whose worker died goes back to the train queue's line of its tenant: held while the tenant's
    slots are taken, then sent before the tenant's younger jobs."""
    _tenant(sessions, "acme")
    (lost,) = _submit(sessions, "acme", 1)
    _start(sessions, lost, worker="w1/dead")
    with sessions() as s:
        s.execute(update(Job).where(Job.id == lost).values(lease_expires_at=db_time(-1), attempts=1))
        s.commit()
    busy = _submit(sessions, "acme", SHARE + 1, first_second=10)
    broker = Broker()
    assert reap(sessions, broker, 3, SHARE) == 1 and broker.sent == []
    assert _held(sessions, "acme") == [lost, busy[-1]]
    _start(sessions, busy[0])
    sent = Sent()
    assert _dispatch(sessions, sent) == 1 and sent == [lost]


def test_a_lost_message_of_a_fairly_dispatched_job_is_sent_again(sessions):  # noqa: F811
    """The dispatcher's send is lost (or refused): the job stays in flight, so it keeps its slot and nothing else
    of its tenant is sent; past the grace the reconciler sends it again."""
    _tenant(sessions, "acme")
    jobs = _submit(sessions, "acme", SHARE + 2)
    _start(sessions, jobs[0])
    down = Broker(down=True)
    assert _dispatch(sessions, lambda job: down("job", job, "train")) == 1  # marked sent; the send failed
    assert _held(sessions, "acme") == [jobs[-1]]
    assert _dispatch(sessions, Sent()) == 0  # its slot is still taken
    broker = Broker()
    assert reconcile(sessions, broker, GRACE_S) == 0
    with sessions() as s:
        s.execute(update(Job).where(Job.id == jobs[SHARE]).values(dispatched_at=db_time(-GRACE_S - 1)))
        s.commit()
    assert reconcile(sessions, broker, GRACE_S) == 1 and broker.sent == [("job", jobs[SHARE], "train")]
    assert reconcile(sessions, Broker(), GRACE_S) == 0  # the held job is no outbox entry: never re-sent
    assert _held(sessions, "acme") == [jobs[-1]]


# --- the setting -------------------------------------------------------------------------------------------

def test_the_share_is_a_setting_checked_at_start_up(tmp_path):
    assert load_settings({"FTGATE_STATE_DIR": str(tmp_path), "FTGATE_TENANT_DISPATCH_SHARE": "5"}) \
        .tenant_dispatch_share == 5
    with pytest.raises(SettingsError) as refused:
        load_settings({"FTGATE_STATE_DIR": str(tmp_path), "FTGATE_TENANT_DISPATCH_SHARE": "0"})
    assert refused.value.field == "tenant_dispatch_share"
    assert "tenant_dispatch_share must be greater than or equal to 1 (got 0)" in str(refused.value)
    with pytest.raises(SettingsError, match=r"tenant_dispatch_share must be less than or equal to 10000 \(got 10001\)"):
        load_settings({"FTGATE_STATE_DIR": str(tmp_path), "FTGATE_TENANT_DISPATCH_SHARE": "10001"})
    assert Settings.tenant_dispatch_share == SHARE  # the default these tests assume
