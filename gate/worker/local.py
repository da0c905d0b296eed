"""The whole gate on one machine, as child processes: embedded Redis, a worker, the API.

``ftgate demo`` and the end-to-end tests start it; it stops what it started, whatever happens (the
worker gets a warm shutdown first, then SIGKILL after a grace period). The worker and the API are real
``ftgate worker`` / ``ftgate serve`` processes configured through ``FTGATE_*`` variables, exactly as
an operator would run them.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from gate.settings import load_settings
from gate.storage.db import upgrade

from .broker import EmbeddedRedis

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
STOP_GRACE_S = 20.0
_SERVING = re.compile(r"ftgate API on (http://\S+)")


class LocalGate:
    def __init__(self, state_dir: str | Path, env: dict[str, str] | None = None, log_dir: str | Path | None = None,
                 worker_module: str = "gate.cli"):
        """``worker_module``: what ``python -m`` runs for a worker (``gate.worker.faults`` injects faults)."""
        self.worker_module = worker_module
        self.state_dir = Path(state_dir).absolute()
        self.log_dir = Path(log_dir or self.state_dir / "logs")
        self.env = {**os.environ, "FTGATE_STATE_DIR": str(self.state_dir), **(env or {})}
        self.settings = load_settings(self.env)  # what the worker and the API will read from the same variables
        self.broker = EmbeddedRedis(self.state_dir / "redis")
        self.workers: list[subprocess.Popen] = []
        self.api: subprocess.Popen | None = None
        self.url = ""
        self._started_broker = False

    def _spawn(self, name: str, *args: str, module: str = "gate.cli") -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", module, *args], env=self.env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def start_worker(self, queues: str = "intake,train,audit,align", reaper: bool = True) -> subprocess.Popen:
        """A worker process on ``queues`` (with a reaper beside it unless ``reaper`` is false); several may run
        (one is enough for the demo)."""
        worker = self._spawn(f"worker-{len(self.workers)}", "worker", "--queues", queues,
                             "--name", f"ftgate-{len(self.workers)}-{os.getpid()}@%h",
                             *(() if reaper else ("--no-reaper",)), module=self.worker_module)
        self.workers.append(worker)
        return worker

    def start(self, workers: int = 1) -> LocalGate:
        """The broker, ``workers`` workers (none: jobs wait in the queues) and the API."""
        upgrade(self.settings.database_url)
        if self.settings.broker_url is None:
            self._started_broker = self.broker.ensure_running()
        for _ in range(workers):
            self.start_worker()
        self.api = self._spawn("api", "serve", "--port", "0")
        self.url = self._wait_for_api()
        return self

    def _wait_for_api(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        logfile = self.log_dir / "api.log"
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"the API exited with {self.api.returncode}; see {logfile}")
            match = _SERVING.search(logfile.read_text(errors="replace")) if logfile.is_file() else None
            if match:
                url = match.group(1)
                if requests.get(f"{url}/healthz", timeout=5).ok:
                    return url
            time.sleep(0.2)
        raise RuntimeError(f"the API did not come up within {START_TIMEOUT_S:g} s; see {logfile}")

    def kill_worker(self, worker: subprocess.Popen) -> None:
        """``kill -9`` a worker and every process it forked (what a crashed machine does to it)."""
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()

    def stop(self) -> None:
        for proc in [*self.workers, self.api]:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # Celery: warm shutdown; the API: exit
        for proc in [*self.workers, self.api]:
            if proc is None:
                continue
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._started_broker:
            self.broker.stop()

    def __enter__(self) -> LocalGate:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
