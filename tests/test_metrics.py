"""Prometheus metrics (``gate.metrics``, ``/metrics``): what separate worker processes record adds up in one
scrape, the database-derived families count what the database holds, queue lengths are read from a real
Redis, and every family follows the naming rules (``ftgate_`` prefix, units, bounded labels)."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from test_api import Env, RecordingDispatcher
from test_api_results import make_job, move

from auditing.verdict import INCOMPLETE
from gate.api import create_app
from gate.api import metrics as api_metrics
from gate.storage.audit_log import SYSTEM, transition
from gate.storage.models import Job, Verdict, utcnow
from gate.worker.app import QUEUES, make_celery
from gate.worker.broker import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_REDIS = "redis://127.0.0.1:6379/12"
# The only label names the gate exports (bounded sets); an id as a label value is refused below.
BOUNDED_LABELS = {"status", "method", "outcome", "decision", "queue", "stage", "model", "reason"}
ID_LIKE = re.compile(r"[0-9a-f]{32}")
STAGE_S = 0.05  # how long each simulated stage sleeps

# A worker as ``ftgate worker`` runs one: the parent starts its metrics group, then every job runs in a
# forked child that exits after it (``worker_max_tasks_per_child = 1``) and runs the exit hook of
# gate.worker.tasks. argv: metrics_dir group jobs images_per_job
WORKER = textwrap.dedent(f"""
    import multiprocessing, os, sys, time
    from pathlib import Path
    from gate import metrics

    def job(images):
        with metrics.stage("train"):
            time.sleep({STAGE_S})
        with metrics.stage("audit"):
            metrics.audit_images("checkpoint", images)
        metrics.process_exited(os.getpid())

    metrics.start_group(Path(sys.argv[1]), sys.argv[2])
    for _ in range(int(sys.argv[3])):
        child = multiprocessing.get_context("fork").Process(target=job, args=(int(sys.argv[4]),))
        child.start()
        child.join()
        assert child.exitcode == 0, child.exitcode
""")

# A job process killed (kill -9) in the middle of training, then the next job process starting, with a
# pause between for the test to scrape. argv: metrics_dir group
KILLED = textwrap.dedent("""
    import multiprocessing, os, signal, sys
    from pathlib import Path
    from gate import metrics

    def killed():
        with metrics.stage("train"):
            os.kill(os.getpid(), signal.SIGKILL)

    metrics.start_group(Path(sys.argv[1]), sys.argv[2])
    fork = multiprocessing.get_context("fork")
    child = fork.Process(target=killed)
    child.start()
    child.join()
    print(child.exitcode, flush=True)
    sys.stdin.readline()
    child = fork.Process(target=metrics.forget_dead_processes)  # what a new job process does at start
    child.start()
    child.join()
""")


def run_worker(metrics_dir: Path, group: str, jobs: int, images: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(metrics_dir), group, str(jobs), str(images)], cwd=ROOT)


def scrape_text(text: str) -> dict:
    """The families of a scrape, checked against the naming rules."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for f in families.values():
        assert f.name.startswith("ftgate_"), f.name
        assert f.type in ("counter", "gauge", "histogram"), (f.name, f.type)
        if f.type == "histogram":
            assert f.name.endswith("_seconds"), f.name
        for s in f.samples:
            if f.type == "counter":
                assert s.name == f"{f.name}_total", s.name
            assert set(s.labels) - {"le"} <= BOUNDED_LABELS, (s.name, s.labels)
            assert not any(ID_LIKE.search(v) for v in s.labels.values()), (s.name, s.labels)
    return families


def scrape(env: Env, client=None) -> dict:
    """One scrape of ``/metrics`` (``env``'s app unless ``client`` is given) with the operator's key."""
    r = (client or env.client).get("/metrics", headers=env.headers("op"))
    assert r.status_code == 200 and r.mimetype == "text/plain"
    return scrape_text(r.get_data(as_text=True))


