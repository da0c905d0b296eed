"""Dataset uploads from concurrent clients while others poll the health check (goal: no 5xx, health p99 <= 100 ms
while the uploads are scanned).

    python -m benchmarks.upload_load [--clients 20] [--uploads 2] [--images 32] [--pollers 4] [--state DIR]

The server is the real one: ``ftgate serve`` started by a ``LocalGate`` on loopback (SQLite, the embedded Redis),
with one worker on the ``intake`` queue alone, so the scans (NudeNet and the registered base model's detector)
run while the clients upload, as they would in service. Each uploading client (a thread with its own key and the
shipped ``gate.client.Client``) sends ``--uploads`` zips of ``--images`` shapes-world images (a fresh one each,
so no two share a hash) without waiting for their intake; ``--pollers`` threads read ``/healthz`` and the status
of the uploaded datasets from the first upload until the last dataset is decided. A request the API answers with
a 5xx, an upload not answered 202, or a dataset the intake leaves undecided counts against the goal.

Prints one JSON line (latencies in ms).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.gate_load import _percentile
from gate.client import Client
from gate.worker.faults import GateSession

GOAL_HEALTH_P99_MS = 100.0
DECIDED = ("accepted", "flagged", "rejected", "failed")
SETTLE_TIMEOUT_S = 1800.0


def _uploads(url: str, key: str, zips: list[bytes], start: threading.Barrier) -> list[tuple[float, int, str | None]]:
    """One client's uploads: (latency ms, status code, dataset id) of each, not waiting for the intake."""
    client, out = Client(url, key), []
    start.wait()
    for i, data in enumerate(zips):
        t0 = time.perf_counter()
        r = client.request("POST", "/v1/datasets", check=False, files={"file": (f"set-{i}.zip", data)})
        out.append(((time.perf_counter() - t0) * 1e3, r.status_code, r.json().get("id") if r.status_code == 202
                    else None))
    return out


def _poll(url: str, key: str, ids: list[str], done: threading.Event) -> dict[str, list[tuple[float, int]]]:
    """Health checks and dataset status reads, alternately, until ``done``."""
    client, health, reads, k = Client(url, key), [], [], 0
    while not done.is_set():
        t0 = time.perf_counter()
        r = client.request("GET", "/healthz", check=False)
        health.append(((time.perf_counter() - t0) * 1e3, r.status_code))
        if ids:
            t0 = time.perf_counter()
            r = client.request("GET", f"/v1/datasets/{ids[k % len(ids)]}", check=False)
            reads.append(((time.perf_counter() - t0) * 1e3, r.status_code))
            k += 1
        time.sleep(0.01)
    return {"health": health, "reads": reads}


def run_load(state: str | Path, clients: int = 20, uploads: int = 2, images: int = 32, pollers: int = 4) -> dict:
    from gate.auth import create_key
    from gate.demo import customer_zip
    from gate.storage.audit_log import SYSTEM

    load_before = os.getloadavg()[0]
    zips = [[customer_zip(0.0, images, seed=100 + c * uploads + u) for u in range(uploads)] for c in range(clients)]
    # The rate limit is lifted: it would answer most polls 429 in microseconds, which measures the limiter, not
    # the API while the uploads are scanned (and the settle loop's own reads would be refused).
    with GateSession(state, lease_seconds=120, workers=0, env={"FTGATE_RATE_LIMIT": "1000000/minute"}) as gate:
        gate.gate.start_worker(queues="intake", reaper=True)
        with gate.sessions() as s:
            keys = [create_key(s, "acme", "customer", SYSTEM).key for _ in range(clients)]
            s.commit()
        ids: list[str] = []  # filled as uploads are answered; the pollers read whatever is there
        done, start = threading.Event(), threading.Barrier(clients)
        t0 = time.monotonic()
        with ThreadPoolExecutor(clients + pollers) as pool:
            polled = [pool.submit(_poll, gate.gate.url, keys[i % clients], ids, done) for i in range(pollers)]
            try:  # the pollers stop whatever happens here, or the pool would wait for them for ever
                sent = [pool.submit(_uploads, gate.gate.url, keys[i], zips[i], start) for i in range(clients)]
                results = [f.result() for f in sent]
                upload_s = time.monotonic() - t0
                ids += [dataset_id for r in results for _, _, dataset_id in r if dataset_id is not None]
                owner = Client(gate.gate.url, gate.keys["op"])
                deadline, statuses = time.monotonic() + SETTLE_TIMEOUT_S, {}
                while time.monotonic() < deadline:
                    statuses = {i: owner.dataset(i)["status"] for i in ids}
                    if all(s in DECIDED for s in statuses.values()):
                        break
                    time.sleep(1.0)
            finally:
                done.set()
            polls = [f.result() for f in polled]
        wall = time.monotonic() - t0
    sent_all = [x for r in results for x in r]
    health = [x for p in polls for x in p["health"]]
    reads = [x for p in polls for x in p["reads"]]
    health_ms = [ms for ms, _ in health]
    responses = [(ms, code) for ms, code, _ in sent_all] + health + reads
    return {
        "benchmark": "upload_load", "clients": clients, "uploads": len(sent_all), "images_per_upload": images,
        "answered_202": sum(code == 202 for _, code, _ in sent_all), "decided": sum(s in DECIDED for s in
                                                                                   statuses.values()),
        "statuses": {s: list(statuses.values()).count(s) for s in sorted(set(statuses.values()))},
        "server_errors": sum(code >= 500 for _, code in responses),
        "rate_limited": sum(code == 429 for _, code in responses),
        "upload_p50_ms": round(statistics.median([ms for ms, _, _ in sent_all]), 1),
        "upload_p99_ms": round(_percentile([ms for ms, _, _ in sent_all], 99), 1),
        "health_checks": len(health), "health_p50_ms": round(statistics.median(health_ms), 1),
        "health_p99_ms": round(_percentile(health_ms, 99), 1), "health_max_ms": round(max(health_ms), 1),
        "status_read_p99_ms": round(_percentile([ms for ms, _ in reads], 99), 1) if reads else None,
        "goal_health_p99_ms": GOAL_HEALTH_P99_MS, "upload_s": round(upload_s, 1), "wall_s": round(wall, 1),
        "server": "ftgate serve (werkzeug, threaded) via LocalGate on loopback; SQLite; embedded Redis; "
                  "one intake-only worker",
        "cpus": os.cpu_count(), "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--uploads", type=int, default=2, help="uploads per client")
    parser.add_argument("--images", type=int, default=32, help="images per upload")
    parser.add_argument("--pollers", type=int, default=4)
    parser.add_argument("--state", help="folder for the gate's state (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftgate-upload-load-") as tmp:
        result = run_load(args.state or tmp, args.clients, args.uploads, args.images, args.pollers)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
