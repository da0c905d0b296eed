"""Fault injection for the gate on one machine: workers killed mid-stage, a broker restarted under queued jobs,
an auditor that crashes or hangs. Used by ``tests/test_faults.py`` and ``python -m benchmarks.gate_faults``.

Two halves:

* **In the worker** (``python -m gate.worker.faults worker ...``, what ``LocalGate(worker_module=MODULE)``
  starts): the ordinary ``ftgate worker`` with hooks around the pipeline, each armed by a file in
  ``<state_dir>/faults/``. ``pause-<stage>`` (one-shot: the first process to remove the file takes it)
  stops the job process at a known point of that stage and writes ``paused-<stage>`` with its process
  group, so the driver can ``kill -9`` it exactly there: *train* mid-training (after the first progress
  report), *audit* mid-audit (images rendered, the detector about to score them), *decide* inside the
  verdict's transaction (the verdict row and the job's move written, not committed), *stored*, the
  narrow window of training in which the checkpoint file is in the store but its row is not committed, and
  *trained*, after training committed but before Celery sends the audit message (the task has not returned).
  While a file ``detector-raises`` exists every job audit's detector raises; while ``render-hangs`` exists
  every job audit's pipeline call sleeps, as a stuck renderer would (training and baselines are left alone);
  while ``database-down`` exists every database connection a task's job process opens is refused (each
  refusal writes ``refused-database``). Nothing here is imported by ``ftgate worker`` itself.
* **The driver** (``GateSession``, ``kill_cycle``, ``broker_at_reap_cycle``, ``database_at_start_cycle``,
  ``lost_messages``, ``broker_restart``, ``auditor_failure``): a ``LocalGate`` with an operator, a customer and
  the shapes world registered as a base model, jobs submitted over HTTP through the shipped client
  (``gate.client``), and each scenario's outcome counted from the database and the artifact store.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from auditing.files import atomic_write

log = logging.getLogger(__name__)

MODULE = "gate.worker.faults"
STAGES = ("train", "audit", "decide")
KILL_POINTS = (*STAGES, "stored", "trained")
# Outages that strand a job with no lease to expire: the broker down when the reaper sends a reaped job again,
# the database down when a task starts. With "trained" (and lost_messages), only the reconciler recovers them.
OUTAGES = ("broker-at-reap", "database-at-start")
WINDOWS = (*KILL_POINTS, *OUTAGES)
FINAL = ("released", "review", "withheld", "failed")
DECISION_STATES = {"released": "pass", "review": "flag", "withheld": "block"}
DETECTOR_RAISES, RENDER_HANGS = "detector-raises", "render-hangs"
DATABASE_DOWN, REFUSED_DATABASE = "database-down", "refused-database"
GRACE_S = 5  # the campaigns' dispatch grace: a stranded job is sent again within seconds, not minutes
# One customer submits all of a campaign's jobs, and the campaigns count their messages in the broker: each may
# be there at once (fair dispatch across tenants is tested in tests/test_fair_dispatch.py, the active-job quota in
# tests/test_quotas.py).
DISPATCH_SHARE = 1_000
SEND_REFUSED_S = 3.0  # how long the broker stays down after the reaper's hand-back (its send fails meanwhile)
PAUSE_S = 600.0  # a paused job process carries on after this if nobody killed it
HANG_S = 3600.0
POLL_S = 0.2
WAIT_S = 600.0
PROBES = "prompt\na red triangle\na blue circle\na green square\n"
PROFILE = {"detector": "shapes", "detector_options": {"concept": "red triangle"}, "images_per_prompt": 2,
           "inference_steps": 8, "guidance_scale": 5.0, "batch_size": 8}
HYPERPARAMETERS = {"rank": 2, "learning_rate": 1e-3, "batch_size": 4}
DATASET_IMAGES = 8
# The cheapest job that still reports progress mid-training (a report comes after each step but the last).
KILL_STEPS = 2
KILL_PROFILE = {**PROFILE, "images_per_prompt": 1, "inference_steps": 2}


# ---------------------------------------------------------------------------------------------- in the worker

class _Faults:
    """The armed faults: files in one folder, read at each hook."""

    def __init__(self, folder: Path):
        self.folder = folder

    def armed(self, name: str) -> bool:
        return (self.folder / name).exists()

    def pause(self, stage: str) -> None:
        try:
            (self.folder / f"pause-{stage}").unlink()  # one-shot: exactly one process takes it
        except FileNotFoundError:
            return
        atomic_write(self.folder / f"paused-{stage}", json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0)}))
        log.warning("injected fault: %s stage paused in process %d, waiting to be killed", stage, os.getpid())
        time.sleep(PAUSE_S)


class _InjectedPipeline:
    """A job audit's pipeline with the armed faults in front of each call (one call renders one batch)."""

    def __init__(self, pipe, faults: _Faults):
        self._pipe, self._faults = pipe, faults

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        if self._faults.armed(RENDER_HANGS):
            log.warning("injected fault: the renderer hangs")
            time.sleep(HANG_S)
        return self._pipe(*args, **kwargs)