def samples(families: dict, family: str, sample: str | None = None) -> dict[tuple, float]:
    """``{sorted label items: value}`` of one family's samples named ``sample`` (default: the family's own)."""
    if family not in families:
        return {}
    name = sample or (f"{family}_total" if families[family].type == "counter" else family)
    return {tuple(sorted(s.labels.items())): s.value for s in families[family].samples if s.name == name}


@pytest.fixture
def env(tmp_path, migrated) -> Env:
    return Env(tmp_path, migrated)


def test_observations_of_two_worker_processes_add_up_in_one_scrape(env):
    """Two workers (separate OS processes, each forking one process per job, as the prefork pool does)
    record stage durations and rendered images; one scrape of /metrics sums them, dead job processes
    included, and their stages no longer count as running."""
    metrics_dir = env.settings.metrics_dir
    plan = {"worker-a": (2, 3), "worker-b": (1, 5)}  # group: (jobs, images per job)
    workers = [run_worker(metrics_dir, group, jobs, images) for group, (jobs, images) in plan.items()]
    assert [w.wait(60) for w in workers] == [0, 0]
    jobs = sum(j for j, _ in plan.values())
    families = scrape(env)
    count = samples(families, "ftgate_stage_duration_seconds", "ftgate_stage_duration_seconds_count")
    assert count == {(("stage", "train"),): jobs, (("stage", "audit"),): jobs}
    seconds = samples(families, "ftgate_stage_duration_seconds", "ftgate_stage_duration_seconds_sum")
    assert seconds[(("stage", "train"),)] >= jobs * STAGE_S
    buckets = samples(families, "ftgate_stage_duration_seconds", "ftgate_stage_duration_seconds_bucket")
    assert buckets[(("le", "+Inf"), ("stage", "train"))] == jobs
    assert buckets[(("le", "15.0"), ("stage", "train"))] == jobs  # each slept a fraction of a second
    images = samples(families, "ftgate_audit_images_rendered")
    assert images == {(("model", "checkpoint"),): sum(j * n for j, n in plan.values())}
    assert all(v == 0 for v in samples(families, "ftgate_stages_in_progress").values())
    # The database-derived families are in the same scrape.
    assert {"ftgate_jobs", "ftgate_jobs_submitted", "ftgate_jobs_finished", "ftgate_verdicts"} <= set(families)


def test_a_worker_restart_wipes_only_its_own_group(env):
    """A worker starting again clears its group's old files (the library requires it) but leaves another
    worker's, which the exporter keeps summing."""
    metrics_dir = env.settings.metrics_dir
    for group, images in (("worker-a", 3), ("worker-b", 5), ("worker-a", 7)):  # worker-a runs twice
        assert run_worker(metrics_dir, group, 1, images).wait(60) == 0
    assert samples(scrape(env), "ftgate_audit_images_rendered") == {(("model", "checkpoint"),): 5 + 7}


