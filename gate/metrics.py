"""The gate's Prometheus instruments, and how the processes that record them share them.

What the database holds (jobs, verdicts, datasets) is counted from it at scrape time by the API
(``gate.api.metrics``), correct whichever process answers and across restarts. What only a process sees
is recorded here: how long a stage ran, which stages are running, how many images audits rendered, why
uploads were refused. Celery runs every job in a forked child (``worker_max_tasks_per_child = 1``) and
gunicorn runs several API processes, so these instruments use prometheus_client's multiprocess mode:
each process writes its values to files, and an exporter merges every process's files at scrape time.

Files live in ``<metrics_dir>/<group>/`` (``Settings.metrics_dir``, default ``<state_dir>/metrics``), one
group per process tree that starts and stops as one: ``api`` (``ftgate serve``, gunicorn's master and
workers) and ``worker-<name>`` (an ``ftgate worker`` and its job processes). ``start_group`` wipes the
group's folder when the tree starts, as the library requires, without touching the other groups of the
machine. An exporter (the API's ``/metrics``, ``ftgate exporter``) merges every group under
``metrics_dir``, so scrape exactly one exporter per ``metrics_dir`` (docs/operations.md).

Labels are bounded (stage, reason, model): never a job, tenant or dataset id.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client in this process and its children
STAGES = ("validate", "train", "audit", "decide")  # intake, training, auditing, the verdict step
AUDITED_MODELS = ("checkpoint", "baseline")
# Intake takes seconds to minutes, the verdict step under a second, training and auditing minutes to
# hours (training's hard limit is 12 h; an audit's follows its deadline ceiling, gate.worker.app.time_limits).
DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600,
                      12 * 3600)
_GROUP_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")

STAGE_SECONDS = Histogram("ftgate_stage_duration_seconds", "Time spent in a pipeline stage (intake validation, "
                          "training, auditing, the verdict step)", ["stage"], buckets=DURATION_BUCKETS_S)
STAGES_IN_PROGRESS = Gauge("ftgate_stages_in_progress", "Pipeline stages running now", ["stage"],
                           multiprocess_mode="livesum")
AUDIT_IMAGES = Counter("ftgate_audit_images_rendered", "Probe images rendered and scored by audits, for job "
                       "checkpoints and base-model baselines", ["model"])
INTAKE_REJECTIONS = Counter("ftgate_intake_rejections", "Dataset uploads refused by the intake, by reason code",
                            ["reason"])


@contextmanager
def stage(name: str):
    """Time one stage's work and count it as running meanwhile; also a decorator (``@stage("validate")``).
    The labelled child is made on entry, never at import, so it records in the process's final mode."""
    if name not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} (got {name!r})")
    with STAGE_SECONDS.labels(name).time(), STAGES_IN_PROGRESS.labels(name).track_inprogress():
        yield


def audit_images(model: str, count: int) -> None:
    if model not in AUDITED_MODELS:
        raise ValueError(f"model must be one of {AUDITED_MODELS} (got {model!r})")
    AUDIT_IMAGES.labels(model).inc(count)


def start_group(metrics_dir: Path, group: str) -> Path:
    """Make this process, and every process it forks afterwards, record into a fresh folder for ``group``.

    Call it at the start of a process tree, before its first observation. prometheus_client picks its
    value store when it is first imported, from ``PROMETHEUS_MULTIPROC_DIR``; a process that imported it
    before the folder was known is switched here (the library's own tests switch it the same way)."""
    folder = Path(metrics_dir) / _GROUP_UNSAFE.sub("_", group)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    if values.ValueClass is values.MutexValue:
        values.ValueClass = values.get_value_class()
    return folder


def process_exited(pid: int) -> None:
    """Drop the live gauges of a process of this group that has exited."""
    if os.environ.get(MULTIPROC_ENV):
        mark_process_dead(pid)


def forget_dead_processes() -> None:
    """Drop the live gauges of this group's processes that are gone without saying so (``kill -9``, the
    OOM killer): their exit hook never ran. Pids are this machine's (or container's), like the folder."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mark_process_dead(pid, folder)
        except PermissionError:
            pass  # alive, another user's


class ProcessFilesCollector:
    """Every group's files under ``metrics_dir``, merged as the library's ``MultiProcessCollector`` merges
    one folder: counters and histograms summed over processes (the dead ones' too), live gauges summed
    over the living."""

    def __init__(self, metrics_dir: Path):
        self.metrics_dir = Path(metrics_dir)

    def collect(self):
        return MultiProcessCollector.merge(sorted(map(str, self.metrics_dir.glob("*/*.db"))), accumulate=True)


def files_registry(metrics_dir: Path) -> CollectorRegistry:
    """A registry exporting what every process under ``metrics_dir`` recorded (``ftgate exporter``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProcessFilesCollector(metrics_dir))
    return registry