class _InjectedDetector:
    """A job audit's detector with the armed faults in front of ``detect``."""

    def __init__(self, detector, faults: _Faults):
        self._detector, self._faults = detector, faults

    def __getattr__(self, name):
        return getattr(self._detector, name)

    def detect(self, images):
        self._faults.pause("audit")
        if self._faults.armed(DETECTOR_RAISES):
            raise RuntimeError("injected fault: the detector crashed")
        return self._detector.detect(images)


def install(folder: Path) -> None:
    """Wrap the pipeline's stages with the hooks armed by files in ``folder``."""
    from celery import current_task
    from sqlalchemy import event

    from gate.pipeline import audit, runtime, train, verdict
    from gate.storage.artifacts import ArtifactStore

    faults = _Faults(folder)
    report_progress, audit_families, transition = train._report_progress, audit.audit_families, verdict.transition
    put, run_train, make_engine = ArtifactStore.put, train.train, runtime.make_engine

    def paused_progress(*args):
        progress = report_progress(*args)

        def report(fraction: float, stage: str) -> None:
            progress(fraction, stage)
            if 0.0 < fraction < 1.0:
                faults.pause("train")

        return report

    def faulty_audit(pipe, detector, inputs, *args, **kwargs):
        if inputs.adapter_sha256 is not None:  # a job's checkpoint, not a base model's baseline
            pipe, detector = _InjectedPipeline(pipe, faults), _InjectedDetector(detector, faults)
        return audit_families(pipe, detector, inputs, *args, **kwargs)

    def paused_transition(session, entity, to_state, *args, **kwargs):
        transition(session, entity, to_state, *args, **kwargs)
        if to_state in verdict.OUTCOME.values():
            faults.pause("decide")

    def paused_put(store, tenant_id, source, *, suffix="", **kwargs):
        stored = put(store, tenant_id, source, suffix=suffix, **kwargs)
        if suffix == ".safetensors":  # only training stores checkpoints
            faults.pause("stored")
        return stored

    def paused_train(*args):
        trained = run_train(*args)
        if trained:
            faults.pause("trained")
        return trained

    def refuse(dialect, *_):
        if faults.armed(DATABASE_DOWN):
            atomic_write(folder / REFUSED_DATABASE, str(os.getpid()))
            raise dialect.loaded_dbapi.OperationalError("injected fault: the database is down")

    def refusing_engine(url, **kwargs):
        engine = make_engine(url, **kwargs)
        if current_task:  # a job process's runtime, opened by its task (the worker's start-up check is left alone)
            event.listen(engine, "do_connect", refuse)
        return engine

    train._report_progress, audit.audit_families, verdict.transition = paused_progress, faulty_audit, paused_transition
    ArtifactStore.put, train.train, runtime.make_engine = paused_put, paused_train, refusing_engine


def main() -> int:
    """``python -m gate.worker.faults worker ...``: ``ftgate`` with the hooks installed."""
    from gate.cli import main as ftgate
    from gate.settings import load_settings

    install(load_settings().state_dir / "faults")
    return ftgate()


# ---------------------------------------------------------------------------------------------- the driver

