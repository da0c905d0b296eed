"""Job submissions from concurrent clients, and job status reads under that load (goal: p99 <= 50 ms).

    python -m benchmarks.gate_load [--clients 20] [--jobs 200] [--reads-per-submit 5] [--state DIR]

The server is the real one: ``ftgate serve`` (threaded WSGI) started by a ``LocalGate`` on loopback, SQLite
under the state directory, every accepted job handed to Celery on the embedded Redis. No job worker runs:
training 200 jobs would take hours on a CPU and its load would swamp the API being measured, so the jobs
stay queued, which also lets the broker's queue be counted. The one dataset the jobs train on is taken in,
before the clients start, by a worker on the ``intake`` queue alone (``GateSession.dataset``). Each client (a
thread with its own key and ``gate.client.Client``, the shipped client) submits its share of the jobs, reading
the status of one of its jobs after each submission ``--reads-per-submit`` times, so every status read happens
while the other clients submit. Afterwards one client alone reads statuses (``idle_read_*``): the same request
without the load, to tell the machine's own speed (and whatever else runs on it) from the effect of the load.

Accounting: every submission answered, one job row per returned id, ids distinct, one message per job in
the broker's ``train`` queue, no 5xx. Prints one JSON line (latencies in ms).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gate.client import Client
from gate.worker.faults import GateSession

GOAL_P99_MS = 50.0


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _client(url: str, key: str, body: dict, jobs: int, reads: int, start: threading.Barrier, seed: int) -> dict:
    """One client's submissions and status reads: (latency ms, status code) of each, and the ids it got."""
    rng, client = random.Random(seed), Client(url, key)
    submits, status_reads, ids = [], [], []
    start.wait()
    for _ in range(jobs):
        t0 = time.perf_counter()
        r = client.request("POST", "/v1/jobs", check=False, json=body)
        submits.append(((time.perf_counter() - t0) * 1e3, r.status_code))
        if r.status_code == 201:
            ids.append(r.json()["id"])
        for _ in range(reads if ids else 0):
            job_id = rng.choice(ids)
            t0 = time.perf_counter()
            r = client.request("GET", f"/v1/jobs/{job_id}", check=False)
            status_reads.append(((time.perf_counter() - t0) * 1e3, r.status_code))
    return {"submits": submits, "reads": status_reads, "ids": ids}


def _read_alone(url: str, key: str, ids: list[str], reads: int) -> list[tuple[float, int]]:
    client, timings = Client(url, key), []
    for job_id in random.Random(0).choices(ids, k=reads):
        t0 = time.perf_counter()
        r = client.request("GET", f"/v1/jobs/{job_id}", check=False)
        timings.append(((time.perf_counter() - t0) * 1e3, r.status_code))
    return timings


def run_load(state: str | Path, clients: int = 20, jobs: int = 200, reads_per_submit: int = 5) -> dict:
    from sqlalchemy import func, select

    from gate.auth import create_key
    from gate.storage.audit_log import SYSTEM
    from gate.storage.models import Job

    load_before = os.getloadavg()[0]
    with GateSession(state, lease_seconds=120, workers=0) as gate:
        with gate.sessions() as s:
            keys = [create_key(s, "acme", "customer", SYSTEM).key for _ in range(clients)]
            s.commit()
        body = {"base_model": gate.base_model, "dataset": gate.dataset(), "method": "lora",
                "hyperparameters": {"steps": 10, "rank": 2}}
        shares = [jobs // clients + (i < jobs % clients) for i in range(clients)]
        start = threading.Barrier(clients)
        t0 = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda i: _client(gate.gate.url, keys[i], body, shares[i], reads_per_submit,
                                                      start, seed=i), range(clients)))
        wall = time.monotonic() - t0
        ids = [job_id for r in results for job_id in r["ids"]]
        with gate.sessions() as s:
            rows = s.scalar(select(func.count()).select_from(Job).where(Job.id.in_(ids))) if ids else 0
            all_rows = s.scalar(select(func.count()).select_from(Job))
        import redis

        queued = redis.Redis(unix_socket_path=str(gate.gate.broker.socket)).llen("train")
        idle = _read_alone(gate.gate.url, keys[0], ids, len(ids))
    submits = [x for r in results for x in r["submits"]]
    reads = [x for r in results for x in r["reads"]]
    responses = submits + reads + idle
    read_ms = [ms for ms, _ in reads]
    return {
        "submitted": len(submits), "created": sum(code == 201 for _, code in submits), "accounted_for": rows,
        "job_rows": all_rows, "distinct_ids": len(set(ids)), "queued_messages": queued,
        "errors": sum(not 200 <= code < 300 for _, code in responses),
        "server_errors": sum(code >= 500 for _, code in responses),
        "clients": clients, "status_reads": len(reads),
        "status_read_p50_ms": round(statistics.median(read_ms), 1),
        "status_read_p99_ms": round(_percentile(read_ms, 99), 1), "status_read_max_ms": round(max(read_ms), 1),
        "idle_read_p50_ms": round(statistics.median([ms for ms, _ in idle]), 1),
        "idle_read_p99_ms": round(_percentile([ms for ms, _ in idle], 99), 1),
        "submit_p50_ms": round(statistics.median([ms for ms, _ in submits]), 1),
        "submit_p99_ms": round(_percentile([ms for ms, _ in submits], 99), 1),
        "goal_p99_ms": GOAL_P99_MS, "wall_s": round(wall, 1), "requests_per_s": round(len(responses) / wall, 1),
        "server": "ftgate serve (werkzeug, threaded) via LocalGate on loopback; SQLite; embedded Redis; "
                  "an intake-only worker, no job worker",
        "cpus": os.cpu_count(), "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--reads-per-submit", type=int, default=5)
    parser.add_argument("--state", help="folder for the gate's state (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftgate-load-") as tmp:
        result = run_load(args.state or tmp, args.clients, args.jobs, args.reads_per_submit)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
