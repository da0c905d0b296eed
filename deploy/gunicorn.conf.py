"""gunicorn settings for the API container (deploy/start-api.sh; bind and worker count come from the
command line). The two hooks are prometheus_client's multiprocess bookkeeping (gate/metrics.py): the master
starts the API's metrics group before any worker forks, and drops a worker's live gauges when it exits."""

from gate import logs, metrics
from gate.settings import load_settings

# Uploads of up to limits.max_upload_bytes (2 GiB by default) are checked while the request is open.
timeout = 600
accesslog = "-"


def on_starting(server):
    logs.configure()  # the app's own log lines, control characters escaped (gate/logs.py); workers inherit it
    metrics.start_group(load_settings().metrics_dir, "api")


def child_exit(server, worker):
    metrics.process_exited(worker.pid)