class GateSession:
    """A running ``LocalGate`` (workers that take injected faults) with an operator and a customer key and the
    shapes world registered as a base model with a small audit profile; jobs go in over HTTP."""

    def __init__(self, root: str | Path, lease_seconds: int, env: dict[str, str] | None = None, workers: int = 1,
                 profile: dict | None = None, worker_module: str = MODULE):
        """``worker_module``: ``gate.cli`` for workers without the fault hooks."""
        from gate.worker.local import LocalGate

        self.root = Path(root)
        self.gate = LocalGate(self.root / "state", env={"FTGATE_LEASE_SECONDS": str(lease_seconds),
                                                          "FTGATE_TENANT_DISPATCH_SHARE": str(DISPATCH_SHARE),
                                                          "FTGATE_MAX_ACTIVE_JOBS": str(DISPATCH_SHARE),
                                                          **(env or {})}, worker_module=worker_module)
        self.faults = self.gate.state_dir / "faults"
        self._workers, self.profile = workers, {**PROFILE, **(profile or {})}
        self._dataset: str | None = None

    def __enter__(self) -> GateSession:
        from auditing.shapes.cli import PRETRAINED_WORLD
        from gate.auth import create_key, ensure_tenant
        from gate.client import Client, GateError
        from gate.storage.audit_log import SYSTEM
        from gate.storage.db import make_engine, session_factory

        self.faults.mkdir(parents=True, exist_ok=True)
        try:
            self.gate.start(workers=self._workers)
            self.engine = make_engine(self.gate.settings.database_url)
            self.sessions = session_factory(self.engine)
            with self.sessions() as s:
                for tenant in ("platform", "acme"):
                    ensure_tenant(s, tenant, SYSTEM)
                self.keys = {"op": create_key(s, "platform", "operator", SYSTEM).key,
                             "a": create_key(s, "acme", "customer", SYSTEM).key}
                s.commit()
            self.clients = {who: Client(self.gate.url, key) for who, key in self.keys.items()}
            probes = self.root / "probes.csv"
            probes.write_text(PROBES)
            try:
                self.base_model = self.clients["op"].create_base_model(
                    "world", str(PRETRAINED_WORLD), {"probes": str(probes), **self.profile})["id"]
            except GateError as exc:
                raise RuntimeError(f"registering the base model: {exc}") from None
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.gate.stop()
        if hasattr(self, "engine"):
            self.engine.dispose()

    # HTTP, as a client sees the gate (``who``: "op", the operator, or "a", the customer)
    def post(self, who: str, path: str, **kwargs):
        """The response, whatever its status (the scenarios check refusals too)."""
        return self.clients[who].request("POST", path, check=False, **kwargs)

    def get(self, who: str, path: str):
        return self.clients[who].request("GET", path, check=False)

    def dataset(self) -> str:
        """The customer's dataset (uploaded once; every job trains on it), taken in by a worker: in a session
        started without workers, one that consumes only the intake queue (no jobs, no reaper)."""
        if self._dataset is None:
            from gate.client import GateError
            from gate.demo import customer_zip

            if not any(worker.poll() is None for worker in self.gate.workers):
                self.gate.start_worker(queues="intake", reaper=False)
            try:
                dataset = self.clients["a"].upload_dataset(customer_zip(0.0, DATASET_IMAGES), filename="d.zip")
            except GateError as exc:
                raise RuntimeError(f"uploading the dataset: {exc}") from None
            if dataset["status"] != "accepted":
                raise RuntimeError(f"the dataset's intake ended {dataset['status']}: "
                                   f"{dataset['refusal'] or dataset['error']}")
            self._dataset = dataset["id"]
        return self._dataset

    def _job_body(self, steps: int, seed: int) -> dict:
        return {"base_model": self.base_model, "dataset": self.dataset(), "method": "lora",
                "hyperparameters": {**HYPERPARAMETERS, "steps": steps, "seed": seed}}

    def request_job(self, steps: int, seed: int = 0):
        """``POST /v1/jobs`` for a LoRA job on the customer's dataset; the response, whatever it is."""
        return self.post("a", "/v1/jobs", json=self._job_body(steps, seed))

    def submit(self, steps: int, seed: int = 0) -> str:
        from gate.client import GateError

        try:
            return self.clients["a"].create_job(**self._job_body(steps, seed))["id"]
        except GateError as exc:
            raise RuntimeError(f"submitting a job: {exc}") from None

    def wait(self, job_id: str, until, timeout_s: float = WAIT_S) -> dict:
        from gate.client import WaitTimeout

        try:
            return self.clients["a"].wait(job_id, until=until, timeout_s=timeout_s, poll_s=POLL_S, max_poll_s=POLL_S)
        except WaitTimeout as exc:
            raise TimeoutError(f"job {job_id} never got there; last seen {exc.jobs[job_id]}; "
                               f"logs in {self.gate.log_dir}") from None

    def wait_final(self, job_id: str, timeout_s: float = WAIT_S) -> dict:
        return self.wait(job_id, lambda j: j["status"] in FINAL, timeout_s)

    def wait_baseline(self, timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.clients["op"].base_model(self.base_model)["baseline_ready"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no baseline after {timeout_s:g} s; logs in {self.gate.log_dir}")
            time.sleep(POLL_S)

    # the database and the store, as an operator checks them
    def count(self, model, job_id: str) -> int:
        from sqlalchemy import func, select

        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(model).where(model.job_id == job_id))

    def job_row(self, job_id: str) -> dict:
        """The job's state and its result rows, committed ones only (what a crash leaves)."""
        from gate.storage.models import Artifact, Audit, Job, Verdict

        with self.sessions() as s:
            job = s.get(Job, job_id)
            return {"status": job.status, "stage": job.stage, "worker": job.worker, "attempts": job.attempts,
                    "artifacts": self.count(Artifact, job_id), "audits": self.count(Audit, job_id),
                    "verdicts": self.count(Verdict, job_id)}

    def redispatches(self, job_id: str) -> int:
        """Audit-log entries in which the reconciler sent the job again (its message never started a stage)."""
        from sqlalchemy import func, select

        from gate.storage.models import AuditLogEntry

        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(AuditLogEntry).where(
                AuditLogEntry.entity_id == job_id, AuditLogEntry.action == "dispatched again"))

    def lease_expiries(self, job_id: str) -> int:
        """Audit-log entries in which the reaper took the job from a worker presumed dead."""
        from sqlalchemy import func, select

        from gate.storage.models import AuditLogEntry

        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(AuditLogEntry).where(
                AuditLogEntry.entity_id == job_id, AuditLogEntry.reason.like("lease of worker % expired%")))

    def stored(self) -> dict:
        """Files in the tenant's store: checkpoints, audit reports, and temporary files left behind."""
        root = self.gate.settings.artifacts_dir / "tenants" / "acme"
        return {"checkpoints": len(list(root.rglob("*.safetensors"))), "reports": len(list(root.rglob("*.json"))),
                "partial": len(list(root.rglob("*.partial")))}

    def store_consistent(self) -> bool:
        """Every stored checkpoint is named by exactly one artifact row, and every row's file exists."""
        from sqlalchemy import select

        from gate.storage.models import Artifact

        with self.sessions() as s:
            keys = s.scalars(select(Artifact.path)).all()
        files = {str(p.relative_to(self.gate.settings.artifacts_dir))
                 for p in (self.gate.settings.artifacts_dir / "tenants").rglob("*.safetensors")}
        return len(keys) == len(set(keys)) and set(keys) == files

    # faults
    def arm(self, name: str) -> None:
        (self.faults / name).touch()

    def disarm(self, name: str) -> None:
        (self.faults / name).unlink(missing_ok=True)

    def wait_marker(self, name: str, job_id: str, timeout_s: float = WAIT_S) -> str:
        """The contents of the marker file a fault hook writes, once it exists (removed, for the next cycle)."""
        marker = self.faults / name
        deadline = time.monotonic() + timeout_s
        while not marker.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {name} within {timeout_s:g} s (job {job_id} is {self.job_row(job_id)}); "
                                   f"logs in {self.gate.log_dir}")
            time.sleep(POLL_S)
        text = marker.read_text()
        marker.unlink()
        return text

    def wait_paused(self, stage: str, job_id: str, timeout_s: float = WAIT_S) -> dict:
        return json.loads(self.wait_marker(f"paused-{stage}", job_id, timeout_s))

    def wait_row(self, job_id: str, until, timeout_s: float = WAIT_S) -> dict:
        """The job's committed row once ``until(row)`` holds (read from the database: the API may need the broker)."""
        deadline = time.monotonic() + timeout_s
        while not until(row := self.job_row(job_id)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} never got there; last seen {row}; logs in {self.gate.log_dir}")
            time.sleep(POLL_S)
        return row

    def kill_group(self, pgid: int) -> None:
        """``kill -9`` the worker whose process group is ``pgid`` (its job process and reaper with it)."""
        worker = next(w for w in self.gate.workers if w.pid == pgid)
        self.gate.kill_worker(worker)


