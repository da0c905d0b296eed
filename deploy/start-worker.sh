#!/bin/sh
# A worker container: wait until the API container has migrated the database, then run one Celery worker
# (arguments go to `ftgate worker`). The worker wipes and sets up its own Prometheus multiprocess folder
# at start, before its pool forks, and with --metrics-port starts the exporter beside it.
set -eu
until ftgate db current >/dev/null 2>&1; do
    echo "start-worker: the database is not at the code's schema yet; waiting for the API container to migrate it"
    sleep 5
done
exec ftgate worker "$@"