def test_a_killed_job_process_stops_counting_as_running_when_the_next_starts(env):
    """A job process killed with SIGKILL never runs its exit hook: its stage shows as running until the
    next job process of the worker starts and marks it dead."""
    worker = subprocess.Popen([sys.executable, "-c", KILLED, str(env.settings.metrics_dir), "worker-k"], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == str(-signal.SIGKILL)
        assert samples(scrape(env), "ftgate_stages_in_progress") == {(("stage", "train"),): 1}
        worker.stdin.write("go\n")
        worker.stdin.flush()
        assert worker.wait(60) == 0
    finally:
        worker.kill()
        worker.wait()
    assert all(v == 0 for v in samples(scrape(env), "ftgate_stages_in_progress").values())


def test_intake_rejections_and_validation_time_recorded_in_an_api_process(env, tmp_path):
    """The intake, run in an API process of the ``api`` group, counts a refused upload by its reason code
    and times the validation."""
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from gate import metrics
        from gate.intake import IntakeError, IntakeLimits, ingest

        metrics.start_group(Path(sys.argv[1]), "api")
        for _ in range(2):
            try:
                ingest(Path(sys.argv[2]), IntakeLimits(), Path(sys.argv[3]), scanner=None)
            except IntakeError as exc:
                assert exc.reason == "not_a_zip", exc.reason
            else:
                raise AssertionError("the intake accepted a file that is not a zip")
    """)
    upload = tmp_path / "upload.zip"
    upload.write_bytes(b"plain text, not a zip archive")
    subprocess.run([sys.executable, "-c", script, str(env.settings.metrics_dir), str(upload), str(tmp_path / "out")],
                   cwd=ROOT, check=True, timeout=60)
    families = scrape(env)
    assert samples(families, "ftgate_intake_rejections") == {(("reason", "not_a_zip"),): 2}
    count = samples(families, "ftgate_stage_duration_seconds", "ftgate_stage_duration_seconds_count")
    assert count == {(("stage", "validate"),): 2}


def test_waiting_ages_and_incomplete_audits_for_the_alert_rules(env, monkeypatch):
    """``ftgate_oldest_job_age_seconds`` dates a waiting job from when it entered its status (a later write to
    the row does not reset it); ``ftgate_verdicts_incomplete`` counts fail-closed verdicts."""
    assert samples(scrape(env), "ftgate_oldest_job_age_seconds") == {(("status", "queued"),): 0.0,
                                                                     (("status", "review"),): 0.0}
    queued = make_job(env, "queued")
    make_job(env, "withheld")
    monkeypatch.setattr(api_metrics, "utcnow", lambda: utcnow() + timedelta(hours=1))  # scrape an hour later
    make_job(env, "review")  # entered review just now
    with env.sessions() as s:
        job = s.get(Job, queued)  # a write to the queued job's row 50 minutes after it was queued
        job.dispatched_at = job.updated_at = utcnow() + timedelta(minutes=50)
        verdict = s.scalars(select(Verdict).where(Verdict.decision == "block")).one()
        verdict.reasons = [f"lora scale 1: {INCOMPLETE}: the renderer raised"]
        s.commit()
    families = scrape(env)
    ages = samples(families, "ftgate_oldest_job_age_seconds")
    assert 3600 <= ages[(("status", "queued"),)] < 3600 + 120
    assert 3600 <= ages[(("status", "review"),)] < 3600 + 120
    assert samples(families, "ftgate_verdicts_incomplete") == {(): 1}
    with env.sessions() as s:  # the queued job starts: it no longer waits
        transition(s, s.get(Job, queued), "training", SYSTEM)
        s.commit()
    assert samples(scrape(env), "ftgate_oldest_job_age_seconds")[(("status", "queued"),)] == 0.0


def test_database_families_count_jobs_datasets_and_verdicts(env):
    """Jobs by status and method, submissions, finished runs by outcome, datasets and verdicts come from the
    database; a finished-runs counter never goes down when a failed job is queued again."""
    made = [("released", "lora"), ("withheld", "lora"), ("failed", "lora"), ("cancelled", "lora"),
            ("review", "dreambooth"), ("queued", "dreambooth")]
    ids = {make_job(env, state, method=method): (state, method) for state, method in made}
    families = scrape(env)
    by_state = Counter((m, s) for s, m in made)
    assert samples(families, "ftgate_jobs") == {(("method", m), ("status", s)): n for (m, s), n in by_state.items()}
    assert samples(families, "ftgate_jobs_submitted") == {(("method", m),): n
                                                         for m, n in Counter(m for _, m in made).items()}
    ended = {(("method", m), ("outcome", s)): 1 for s, m in made if s not in ("review", "queued")}
    assert samples(families, "ftgate_jobs_finished") == ended
    assert samples(families, "ftgate_datasets") == {(("status", "accepted"),): 1}
    assert samples(families, "ftgate_verdicts") == {(("decision", d),): 1 for d in ("pass", "block", "flag")}

    failed = next(i for i, (s, _) in ids.items() if s == "failed")
    with env.sessions() as s:  # an operator queues the failed job again; it is then released
        transition(s, s.get(Job, failed), "queued", SYSTEM)
        s.commit()
    move(env, failed, "released")
    families = scrape(env)
    assert (("method", "lora"), ("status", "failed")) not in samples(families, "ftgate_jobs")
    again = samples(families, "ftgate_jobs_finished")
    assert again[(("method", "lora"), ("outcome", "failed"))] == 1
    assert again[(("method", "lora"), ("outcome", "released"))] == 2


@pytest.fixture
def broker(tmp_path):
    """A real Redis for the queue test: the machine's on 127.0.0.1:6379 (db 12) when it answers, else the
    embedded one. Yields its URL (None for the embedded one, as Settings has it) and a client."""
    try:
        client = redis.Redis.from_url(SYSTEM_REDIS, socket_timeout=1)
        client.flushdb()
    except redis.RedisError:
        embedded = EmbeddedRedis(tmp_path / "state" / "redis")
        embedded.ensure_running()
        client = redis.Redis(unix_socket_path=str(embedded.socket))
        yield None, client
        embedded.stop()
        return
    yield SYSTEM_REDIS, client
    client.flushdb()


def test_queue_lengths_are_read_from_the_broker(env, broker, monkeypatch):
    """Messages sent through Celery, some with priorities (kombu keeps those under suffixed keys), show as
    the queues' lengths; a broker that does not answer gives ftgate_broker_up 0 and the scrape still works."""
    url, client = broker
    settings = dataclasses.replace(env.settings, broker_url=url)
    celery = make_celery(settings)
    sent = {"train": [None, None, None], "audit": [5, 9], "align": [None]}  # queue: the priority of each message
    task_of = {"train": "gate.train", "audit": "gate.audit", "align": "gate.align"}
    for queue, priorities in sent.items():
        for priority in priorities:
            celery.send_task(task_of[queue], args=("0" * 8,), priority=priority)
    assert client.llen("audit") == 0  # prioritised messages are not in the plain list
    app = create_app(settings, dispatcher=RecordingDispatcher())
    families = scrape(env, app.test_client())
    assert samples(families, "ftgate_broker_up") == {(): 1}
    assert samples(families, "ftgate_queue_messages") == {(("queue", q),): len(sent.get(q, [])) for q in QUEUES}

    down = dataclasses.replace(env.settings, broker_url="redis://127.0.0.1:1/0")
    attempts = []
    connect = redis.connection.Connection._connect
    monkeypatch.setattr(redis.connection.Connection, "_connect", lambda self: attempts.append(1) or connect(self))
    families = scrape(env, create_app(down, dispatcher=RecordingDispatcher()).test_client())
    assert samples(families, "ftgate_broker_up") == {(): 0}
    assert "ftgate_queue_messages" not in families
    assert len(attempts) == 1  # one try, not redis-py's default ten with backoff: a scrape must not hang


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_exporter_serves_the_same_process_figures(env):
    """``ftgate exporter`` (what ``ftgate worker --metrics-port`` starts) serves what the processes under
    metrics_dir recorded, the same figures the API's /metrics merges."""
    assert run_worker(env.settings.metrics_dir, "worker-a", 2, 4).wait(60) == 0
    port = _free_port()
    exporter = subprocess.Popen([sys.executable, "-m", "gate.cli", "exporter", "--port", str(port)], cwd=ROOT,
                                env={**os.environ, "FTGATE_STATE_DIR": str(env.state)})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                break
            except requests.ConnectionError:
                assert exporter.poll() is None and time.monotonic() < deadline, "the exporter did not start"
                time.sleep(0.1)
    finally:
        exporter.terminate()
        exporter.wait()
    served = scrape_text(text)
    api = scrape(env)
    assert set(served) == {"ftgate_stage_duration_seconds", "ftgate_audit_images_rendered"}
    for name in served:
        kinds = {s.name for s in served[name].samples}
        assert kinds == {s.name for s in api[name].samples}
        assert all(samples(served, name, kind) == samples(api, name, kind) for kind in kinds)
    assert samples(served, "ftgate_audit_images_rendered") == {(("model", "checkpoint"),): 2 * 4}