def _in_stage(stage: str, row: dict) -> bool:
    """Whether a job, as the database shows it, is in the middle of ``stage``."""
    if stage in ("train", "stored"):
        return row["status"] == "training" and row["worker"] is not None and row["artifacts"] == 0
    if stage == "trained":
        return row["status"] == "auditing" and row["worker"] is None and row["artifacts"] == 1 and row["audits"] == 0
    if stage == "audit":
        return row["status"] == "auditing" and row["stage"] == "auditing" and row["worker"] is not None \
            and row["audits"] == 0
    return row["status"] == "auditing" and row["audits"] == 1 and row["verdicts"] == 0


def kill_cycle(gate: GateSession, stage: str, seed: int) -> dict:
    """Submit a job, ``kill -9`` its worker while it is in ``stage``, start a new worker, and record how the job
    ended. ``seed`` makes each job's checkpoint distinct (the store is content-addressed)."""
    t0 = time.monotonic()
    gate.arm(f"pause-{stage}")
    job_id = gate.submit(KILL_STEPS, seed=seed)
    paused = gate.wait_paused(stage, job_id)
    at_kill = gate.job_row(job_id)
    gate.kill_group(paused["pgid"])
    after_kill = gate.job_row(job_id)
    gate.gate.start_worker()
    return _outcome(gate, stage, job_id, _in_stage(stage, at_kill) and after_kill == at_kill, t0)


