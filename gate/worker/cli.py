"""``ftgate worker`` and ``ftgate serve``: the two long-running processes of the gate.

Both read the one settings object (``FTGATE_*`` / ``--config``), refuse a database that is not at the
code's schema (``ftgate db upgrade``), and, with no broker configured, share the embedded Redis under
the state directory. ``serve`` is a threaded WSGI server for one machine; behind a real deployment run
the same app with gunicorn: ``gunicorn 'gate.api:create_app()'``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000


def _queues(text: str) -> list[str]:
    from .app import QUEUES

    queues = [q.strip() for q in text.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(QUEUES))
    if not queues or unknown:
        raise argparse.ArgumentTypeError(f"queues must be a comma-separated subset of {list(QUEUES)} (got {text!r})")
    return queues


def _preload() -> None:
    """Import the heavy libraries once in the parent, so each forked job process starts at once."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401

    import auditing.audit  # noqa: F401
    import gate.training  # noqa: F401


def _cmd_worker(args) -> int:
    from gate import metrics
    from gate.pipeline.runtime import Runtime
    from gate.settings import load_settings

    from .app import make_celery

    settings = load_settings(path=args.config)
    name = args.name or f"ftgate-{'-'.join(args.queues)}@%h"
    metrics.start_group(settings.metrics_dir, f"worker-{name}")  # before the pool forks job processes
    Runtime.open(settings).engine.dispose()  # fail now, not in the first task, on a stale schema
    app = make_celery(settings)
    _preload()
    argv = ["worker", "--queues", ",".join(args.queues), "--concurrency", str(args.concurrency), "--hostname", name,
            "--loglevel", "DEBUG" if args.verbose else "INFO", "--without-mingle", "--without-gossip"]
    log.info("worker %s on queues %s (%s)", name, args.queues, settings.summary())
    config = ["--config", args.config] if args.config else []
    reaper = None if args.no_reaper else subprocess.Popen(
        [sys.executable, "-m", "gate.cli", "reaper", "--parent", str(os.getpid()), *config])
    exporter = None if args.metrics_port is None else subprocess.Popen(
        [sys.executable, "-m", "gate.cli", "exporter", "--host", args.metrics_host, "--port", str(args.metrics_port),
         "--parent", str(os.getpid()), *config])
    try:
        app.worker_main(argv)
    finally:
        for helper in (reaper, exporter):
            if helper is not None:
                helper.terminate()
                helper.wait()
    return 0


def _cmd_reaper(args) -> int:
    from gate.settings import load_settings

    from .reaper import run_reaper

    run_reaper(load_settings(path=args.config), parent_pid=args.parent)
    return 0


def _cmd_serve(args) -> int:
    from werkzeug.serving import make_server

    from gate import metrics
    from gate.api import create_app
    from gate.settings import load_settings

    settings = load_settings(path=args.config)
    metrics.start_group(settings.metrics_dir, "api")
    app = create_app(settings)
    server = make_server(args.host, args.port, app, threaded=True)
    print(f"ftgate API on http://{args.host}:{server.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_exporter(args) -> int:
    from prometheus_client import start_http_server

    from gate.metrics import files_registry
    from gate.settings import load_settings

    settings = load_settings(path=args.config)
    start_http_server(args.port, args.host, registry=files_registry(settings.metrics_dir))
    log.info("exporter: %s on http://%s:%d/metrics", settings.metrics_dir, args.host, args.port)
    while args.parent is None or os.getppid() == args.parent:
        time.sleep(1.0)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser("worker", help="run a Celery worker for the gate's queues")
    worker.add_argument("--queues", type=_queues, default=_queues("intake,train,audit,align"),
                        help="comma-separated queues to consume (intake, train, audit, align); default all")
    worker.add_argument("--concurrency", type=int, default=1, help="job processes (one per GPU); default 1")
    worker.add_argument("--name", help="worker node name (default ftgate-<queues>@<host>)")
    worker.add_argument("--config", help="settings file (TOML); default $FTGATE_CONFIG")
    worker.add_argument("--no-reaper", action="store_true",
                        help="do not start a reaper process beside the worker (run `ftgate reaper` elsewhere)")
    worker.add_argument("--metrics-port", type=int,
                        help="start an exporter beside the worker serving its Prometheus metrics on this port")
    worker.add_argument("--metrics-host", default="127.0.0.1", help="the exporter's address (default 127.0.0.1)")
    worker.set_defaults(func=_cmd_worker)
    reaper = sub.add_parser("reaper", help="hand jobs whose worker died back to the queues (lease expiry), and "
                                           "dispatch again those whose message no worker started")
    reaper.add_argument("--config", help="settings file (TOML); default $FTGATE_CONFIG")
    reaper.add_argument("--parent", type=int, help="exit when this process (the worker) is gone")
    reaper.set_defaults(func=_cmd_reaper)
    serve = sub.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    serve.add_argument("--config", help="settings file (TOML); default $FTGATE_CONFIG")
    serve.set_defaults(func=_cmd_serve)
    exporter = sub.add_parser("exporter", help="serve the Prometheus metrics recorded by this machine's ftgate "
                                               "processes (a worker starts one with --metrics-port)")
    exporter.add_argument("--host", default="127.0.0.1")
    exporter.add_argument("--port", type=int, required=True)
    exporter.add_argument("--config", help="settings file (TOML); default $FTGATE_CONFIG")
    exporter.add_argument("--parent", type=int, help="exit when this process (the worker) is gone")
    exporter.set_defaults(func=_cmd_exporter)
