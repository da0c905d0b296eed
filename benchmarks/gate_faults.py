"""The fault tallies: workers killed in each stage, jobs stranded with no message, the broker restarted under
queued jobs, a failing auditor.

    python -m benchmarks.gate_faults [--cycles 10] [--stages ...] [--broker-jobs 3] [--out records.json]

Runs the scenarios of ``tests/test_faults.py`` (the same driver, ``gate.worker.faults``) on fresh gates in a
temporary folder and prints one JSON line: per window (kill point or outage), how many faults landed in it
and how the jobs ended (final states, one verdict, one artifact row, one finished audit, attempts, lease
expiries, dispatches by the reconciler), what the artifact store holds, ``--cycles`` jobs whose messages were
deleted from Redis, the broker-restart counts, and the auditor-failure outcomes. ``--out`` also writes every
cycle's record.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from gate.worker.faults import OUTAGES, STAGES, WINDOWS, auditor_failure, broker_restart, kill_campaign, lost_messages

DEFAULT_WINDOWS = (*STAGES, "trained", *OUTAGES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10, help="cycles per window, and jobs whose messages are lost")
    parser.add_argument("--stages", default=",".join(DEFAULT_WINDOWS),
                        help=f"comma-separated windows, of {list(WINDOWS)} (default: all but stored)")
    parser.add_argument("--broker-jobs", type=int, default=3, help="jobs queued across the broker restart")
    parser.add_argument("--out", help="also write every cycle's record here (JSON)")
    args = parser.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ftgate-faults-") as tmp:
        kills = kill_campaign(Path(tmp) / "kills", args.cycles, tuple(args.stages.split(",")))
        lost = lost_messages(Path(tmp) / "lost", args.cycles)
        broker = broker_restart(Path(tmp) / "broker", jobs=args.broker_jobs)
        auditor = auditor_failure(Path(tmp) / "auditor")
    records = kills.pop("cycles")
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    print(json.dumps({"kills": kills, "lost_messages": lost, "broker_restart": broker, "auditor_failure": auditor,
                      "seconds": round(time.monotonic() - t0, 1)}))


if __name__ == "__main__":
    main()