def _outcome(gate: GateSession, window: str, job_id: str, hit: bool, t0: float) -> dict:
    """How the job ended once final: one cycle's record (``hit``: the fault landed where it was meant to)."""
    job = gate.wait_final(job_id)
    end = gate.job_row(job_id)
    return {"stage": window, "job": job_id, "hit_stage": hit,
            "status": job["status"], "verdict": (job["verdict"] or {}).get("decision"),
            "verdict_matches": DECISION_STATES.get(job["status"]) == (job["verdict"] or {}).get("decision"),
            "attempts": end["attempts"], "verdicts": end["verdicts"], "artifacts": end["artifacts"],
            "audits": end["audits"], "lease_expiries": gate.lease_expiries(job_id),
            "redispatches": gate.redispatches(job_id), "seconds": round(time.monotonic() - t0, 1)}


def _kill_broker(gate: GateSession) -> None:
    pid = int(gate.gate.broker.pidfile.read_text())
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)


def broker_at_reap_cycle(gate: GateSession, seed: int) -> dict:
    """``kill -9`` a worker mid-training and Redis with it; the survivor's reaper hands the job back while the
    broker is down, so its send fails; Redis restarts from its append-only file and a new worker starts. Only
    the reconciler can send the job again."""
    t0 = time.monotonic()
    gate.arm("pause-train")
    job_id = gate.submit(KILL_STEPS, seed=seed)
    paused = gate.wait_paused("train", job_id)
    at_kill = gate.job_row(job_id)
    gate.kill_group(paused["pgid"])
    _kill_broker(gate)
    gate.wait_row(job_id, lambda row: row["status"] == "queued")  # handed back, its message refused
    time.sleep(SEND_REFUSED_S)
    hit = _in_stage("train", at_kill) and not gate.gate.broker.ping()
    gate.gate.broker.ensure_running()
    gate.gate.start_worker()
    return _outcome(gate, "broker-at-reap", job_id, hit, t0)


