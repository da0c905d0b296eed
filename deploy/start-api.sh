#!/bin/sh
# The API container: migrate the database to the code's schema, then serve the app factory with gunicorn.
# Arguments go to gunicorn (compose.yaml passes --bind and --workers). gunicorn.conf.py's on_starting hook
# wipes and sets up the API's Prometheus multiprocess folder before the workers fork.
set -eu
ftgate db upgrade
exec gunicorn --config /opt/ftgate/deploy/gunicorn.conf.py "$@" "gate.api:create_app()"
