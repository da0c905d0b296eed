"""Time the shapes-world build end to end (goal: <= 15 min on 2 cores) and size its output.

    python -m benchmarks.world_build [--out DIR] [--keep]

Prints one JSON line: stage seconds, artifact size, final losses, weights hash.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import transformers

from auditing.shapes.pretrain import WorldBuildConfig, build_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where to build (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the built model")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ftgate-world-")) / "world"
    t0 = time.perf_counter()
    record = build_world(root, WorldBuildConfig())
    wall = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    result = {
        "benchmark": "world_build",
        "wall_seconds": round(wall, 1),
        "stage_seconds": record["seconds"],
        "goal_seconds": 900,
        "artifact_mb": round(size / 2**20, 2),
        "final_loss": record["final_loss"],
        "weights_sha256": record["weights_sha256"],
        "threads": record["config"]["threads"],
    }
    if not args.keep:
        shutil.rmtree(root)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