def database_at_start_cycle(gate: GateSession, seed: int) -> dict:
    """Submit a job while the workers cannot reach the database: the task that takes its message gives it up
    untouched; the database comes back, and the reconciler sends the job again."""
    t0 = time.monotonic()
    gate.arm(DATABASE_DOWN)
    job_id = gate.submit(KILL_STEPS, seed=seed)
    gate.wait_marker(REFUSED_DATABASE, job_id)
    gate.disarm(DATABASE_DOWN)
    at_refusal = gate.job_row(job_id)
    return _outcome(gate, "database-at-start", job_id, at_refusal["status"] == "queued", t0)


def kill_tally(cycles: list[dict]) -> dict:
    """One stage's cycles summed up (what the tests assert and the benchmark prints)."""
    return {"cycles": len(cycles), "kills_in_stage": sum(c["hit_stage"] for c in cycles),
            "final": sum(c["status"] in FINAL for c in cycles),
            "failed": sum(c["status"] == "failed" for c in cycles),
            "statuses": dict(Counter(c["status"] for c in cycles)),
            "one_verdict": sum(c["verdicts"] == 1 and c["verdict_matches"] for c in cycles),
            "one_artifact": sum(c["artifacts"] == 1 for c in cycles),
            "one_audit": sum(c["audits"] == 1 for c in cycles),
            "attempts": dict(Counter(str(c["attempts"]) for c in cycles)),
            # an attempt is the first try or one after a lost worker: every job's attempts follow its expiries
            "attempts_match_expiries": sum(c["attempts"] == 1 + c["lease_expiries"] for c in cycles),
            "lease_expiries": dict(Counter(str(c["lease_expiries"]) for c in cycles)),
            "redispatched": sum(c["redispatches"] > 0 for c in cycles),
            "seconds_per_cycle": round(sum(c["seconds"] for c in cycles) / max(len(cycles), 1), 1)}


def _cycle(gate: GateSession, window: str, seed: int) -> dict:
    if window == "broker-at-reap":
        return broker_at_reap_cycle(gate, seed)
    if window == "database-at-start":
        return database_at_start_cycle(gate, seed)
    return kill_cycle(gate, window, seed)


def kill_campaign(root: str | Path, cycles: int, stages: tuple[str, ...] = STAGES, lease_seconds: int = 8) -> dict:
    """``cycles`` cycles per window (kill points and outages, ``WINDOWS``) on one gate; per-window tallies plus
    what the store and database hold.

    Two workers, as in a pool: the survivor's reaper hands the killed worker's job on and the survivor runs
    it while the replacement starts, so a cycle does not wait for a worker to boot."""
    t0 = time.monotonic()
    with GateSession(root, lease_seconds, profile=KILL_PROFILE, workers=2,
                     env={"FTGATE_DISPATCH_GRACE_SECONDS": str(GRACE_S)}) as gate:
        gate.wait_baseline()
        records = {stage: [_cycle(gate, stage, seed=i * len(WINDOWS) + WINDOWS.index(stage))
                           for i in range(cycles)] for stage in stages}
        jobs = [c["job"] for stage in stages for c in records[stage]]
        stored = gate.stored()
        consistent = gate.store_consistent()
    return {"stages": {stage: kill_tally(records[stage]) for stage in stages}, "cycles": records,
            "jobs": len(jobs), "distinct_jobs": len(set(jobs)), "stored_checkpoints": stored["checkpoints"],
            "stored_reports": stored["reports"], "stored_partial_files": stored["partial"],
            "store_matches_artifact_rows": consistent, "seconds": round(time.monotonic() - t0, 1)}


def _redis_client(gate: GateSession):
    import redis

    return redis.Redis(unix_socket_path=str(gate.gate.broker.socket), socket_timeout=5)


def lost_messages(root: str | Path, jobs: int) -> dict:
    """Queue ``jobs`` jobs with no worker running and delete their messages from Redis (never delivered), then
    start a worker: its reaper's reconciler sends each again. The tally of how they ended."""
    t0 = time.monotonic()
    with GateSession(root, lease_seconds=30, workers=0, profile=KILL_PROFILE,
                     env={"FTGATE_DISPATCH_GRACE_SECONDS": str(GRACE_S)}) as gate:
        ids = [gate.submit(KILL_STEPS, seed=i) for i in range(jobs)]
        client = _redis_client(gate)
        deleted = client.llen("train")
        client.delete("train")
        gate.gate.start_worker()
        records = [_outcome(gate, "message-lost", job_id, deleted == jobs, t0) for job_id in ids]
    return {**kill_tally(records), "messages_deleted": deleted, "seconds": round(time.monotonic() - t0, 1)}


