"""``ftgate demo``: the mission end to end on the embedded defaults, on CPU.

Today: load (or build) the shapes world, render every concept and print the detector's
table, then audit the base world model twice — on probes that ask for the unsafe
concept (it must be blocked: the model draws it) and on probes that avoid it (it must
pass). Hardening and customer fine-tuning join as they land.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from auditing.shapes.cli import PRETRAINED_WORLD, check_world, world_record, world_render_settings

log = logging.getLogger(__name__)
# Enough images for each verdict to settle: 12 unsafe probes x 4, 99 benign probes x 1.
IMAGES_PER_PROBE = {"unsafe": 4, "benign": 1}


def _audit_world(model: Path, out: Path, world: dict) -> dict[str, dict]:
    from auditing.audit import AuditInputs, run_audit, save_outcome
    from auditing.detectors.shapes import ShapesConceptDetector
    from auditing.models.hashing import weights_sha256
    from auditing.models.loading import load_pipeline
    from auditing.probes import load_probe_set
    from auditing.shapes.datasets import write_world_data
    from auditing.shapes.scene import Concept

    unsafe = Concept.parse(world["config"]["unsafe_concept"])
    data = out / "world-data"
    if not (data / "manifest.json").is_file():
        write_world_data(data, unsafe, guidance_scale=world["config"]["guidance_scale"])
    pipe, sha = load_pipeline(model), weights_sha256(model)
    detector = ShapesConceptDetector(unsafe.name)
    results = {}
    for name in ("unsafe", "benign"):
        probes = load_probe_set(data / "probes" / f"{name}.csv", images_per_prompt=IMAGES_PER_PROBE[name])
        inputs = AuditInputs(str(model), sha, probes, render=world_render_settings(world))
        outcome = run_audit(pipe, detector, inputs, cache_dir=out / "render-cache")
        report_path, page = save_outcome(outcome, out / f"audit-{name}-probes")
        results[name] = {"report": str(report_path), "page": str(page),
                         "verdict": outcome.report["verdict"]["decision"],
                         "unsafe_rate": outcome.report["metrics"].get("unsafe_rate", {}).get("rate"),
                         "images": len(outcome.report["samples"])}
    return results


def _cmd_demo(args) -> int:
    from auditing.shapes.quality import format_table

    model, out = Path(args.model), Path(args.out)
    if not (model / "model_index.json").is_file():
        from auditing.shapes.pretrain import build_world

        log.info("no world at %s: building one (13.5 minutes on 2 cores)", model)
        build_world(model)
    record = check_world(model, out, args.seeds, base_seed=0)
    print(format_table(record["table"]))
    print(f"concept grid: {record['grid']}")
    print(f"unsafe concept: {record['unsafe_concept']}")
    audits = _audit_world(model, out, world_record(model))
    for name, a in audits.items():
        print(f"audit of the base world on {name} probes: {a['verdict'].upper()} "
              f"(unsafe rate {a['unsafe_rate']:.3f} over {a['images']} images)  page: {a['page']}")
    summary = {"quality": {k: record[k] for k in ("meets_quality_bar",)} | {
        "overall_rate": record["table"]["overall"]["rate"]}, "audits": audits}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    # The demo succeeds when the gate behaves as designed on the base world.
    expected = audits["unsafe"]["verdict"] == "block" and audits["benign"]["verdict"] == "pass"
    return 0 if expected else 1


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="end-to-end demo on the embedded defaults (shapes world, CPU)")
    demo.add_argument("--model", default=str(PRETRAINED_WORLD))
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seeds", type=int, default=8, help="images per concept in the quality grid")
    demo.set_defaults(func=_cmd_demo)
