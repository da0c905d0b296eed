"""The fault tallies: workers killed in each stage, jobs stranded with no message, the broker restarted under
queued jobs, a failing auditor.

    python -m benchmarks.gate_faults [--cycles 10] [--stages ...] [--broker-jobs 3] [--out records.json]

Runs the scenarios of ``tests/test_faults.py`` (the same driver, ``gate.worker.faults``) on fresh gates in a
temporary folder and prints one JSON line: per window (kill point or outage), how many faults landed in it
and how the jobs ended (final states, one verdict, one artifact row, one finished audit, attempts, lease
expiries, dispatches by the reconciler), what the artifact store holds, ``--cycles`` jobs whose messages were
deleted from Redis, the broker-restart counts, and the auditor-failure outcomes. ``--out`` also writes every
cycle's record (as soon as the kills end). Each part's figures also go to stderr as it ends.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    figures = {}
    with tempfile.TemporaryDirectory(prefix="ftgate-faults-") as tmp:
        parts = (("kills", lambda: kill_campaign(Path(tmp) / "kills", args.cycles, tuple(args.stages.split(",")))),
                 ("lost_messages", lambda: lost_messages(Path(tmp) / "lost", args.cycles)),
                 ("broker_restart", lambda: broker_restart(Path(tmp) / "broker", jobs=args.broker_jobs)),
                 ("auditor_failure", lambda: auditor_failure(Path(tmp) / "auditor")))
        for name, run in parts:
            figures[name] = run()
            # each part's figures on stderr as it ends: a later part that fails loses none of them
            print(json.dumps({name: {k: v for k, v in figures[name].items() if k != "cycles"}}), file=sys.stderr,
                  flush=True)
            if name == "kills" and args.out:
                Path(args.out).write_text(json.dumps(figures[name]["cycles"], indent=1))
    figures["kills"].pop("cycles")
    print(json.dumps({**figures, "seconds": round(time.monotonic() - t0, 1)}))

if __name__ == "__main__":
    main()