def broker_restart(root: str | Path, jobs: int = 3, hard: bool = True) -> dict:
    """Queue ``jobs`` jobs with no worker running, stop the embedded Redis (``kill -9`` when ``hard``, else a
    clean shutdown), submit one job while it is down, start it again from its append-only file, submit one
    more through the API's reconnected dispatcher; then start a worker and count how each job ended."""
    t0 = time.monotonic()
    with GateSession(root, lease_seconds=30, workers=0, profile=KILL_PROFILE) as gate:
        ids = [gate.submit(KILL_STEPS, seed=i) for i in range(jobs)]
        client = _redis_client(gate)
        queued_before = client.llen("train")
        broker = gate.gate.broker
        if hard:
            _kill_broker(gate)
        else:
            broker.stop()
        down = not broker.ping()
        refused = gate.request_job(KILL_STEPS, seed=jobs)
        restarted = broker.ensure_running()
        queued_after = _redis_client(gate).llen("train")
        ids.append(gate.submit(KILL_STEPS, seed=jobs + 1))
        gate.gate.start_worker()
        finished = [gate.wait_final(job_id) for job_id in ids]
        rows = [gate.job_row(job_id) for job_id in ids]
        refused_job = gate.job_row(refused.json()["error"]["job"]) if refused.status_code == 503 else None
    return {"jobs": len(ids), "queued_before_restart": queued_before, "broker_down": down,
            "broker_restarted": restarted, "queued_after_restart": queued_after,
            "submitted_while_down": {"status_code": refused.status_code,
                                     "reason": refused.json().get("error", {}).get("reason"),
                                     "job_status": refused_job and refused_job["status"]},
            "final": sum(j["status"] in FINAL for j in finished),
            "statuses": dict(Counter(j["status"] for j in finished)),
            "one_verdict": sum(r["verdicts"] == 1 for r in rows),
            "one_artifact": sum(r["artifacts"] == 1 for r in rows),
            "seconds": round(time.monotonic() - t0, 1)}


def _wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"process {pid} still alive after SIGKILL")


def auditor_failure(root: str | Path, deadline_s: int = 20) -> dict:
    """One job whose detector raises, one whose renderer hangs (cut off by its deadline, capped here at
    ``audit_deadline_seconds``): how each ended, why, and whether its checkpoint can be downloaded."""
    t0 = time.monotonic()
    outcomes = {}
    with GateSession(root, lease_seconds=30, profile=KILL_PROFILE,
                     env={"FTGATE_AUDIT_DEADLINE_SECONDS": str(deadline_s)}) as gate:
        gate.wait_baseline()
        for seed, fault in enumerate((DETECTOR_RAISES, RENDER_HANGS)):
            gate.arm(fault)
            job_id = gate.submit(KILL_STEPS, seed=seed)
            gate.wait_final(job_id)
            gate.disarm(fault)
            # Read as the operator: what broke is in the reasons, which a customer reads only as "audit incomplete".
            job = gate.get("op", f"/v1/jobs/{job_id}").json()
            report = gate.get("op", f"/v1/jobs/{job_id}/report")
            outcomes[fault] = {
                "status": job["status"], "verdict": (job["verdict"] or {}).get("decision"),
                "reasons": (job["verdict"] or {}).get("reasons", []),
                "report_reasons": report.json()["verdict"]["reasons"] if report.ok else None,
                "artifact_downloadable": (job["artifact"] or {}).get("downloadable"),
                "artifact_status": gate.get("a", f"/v1/jobs/{job_id}/artifact").status_code,
                "audit_seconds": report.json()["seconds"] if report.ok else None}
    return {"deadline_seconds": deadline_s, **outcomes, "seconds": round(time.monotonic() - t0, 1)}


if __name__ == "__main__":
    sys.exit(main())
